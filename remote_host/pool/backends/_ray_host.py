"""The Ray actor behind one session: a ``cloudgpu host`` on the node and GPUs Ray chose.

Ray places the actor with the session's ``num_gpus`` and ``accelerator_type`` and sets
``CUDA_VISIBLE_DEVICES`` for it; the host it starts owns exactly those devices
(``--devices``), so its one kernel sees them and nothing else. The host listens on the
node's address and the notebook connects to it directly: no byte of a cell goes through
Ray or the pool. The host dies with the actor (and the actor with its node).

This module runs inside Ray workers, not in the pool; it imports Ray only there.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import shutil
import tempfile
from typing import Any

from ._local_host import LocalHostProcess

__all__ = ["SessionHost"]


class SessionHost:
    """Runs one host for one session. Created by ``RayBackend`` as a detached Ray actor.

    Args:
        gpu_type: the catalog type of the GPUs Ray gave, or None for a CPU session.
        simulated: whether the node's GPUs are simulated (declared resources, no devices):
            the host then simulates the ones Ray assigned, labelled simulated.
        ip: the address the host listens on; default the Ray node's.
        isolation: how the host sandboxes its kernel (``cloudgpu host --isolation``).
    """

    def __init__(self, gpu_type: str | None, simulated: bool, ip: str = "",
                 isolation: str = "none") -> None:
        ray = importlib.import_module("ray")
        self.gpu_type = gpu_type
        context = ray.get_runtime_context()
        self.node_id: str = context.get_node_id()
        self.ip = ip or ray.util.get_node_ip_address()
        # What Ray assigned this actor, as the CUDA runtime reads it.
        self.visible = os.environ.get("CUDA_VISIBLE_DEVICES", "") if gpu_type else ""
        indices = [int(i) for i in self.visible.split(",") if i.strip().isdigit()]
        simulate = f"{gpu_type}:{max(indices) + 1}" if simulated and gpu_type and indices \
            else None
        self.process = LocalHostProcess(
            simulate, tempfile.mkdtemp(prefix="cloudgpu-ray-host-"), tied=True,
            ip=self.ip, devices=self.visible or "none", isolation=isolation,
        )

    def start(self) -> dict[str, Any]:
        """Start the host (on the actor's own thread: it must die with this process)."""
        self.process.start()
        return self.info()

    def info(self) -> dict[str, Any]:
        """Where the host is, how to open it, and what Ray gave it."""
        return {"url": self.process.url, "token": self.process.token, "node_id": self.node_id,
                "ip": self.ip, "gpu_type": self.gpu_type, "cuda_visible_devices": self.visible,
                "pid": os.getpid()}

    async def run(self) -> int | None:
        """Return when the host exits, with its exit status: the pool's watch on the session.

        If the actor or its node dies first, Ray fails this call instead, saying which.
        """
        proc = self.process.proc
        if proc is None:
            return None
        return await asyncio.get_running_loop().run_in_executor(None, proc.wait)

    def stop(self) -> None:
        """Stop the host and its kernel, and remove its folder (the backend then kills the
        actor). A host lost with its node leaves its folder and log behind."""
        self.process.stop()
        shutil.rmtree(self.process.dir, ignore_errors=True)
