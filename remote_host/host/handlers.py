"""What a host adds to the Jupyter kernel API: its inventory, and kernels started with GPUs."""

from __future__ import annotations

import json
import platform
import sys
from typing import Any, cast

from jupyter_server.base.handlers import APIHandler
from tornado import web

from cloudgpu import __version__
from cloudgpu.errors import UnknownHardwareError
from cloudgpu.hardware import parse_spec

from .auth import HostIdentityProvider
from .inventory import NoCapacityError
from .kernels import GPUKernelManager

__all__ = ["HOST_HANDLERS"]


class HostInfoHandler(APIHandler):
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


class GPUKernelsHandler(APIHandler):
    """``POST /api/cloudgpu/kernels`` with ``{"hardware": "H100:2"}``: a kernel holding those GPUs.

    With ``"scoped_token": T`` the new kernel also opens to T, and T opens nothing else:
    that is how a pool hands one session to one user.
    """

    @web.authenticated
    async def post(self) -> None:
        km = cast(GPUKernelManager, self.kernel_manager)
        body: dict[str, Any] = self.get_json_body() or {}
        try:
            spec = parse_spec(str(body.get("hardware", "cpu")), km.catalog)
        except UnknownHardwareError as e:
            raise web.HTTPError(400, reason="Unknown hardware", log_message=str(e)) from None
        scoped = body.get("scoped_token")
        if scoped is not None and (not isinstance(scoped, str) or len(scoped) < 16):
            raise web.HTTPError(400, reason="Bad token",
                                log_message="`scoped_token` must be a string of 16+ characters.")
        try:
            kernel_id, _ = await km.start_gpu_kernel(spec)
        except NoCapacityError as e:
            raise web.HTTPError(409, reason="No capacity", log_message=str(e)) from None
        if scoped:
            cast(HostIdentityProvider, self.identity_provider).add_scoped_token(scoped, kernel_id)
        self.set_status(201)
        self.finish(json.dumps(km.kernel_model(kernel_id), default=str))


HOST_HANDLERS: list[tuple[str, type[APIHandler]]] = [
    (r"/api/cloudgpu/host", HostInfoHandler),
    (r"/api/cloudgpu/kernels", GPUKernelsHandler),
]
