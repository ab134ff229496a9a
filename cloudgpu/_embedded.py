"""The embedded local default: a host subprocess on 127.0.0.1, private to this process."""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .hardware import HardwareSpec
from .errors import HostStartError
from .host_client import HostClient
from .provider import SessionProvider, StatusCallback
from .session import Grant

__all__ = ["EmbeddedHostProvider", "LocalHostProcess"]

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask Linux to SIGTERM the host when the process that started it dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the host's --parent-pid watch still stops it


class LocalHostProcess:
    """A ``cloudgpu host`` subprocess with a random port and token, tied to this process."""

    def __init__(self, simulate: str | None = None, start_timeout: float = 60.0) -> None:
        self.simulate = simulate
        self.start_timeout = start_timeout
        self.token = secrets.token_hex(24)
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="cloudgpu-host-"))
        self.log_path = self._dir / "host.log"

    def start(self) -> None:
        """Start the host and wait until it listens.

        Raises:
            HostStartError: when it exits or stays silent past ``start_timeout``.
        """
        info = self._dir / "host.json"
        env = dict(os.environ, CLOUDGPU_HOST_TOKEN=self.token)
        if self.simulate:
            env["CLOUDGPU_SIMULATE"] = self.simulate
        cmd = [sys.executable, "-m", "cloudgpu", "host", "--ip=127.0.0.1", "--port=0",
               f"--info-file={info}", f"--parent-pid={os.getpid()}", "--log-level=WARN"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                # Its own session: interrupting the kernel signals the kernel's whole process
                # group, and the host must not die of that SIGINT.
                start_new_session=True,
            )
        atexit.register(self.stop)
        deadline = time.monotonic() + self.start_timeout
        while not info.exists():
            if self.proc.poll() is not None:
                raise HostStartError(
                    f"The local cloudgpu host exited with code {self.proc.returncode} while "
                    f"starting. Its log ({self.log_path}) ends with:\n{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise HostStartError(
                    f"The local cloudgpu host did not start within {self.start_timeout:.0f} s. "
                    f"Its log ({self.log_path}) ends with:\n{self._log_tail()}"
                )
            time.sleep(0.02)
        self.url = json.loads(info.read_text())["url"]

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop the host (and with it every kernel it runs)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class EmbeddedHostProvider(SessionProvider):
    """Kernels on a host subprocess of this process: zero configuration, goes away with us.

    Args:
        simulate: a simulated inventory for the host (``H100:2``); default
            ``$CLOUDGPU_SIMULATE``.
    """

    description = "embedded local host"

    def __init__(self, simulate: str | None = None) -> None:
        self.simulate = simulate if simulate is not None else os.environ.get("CLOUDGPU_SIMULATE")
        self.process: LocalHostProcess | None = None
        self._client: HostClient | None = None
        self._lock = asyncio.Lock()

    async def _host(self) -> HostClient:
        async with self._lock:
            if self.process is None or self.process.proc is None or \
                    self.process.proc.poll() is not None:
                process = LocalHostProcess(self.simulate)
                await asyncio.get_running_loop().run_in_executor(None, process.start)
                self.process = process
                self._client = HostClient(process.url, process.token)
            assert self._client is not None
            return self._client

    async def acquire(self, spec: HardwareSpec, *,
                      on_status: StatusCallback | None = None) -> Grant:
        """Start a kernel on the local host holding ``spec``."""
        if on_status is not None:
            on_status(f"starting on {spec.display} ({self.description}) ...")
        host = await self._host()
        model = await host.start_kernel(str(spec))
        gpus = model.get("cloudgpu", {}).get("gpus", [])
        return Grant(host_url=host.url, token=host.token, kernel_id=model["id"],
                     hardware=str(spec), gpus=gpus, simulated=any(g["simulated"] for g in gpus))

    async def release(self, grant: Grant) -> None:
        """Shut the kernel down."""
        if self._client is not None:
            await self._client.shutdown(grant.kernel_id)

    async def aclose(self) -> None:
        """Stop the host process."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self.process is not None:
            self.process.stop()
            self.process = None
