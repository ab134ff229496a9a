"""What a host adds to the Jupyter kernel API: its inventory, and kernels started with GPUs."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import sys
import time
from typing import Any, cast

from jupyter_core.utils import ensure_async
from jupyter_server.base.handlers import APIHandler
from jupyter_server.services.kernels.handlers import MainKernelHandler
from tornado import web

from cloudgpu import __version__
from cloudgpu.environment import check_requirements
from cloudgpu.errors import (
    CloudGPUError,
    InvalidRequestError,
    SessionNotFoundError,
    error_body,
    http_status,
)
from cloudgpu.hardware import parse_spec

from .auth import HostIdentityProvider
from .kernels import GPUKernelManager

__all__ = ["HOST_HANDLERS", "CheckedMainKernelHandler", "CloudGPUHandler"]

_INSTANCE = f"{os.getpid()}-{time.time():.6f}"


class CloudGPUHandler(APIHandler):
    """A host API handler whose cloudgpu errors answer in the shared wire convention."""

    def write_cloudgpu_error(self, error: CloudGPUError) -> None:
        """Answer ``error`` as ``{"error": class, "message": ..., "status": code}``."""
        self.set_status(http_status(error))
        self.finish(json.dumps(error_body(error)))


class HostInfoHandler(CloudGPUHandler):
    """``GET /api/cloudgpu/host``: versions, the inventory and its use."""

    @web.authenticated
    def get(self) -> None:
        km = cast(GPUKernelManager, self.kernel_manager)
        self.finish(json.dumps({
            "cloudgpu": __version__,
            "python": platform.python_version(),
            "hostname": platform.node(),
            "executable": sys.executable,
            "kernels": len(km.list_kernel_ids()),
            # Changes when the host restarts: its kernels then are not the ones before.
            "instance": _INSTANCE,
            "inventory": km.inventory.to_json(),
            "isolation": km.sandbox.describe(),
        }))


class GPUKernelsHandler(CloudGPUHandler):
    """``POST /api/cloudgpu/kernels`` with ``{"hardware": "H100:2"}``: a kernel holding those GPUs.

    With ``"scoped_token": T`` the new kernel also opens to T, and T opens nothing else:
    that is how a pool hands one session to one user. With ``"environment": ["pkg==1.0"]``
    it runs in the environment made for those requirements (prepared first if need be;
    ``/api/cloudgpu/environments`` prepares one ahead and shows its progress).
    """

    @web.authenticated
    async def post(self) -> None:
        try:
            await self._start()
        except CloudGPUError as e:
            self.write_cloudgpu_error(e)

    async def _start(self) -> None:
        km = cast(GPUKernelManager, self.kernel_manager)
        body = self.get_json_body() or {}
        if not isinstance(body, dict):
            raise InvalidRequestError('The request body must be a JSON object: '
                                      '{"hardware": "H100"}.')
        spec = parse_spec(str(body.get("hardware", "cpu")), km.catalog)
        scoped = body.get("scoped_token")
        if scoped is not None and (not isinstance(scoped, str) or len(scoped) < 16):
            raise InvalidRequestError("`scoped_token` must be a string of 16+ characters.")
        environment = check_requirements(body.get("environment"))
        kernel_id, _ = await km.start_gpu_kernel(spec, environment or None)
        if scoped:
            cast(HostIdentityProvider, self.identity_provider).add_scoped_token(scoped, kernel_id)
        self.set_status(201)
        self.finish(json.dumps(km.kernel_model(kernel_id), default=str))


class GPUKernelHandler(CloudGPUHandler):
    """``GET /api/cloudgpu/kernels/{id}``: a kernel's model, or how and when it ended.

    Unlike ``/api/kernels/{id}``, which is 404 once a kernel is gone, this says whether it
    was shut down or died (with its exit code or signal), and when: the pool ends the
    session's billing at that moment, even when it learns of it later.
    """

    @web.authenticated
    def get(self, kernel_id: str) -> None:
        km = cast(GPUKernelManager, self.kernel_manager)
        if kernel_id in km:
            model = km.kernel_model(kernel_id)
            model["cloudgpu"]["state"] = "stopping" if kernel_id in km.stopping else "running"
        elif kernel_id in km.ended:
            model = {"id": kernel_id, "cloudgpu": dict(km.ended[kernel_id])}
        else:
            self.write_cloudgpu_error(SessionNotFoundError(
                f"This host has no kernel `{kernel_id}` and does not remember one."))
            return
        self.finish(json.dumps(model, default=str))


class StopKernelHandler(CloudGPUHandler):
    """``POST /api/cloudgpu/kernels/{id}/stop`` with ``{"reason": "...", "if_idle_since": T}``:
    shut the kernel down, remembering why (``stopped_for`` in its end record); with
    ``if_idle_since``, only if it was not active after ``T`` (its ``last_activity`` as the
    caller saw it; null: whatever it did before) and it runs nothing now.

    Answers ``{"stopped": true}``, or ``{"stopped": false, ...}`` with the kernel's model.
    The pool culls idle sessions this way: a cell that reaches the host before the check
    keeps the kernel, and one that comes after it is dropped unrun, so no cell starts in a
    kernel that is being stopped for idleness. Only the host's token may ask.
    """

    @web.authenticated
    async def post(self, kernel_id: str) -> None:
        km = cast(GPUKernelManager, self.kernel_manager)
        try:
            reason, if_idle, since = _stop_request(self.get_json_body())
            if kernel_id not in km:
                raise SessionNotFoundError(f"This host has no kernel `{kernel_id}`.")
        except CloudGPUError as e:
            self.write_cloudgpu_error(e)
            return
        stopped = await km.stop_for(kernel_id, reason, if_idle=if_idle, since=since)
        answer: dict[str, Any] = {"stopped": stopped}
        if not stopped and kernel_id in km:
            answer.update(km.kernel_model(kernel_id))
        self.finish(json.dumps(answer, default=str))


def _stop_request(body: Any) -> tuple[str, bool, dt.datetime | None]:
    """The reason of a stop request, whether it asks for a stop only if idle, and since when.

    Raises:
        InvalidRequestError: the body is not what the endpoint takes.
    """
    example = '{"reason": "idle for 15 min", "if_idle_since": "2026-12-07T06:00:00.000000Z"}'
    if not isinstance(body, dict):
        raise InvalidRequestError(f"The request body must be a JSON object: {example}.")
    reason, since = body.get("reason"), body.get("if_idle_since")
    if not isinstance(reason, str) or not 0 < len(reason) <= 500:
        raise InvalidRequestError(f"`reason` must be a string of 1 to 500 characters: "
                                  f"{example}.")
    if since is None:  # absent: stop anyway; null: if it runs nothing (and has started)
        return reason, "if_idle_since" in body, None
    try:
        when = dt.datetime.fromisoformat(since.replace("Z", "+00:00")) \
            if isinstance(since, str) else None
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise InvalidRequestError(f"`if_idle_since` must be a time with its zone, as the "
                                  f"kernel's `last_activity` reads, not {since!r}: {example}.")
    return reason, True, when


class MetricsHandler(CloudGPUHandler):
    """``GET /api/cloudgpu/metrics[?kernel=ID...]``: live readings of every kernel (or those).

    Each kernel's readings (see ``metrics.KernelReadings``) come with its Jupyter state:
    ``execution_state`` and ``last_activity``.
    """

    @web.authenticated
    def get(self) -> None:
        km = cast(GPUKernelManager, self.kernel_manager)
        wanted = self.get_query_arguments("kernel") or km.list_kernel_ids()
        kernels = {}
        for kernel_id in wanted:
            if kernel_id not in km:
                continue
            model = km.kernel_model(kernel_id)
            kernels[kernel_id] = {**km.readings(kernel_id).to_json(),
                                  "execution_state": model.get("execution_state"),
                                  "last_activity": model.get("last_activity")}
        self.finish(json.dumps({"kernels": kernels}, default=str))


class CheckedMainKernelHandler(MainKernelHandler):
    """Jupyter's ``POST /api/kernels``, refusing a malformed body with a 400 (Jupyter's own
    answers a JSON list with a 500, and takes any string as the new kernel's id)."""

    @web.authenticated
    async def post(self) -> None:
        body = self.get_json_body()
        problem = _kernel_body_problem(body)
        if problem:
            self.set_status(400)
            self.finish(json.dumps(error_body(InvalidRequestError(problem))))
            return
        await ensure_async(super().post())


def _kernel_body_problem(body: Any) -> str | None:
    if body is None:
        return None
    if not isinstance(body, dict):
        return 'The request body must be a JSON object, like {"name": "cloudgpu-python"}.'
    for key in ("name", "path"):
        if key in body and not isinstance(body[key], str):
            return f"`{key}` must be a string, not {type(body[key]).__name__}."
    kernel_id = body.get("kernel_id")
    if kernel_id is not None and not (isinstance(kernel_id, str)
                                      and _KERNEL_ID.fullmatch(kernel_id)):
        return "`kernel_id` must be a UUID, or left out."
    return None


_KERNEL_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                        r"[0-9a-fA-F]{12}")


class EnvironmentsHandler(CloudGPUHandler):
    """``POST /api/cloudgpu/environments`` with ``{"requirements": ["pkg==1.0"]}``: prepare
    that environment (or find it cached); answers its state at once."""

    @web.authenticated
    async def post(self) -> None:
        try:
            body = self.get_json_body() or {}
            if not isinstance(body, dict):
                raise InvalidRequestError('The request body must be a JSON object: '
                                          '{"requirements": ["tabulate==0.9.0"]}.')
            requirements = check_requirements(body.get("requirements"), "requirements")
            if not requirements:
                raise InvalidRequestError('Name the requirements: '
                                          '{"requirements": ["tabulate==0.9.0"]}.')
        except CloudGPUError as e:
            self.write_cloudgpu_error(e)
            return
        km = cast(GPUKernelManager, self.kernel_manager)
        build = km.environments.prepare(requirements)
        self.set_status(200 if build.state == "ready" else 202)
        self.finish(json.dumps(build.to_json()))


class EnvironmentHandler(CloudGPUHandler):
    """``GET /api/cloudgpu/environments/{id}[?wait=S&version=V]``: an environment's state,
    latest progress line and the lines since ``version``; with ``wait``, answers once it
    changed past ``version``."""

    @web.authenticated
    async def get(self, key: str) -> None:
        km = cast(GPUKernelManager, self.kernel_manager)
        build = km.environments.get(key)
        if build is None:
            raise web.HTTPError(404, f"No environment `{key}` on this host.")
        try:
            wait = min(float(self.get_query_argument("wait", "0") or 0), 60.0)
            version = int(self.get_query_argument("version", "-1"))
        except ValueError:
            self.write_cloudgpu_error(InvalidRequestError(
                "`wait` must be seconds and `version` an integer: ?wait=20&version=3."))
            return
        if wait > 0:
            await build.changed(version, wait)
        self.finish(json.dumps(build.to_json(since=version)))


HOST_HANDLERS: list[tuple[str, type[CloudGPUHandler]]] = [
    (r"/api/cloudgpu/host", HostInfoHandler),
    (r"/api/cloudgpu/kernels", GPUKernelsHandler),
    (r"/api/cloudgpu/kernels/([0-9a-fA-F-]+)", GPUKernelHandler),
    (r"/api/cloudgpu/kernels/([0-9a-fA-F-]+)/stop", StopKernelHandler),
    (r"/api/cloudgpu/metrics", MetricsHandler),
    (r"/api/cloudgpu/environments", EnvironmentsHandler),
    (r"/api/cloudgpu/environments/([0-9a-f]+)", EnvironmentHandler),
]
