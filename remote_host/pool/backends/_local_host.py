"""A ``cloudgpu host`` subprocess on this machine (127.0.0.1 by default) with a random port
and token: the local backend's host, and each Ray session's."""

from __future__ import annotations

import atexit
import ctypes
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from cloudgpu._process import read_json, running, spawn, stop, write_private_json

__all__ = ["LocalHostProcess"]

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask Linux to SIGTERM the host when the process that started it dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the host's --parent-pid watch still stops it


class LocalHostProcess:
    """Starts, finds again and stops one local host.

    Args:
        simulate: a simulated inventory for it (``H100:2``), or None for the real GPUs.
        state_dir: where its info file and log go; a fresh temporary folder by default.
        tied: when True the host stops as soon as this process ends (even by SIGKILL);
            when False it outlives us and :meth:`adopt` can find it again.
        ip: the address it listens on.
        devices: the GPUs that are its own (``HostApp.devices``: ``1,3``, ``none``), or
            None for all of them.
        isolation: how it sandboxes kernels (``cloudgpu host --isolation``).
    """

    def __init__(self, simulate: str | None = None, state_dir: str | Path | None = None,
                 tied: bool = True, start_timeout: float = 60.0, *, ip: str = "127.0.0.1",
                 devices: str | None = None, isolation: str = "none") -> None:
        self.simulate = simulate
        self.isolation = isolation
        self.tied = tied
        self.ip = ip
        self.devices = devices
        self.start_timeout = start_timeout
        self.dir = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="cloudgpu-host-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.info_path = self.dir / "host.json"
        self.log_path = self.dir / "host.log"
        self.state_path = self.dir / "host-state.json"
        self.token = secrets.token_hex(24)
        self.url = ""
        self.pid: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def adopt(cls, state_dir: str | Path, simulate: str | None,
              isolation: str = "none") -> LocalHostProcess | None:
        """The host a previous run left in ``state_dir``, if it still runs with that inventory
        and isolation."""
        try:
            saved = read_json(Path(state_dir) / "host-state.json")
            pid = int(saved["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not running(pid) or saved.get("simulate") != simulate or \
                saved.get("isolation", "none") != isolation:
            return None
        host = cls(simulate, state_dir, tied=False, isolation=isolation)
        host.token, host.url, host.pid = saved["token"], saved["url"], pid
        return host

    def start(self) -> None:
        """Start the host and wait until it listens.

        Raises:
            HostStartError: when it exits or stays silent past ``start_timeout``.
        """
        env = dict(os.environ, CLOUDGPU_HOST_TOKEN=self.token)
        env.pop("CLOUDGPU_SIMULATE", None)
        cmd = [sys.executable, "-m", "cloudgpu", "host", f"--ip={self.ip}", "--port=0",
               f"--info-file={self.info_path}", "--log-level=WARN",
               f"--isolation={self.isolation}"]
        if self.simulate:
            cmd.append(f"--simulate={self.simulate}")
        if self.devices is not None:
            cmd.append(f"--devices={self.devices}")
        if self.tied:
            cmd.append(f"--parent-pid={os.getpid()}")
        self.proc, info = spawn(
            cmd, env=env, info_path=self.info_path, log_path=self.log_path,
            what="The local cloudgpu host", timeout=self.start_timeout,
            preexec_fn=_die_with_parent if self.tied and sys.platform.startswith("linux")
            else None,
            # Its own session: interrupting a Jupyter kernel signals the kernel's whole
            # process group, and the host must not die of that SIGINT.
            start_new_session=True,
        )
        self.pid = self.proc.pid
        if self.tied:
            atexit.register(self.stop)
        self.url = str(info["url"]).rstrip("/")
        if not self.tied:
            write_private_json(self.state_path, {"pid": self.pid, "url": self.url,
                                                 "token": self.token, "simulate": self.simulate,
                                                 "isolation": self.isolation})

    def running(self) -> bool:
        """Whether the host process is still there."""
        if self.pid is None:
            return False
        if self.proc is not None:
            return self.proc.poll() is None
        return running(self.pid)

    def stop(self) -> None:
        """Stop the host (and with it every kernel it runs)."""
        pid, self.pid = self.pid, None
        proc, self.proc = self.proc, None
        self.state_path.unlink(missing_ok=True)
        if pid is not None:
            stop(proc if proc is not None else pid, grace=10.0)
