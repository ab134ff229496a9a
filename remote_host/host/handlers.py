"""What a host adds to the Jupyter kernel API: its inventory, and kernels started with GPUs."""

from __future__ import annotations

import json
import platform
import sys
from typing import cast

from jupyter_server.base.handlers import APIHandler
from tornado import web

from cloudgpu import __version__
from cloudgpu.environment import check_requirements
from cloudgpu.errors import CloudGPUError, InvalidRequestError, error_body, http_status
from cloudgpu.hardware import parse_spec

from .auth import HostIdentityProvider
from .kernels import GPUKernelManager

__all__ = ["HOST_HANDLERS", "CloudGPUHandler"]


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
            "inventory": km.inventory.to_json(),
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
    """``GET /api/cloudgpu/environments/{id}[?wait=S&version=V]``: an environment's state and
    latest progress line; with ``wait``, answers once it changed past ``version``."""

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
        self.finish(json.dumps(build.to_json()))


HOST_HANDLERS: list[tuple[str, type[CloudGPUHandler]]] = [
    (r"/api/cloudgpu/host", HostInfoHandler),
    (r"/api/cloudgpu/kernels", GPUKernelsHandler),
    (r"/api/cloudgpu/environments", EnvironmentsHandler),
    (r"/api/cloudgpu/environments/([0-9a-f]+)", EnvironmentHandler),
]
