"""The host's kernels: each starts with the cloudgpu agent loaded and its own set of GPUs."""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection
from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from traitlets import Float, Instance, Unicode

from cloudgpu._wire import SUBPROTOCOL, v1_header
from cloudgpu.hardware import Catalog, HardwareSpec

from .environments import Environments
from .inventory import Device, Inventory

__all__ = [
    "AGENT_KERNEL_NAME",
    "AgentKernelSpecManager",
    "GPUKernelManager",
    "LowLatencyWebsocketConnection",
]

AGENT_KERNEL_NAME = "cloudgpu-python"
#: Kernels in an environment are named after it: ``cloudgpu-python-env-<key>``.
ENV_KERNEL_PREFIX = f"{AGENT_KERNEL_NAME}-env-"
_DIRECT_MIN = 1 << 20  # messages this big skip the copies (see _on_zmq_reply)


class AgentKernelSpecManager(KernelSpecManager):
    """Offers one kernel: this host's Python with the cloudgpu agent loaded; and the same
    in each environment the host prepared (``cloudgpu-python-env-<key>``)."""

    environments = Instance(Environments, allow_none=True)

    stdout_flush_interval = Float(
        0.02,
        help="Seconds the remote kernel holds stdout back before sending it "
        "(ipykernel's default is 0.2; lower means output shows sooner).",
    ).tag(config=True)

    def _spec(self, environment: Path | None = None) -> KernelSpec:
        python = str(environment / "bin" / "python") if environment else sys.executable
        argv = [
            python, "-m", "ipykernel_launcher", "-f", "{connection_file}",
            "--ext=cloudgpu.remote_host.host.agent",
        ]
        # ipykernel's OutStream is not configurable from the command line: the agent
        # applies this when it loads.
        env = {"CLOUDGPU_FLUSH_INTERVAL": str(self.stdout_flush_interval)}
        if environment:
            env["VIRTUAL_ENV"] = str(environment)
        return KernelSpec(
            argv=argv,
            env=env,
            display_name=f"Python {sys.version_info.major}.{sys.version_info.minor} "
                         f"(cloudgpu host)",
            language="python",
            interrupt_mode="signal",
            resource_dir=str(Path(__file__).parent),
            metadata={"debugger": True},
        )

    def find_kernel_specs(self) -> dict[str, str]:
        """The one kernel this host runs."""
        return {AGENT_KERNEL_NAME: str(Path(__file__).parent)}

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        """Our spec for our name, or for a ready environment's; other names are unknown here."""
        if kernel_name == AGENT_KERNEL_NAME:
            return self._spec()
        key = kernel_name.removeprefix(ENV_KERNEL_PREFIX)
        if key != kernel_name and self.environments is not None and \
                self.environments.is_ready(key):
            return self._spec(self.environments.path(key))
        raise NoSuchKernel(kernel_name)

    def get_all_specs(self) -> dict[str, Any]:
        """The kernelspec listing ``/api/kernelspecs`` serves."""
        return {
            AGENT_KERNEL_NAME: {
                "resource_dir": str(Path(__file__).parent),
                "spec": self._spec().to_dict(),
            }
        }


class GPUKernelManager(AsyncMappingKernelManager):
    """A Jupyter Server kernel manager that gives each kernel its GPUs.

    Kernels started through the standard ``POST /api/kernels`` get no GPU; the
    ``POST /api/cloudgpu/kernels`` endpoint passes a hardware spec, and the devices
    it reserves are what the kernel sees through ``CUDA_VISIBLE_DEVICES``.
    GPUs are freed when the kernel is shut down or dies.
    """

    inventory = Instance(Inventory)
    catalog = Instance(Catalog)
    environments = Instance(Environments)
    default_kernel_name = Unicode(AGENT_KERNEL_NAME)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: Open websocket connections by kernel id, to close when a kernel goes away.
        self.websockets: dict[str, set[Any]] = {}

    async def start_gpu_kernel(self, spec: HardwareSpec, environment: list[str] | None = None,
                               ) -> tuple[str, list[Device]]:
        """Start a kernel holding the devices ``spec`` asks for, in the environment made for
        ``environment`` (pip requirements) when one is asked for.

        Raises:
            NoCapacityError: when the host cannot give that hardware now.
            EnvironmentBuildError: when the environment cannot be prepared.
        """
        kernel_name = AGENT_KERNEL_NAME
        if environment:
            build = await self.environments.prepare(environment).ready()
            kernel_name = ENV_KERNEL_PREFIX + build.id
        reservation = f"pending-{os.urandom(8).hex()}"
        devices = self.inventory.allocate(spec, reservation, self.catalog)
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d.index) for d in devices)
        if devices and devices[0].simulated:
            env["CLOUDGPU_SIMULATED_GPUS"] = ",".join(d.type for d in devices)
        try:
            kernel_id: str = await self.start_kernel(kernel_name=kernel_name, env=env)
        except BaseException:
            self.inventory.release(reservation)
            raise
        self.inventory.reassign(reservation, kernel_id)
        return kernel_id, devices

    async def start_kernel(self, **kwargs: Any) -> str:  # type: ignore[override]
        """Start a kernel; one started without GPUs sees none."""
        env = kwargs.setdefault("env", dict(os.environ))
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
        kwargs["kernel_name"] = kwargs.get("kernel_name") or AGENT_KERNEL_NAME
        return await super().start_kernel(**kwargs)

    def remove_kernel(self, kernel_id: str) -> Any:
        """Forget a kernel (shut down or dead), free its GPUs and revoke its scoped tokens.

        Its websockets are closed too: Jupyter leaves them open, and a client would wait
        for replies that never come.
        """
        for conn in self.websockets.pop(kernel_id, set()):
            conn.websocket_handler.close(1001, "the kernel was shut down")
        self.inventory.release(kernel_id)
        identity = getattr(self.parent, "identity_provider", None)
        if identity is not None and hasattr(identity, "forget_kernel"):
            identity.forget_kernel(kernel_id)
        return super().remove_kernel(kernel_id)

    def kernel_model(self, kernel_id: str) -> dict[str, Any]:
        """The standard kernel model plus the GPUs it holds.

        A kernel still starting has no ``last_activity`` yet, and Jupyter's own model of it
        fails (a 500 for everyone listing kernels at that moment): it is shown as starting.
        """
        kernel = self._kernels.get(kernel_id)
        if kernel is not None and not kernel.trait_has_value("last_activity"):
            model: dict[str, Any] = {"id": kernel_id, "name": kernel.kernel_name,
                                     "last_activity": None, "execution_state": "starting",
                                     "connections": 0}
        else:
            model = super().kernel_model(kernel_id)
        model["cloudgpu"] = {"gpus": [d.__dict__ for d in self.inventory.held_by(kernel_id)],
                             "environment": self._requirements(str(model.get("name", "")))}
        return model

    def _requirements(self, kernel_name: str) -> list[str]:
        """The requirements of the environment a kernel runs in ([] for the host's own)."""
        key = kernel_name.removeprefix(ENV_KERNEL_PREFIX)
        build = self.environments.get(key) if key != kernel_name else None
        return build.requirements if build is not None else []


class LowLatencyWebsocketConnection(ZMQChannelsWebsocketConnection):
    """Jupyter's kernel websocket with Nagle's algorithm off.

    Tornado leaves Nagle on, so a small message sent right after another waits for the
    peer's delayed ACK: about 40 ms on every cell. Kernel messages are small and
    latency-bound, so we send each at once.
    """

    def connect(self) -> Any:
        """Connect to the kernel's ZMQ channels, then switch TCP_NODELAY on."""
        self.websocket_handler.set_nodelay(True)
        self.multi_kernel_manager.websockets.setdefault(self.kernel_id, set()).add(self)
        return super().connect()

    def _on_zmq_reply(self, stream: Any, msg_list: list[bytes]) -> None:
        """Send a kernel message to the client; big ones without copying their buffers.

        Jupyter joins a v1 message into one bytes object and tornado copies it once more
        into a websocket frame: for a 4 MiB variable chunk that is most of the host's work
        (35% of it in tornado's frame copy, by py-spy). Here the frame header, the v1 header
        and each part are queued on the socket as they are. Anything unusual (compression,
        masking, a closing socket, another protocol) takes Jupyter's own path.
        """
        ws = getattr(self.websocket_handler, "ws_connection", None)
        size = sum(len(part) for part in msg_list)
        if (size < _DIRECT_MIN or self.subprotocol != SUBPROTOCOL or ws is None
                or ws.is_closing() or getattr(ws, "_compressor", None) is not None
                or getattr(ws, "mask_outgoing", True) or stream.closed()):
            super()._on_zmq_reply(stream, msg_list)
            return
        channel = getattr(stream, "channel", "").encode()
        v1_head = v1_header(channel, msg_list)
        length = len(v1_head) + len(channel) + size
        frame_head = struct.pack("!BBQ", 0x80 | 0x2, 127, length)  # FIN, binary, 64-bit length
        ws.stream.write(frame_head + v1_head + channel)
        for part in msg_list:
            ws.stream.write(part)

    def disconnect(self) -> Any:
        """Forget this connection, then let Jupyter tear it down."""
        self.multi_kernel_manager.websockets.get(self.kernel_id, set()).discard(self)
        return super().disconnect()
