"""The ``local`` backend: one host subprocess on this machine with all of its GPUs."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from traitlets import Unicode, default

from cloudgpu.errors import CloudGPUError, HostConnectionError
from cloudgpu.hardware import Choice

from ..backend import HostsBackend, Placement
from ..scheduler import Slot
from ._local_host import LocalHostProcess

__all__ = ["LocalBackend"]

SLOT = "local"  # one host, whatever its URL after a restart


class LocalBackend(HostsBackend):
    """Kernels on a ``cloudgpu host`` this pool starts on 127.0.0.1.

    The host outlives a crashed pool, and the pool adopts it again on restart, so running
    sessions survive; a pool that stops normally stops its host.
    """

    name = "local"

    simulate = Unicode(
        "", help="A simulated inventory for the local host (`H100:2,A100-80GB:4`); "
        "default $CLOUDGPU_SIMULATE. Empty: the real GPUs (NVML), or CPU only."
    ).tag(config=True)
    state_dir = Unicode(help="Where the host's state file and log live.").tag(config=True)
    isolation = Unicode(
        "none", help="How the local host sandboxes kernels (`cloudgpu host --isolation`): "
        "none suits one user on their own machine; bubblewrap when several users share this "
        "pool (which refuses none then, unless --allow-unisolated).",
    ).tag(config=True)

    @default("simulate")
    def _default_simulate(self) -> str:
        return os.environ.get("CLOUDGPU_SIMULATE", "")

    @default("state_dir")
    def _default_state_dir(self) -> str:
        from jupyter_core.paths import jupyter_runtime_dir

        return os.path.join(jupyter_runtime_dir(), "cloudgpu-local-host")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.process: LocalHostProcess | None = None
        self._restart_lock = asyncio.Lock()

    async def start(self) -> list[Slot]:
        """Adopt the host a previous pool left running, or start one."""
        simulate = self.simulate or None
        process = LocalHostProcess.adopt(self.state_dir, simulate, self.isolation)
        if process is not None:
            try:
                slot = await self.slot_for(process.url, process.token, SLOT)
                self.process = process
                self.log.info("Adopted the local host at %s (pid %s)", process.url, process.pid)
                return [slot]
            except CloudGPUError as e:  # it answers no more: start a fresh one below
                self.log.warning("Could not adopt the local host at %s: %s", process.url, e)
                process.stop()
        return [await self._start_host()]

    async def _start_host(self) -> Slot:
        process = LocalHostProcess(self.simulate or None, self.state_dir, tied=False,
                                   isolation=self.isolation)
        await asyncio.get_running_loop().run_in_executor(None, process.start)
        self.process = process
        return await self.slot_for(process.url, process.token, SLOT)

    async def launch(self, slot_id: str, choice: Choice, scoped_token: str | None,
                     environment: list[str] | None = None) -> Placement:
        """Start a kernel; if the local host died, start a new host first."""
        try:
            return await super().launch(slot_id, choice, scoped_token, environment)
        except HostConnectionError:
            async with self._restart_lock:
                if self.process is None or not self.process.running():
                    self.log.warning("The local host is gone; starting a new one.")
                    await self._start_host()
            return await super().launch(slot_id, choice, scoped_token, environment)

    async def heartbeat(self) -> dict[str, dict[str, Any] | None]:
        """The local host's liveness; a host that died is started again first (its kernels,
        and so their sessions, are lost either way; new sessions need not wait)."""
        async with self._restart_lock:
            if self.process is not None and not self.process.running():
                self.log.warning("The local host (pid %s) is gone; starting a new one.",
                                 self.process.pid)
                await self._start_host()
        return await super().heartbeat()

    async def close(self) -> None:
        """Stop the local host with its kernels."""
        await super().close()
        if self.process is not None:
            process, self.process = self.process, None
            await asyncio.get_running_loop().run_in_executor(None, process.stop)
