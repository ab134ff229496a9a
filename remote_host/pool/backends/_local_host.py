"""A ``cloudgpu host`` subprocess on 127.0.0.1 with a random port and token."""

from __future__ import annotations

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

from cloudgpu.errors import HostStartError

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
    """

    def __init__(self, simulate: str | None = None, state_dir: str | Path | None = None,
                 tied: bool = True, start_timeout: float = 60.0) -> None:
        self.simulate = simulate
        self.tied = tied
        self.start_timeout = start_timeout
        self.dir = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="cloudgpu-host-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.info_path = self.dir / "host.json"
        self.log_path = self.dir / "host.log"
        self.token = secrets.token_hex(24)
        self.url = ""
        self.pid: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def adopt(cls, state_dir: str | Path, simulate: str | None) -> LocalHostProcess | None:
        """The host a previous run left in ``state_dir``, if it still runs with that inventory."""
        state = Path(state_dir) / "host-state.json"
        try:
            saved = json.loads(state.read_text())
            os.kill(saved["pid"], 0)
        except (OSError, ValueError, KeyError):
            return None
        if saved.get("simulate") != simulate:
            return None
        host = cls(simulate, state_dir, tied=False)
        host.token, host.url, host.pid = saved["token"], saved["url"], saved["pid"]
        return host

    def start(self) -> None:
        """Start the host and wait until it listens.

        Raises:
            HostStartError: when it exits or stays silent past ``start_timeout``.
        """
        self.info_path.unlink(missing_ok=True)
        env = dict(os.environ, CLOUDGPU_HOST_TOKEN=self.token)
        env.pop("CLOUDGPU_SIMULATE", None)
        cmd = [sys.executable, "-m", "cloudgpu", "host", "--ip=127.0.0.1", "--port=0",
               f"--info-file={self.info_path}", "--log-level=WARN"]
        if self.simulate:
            cmd.append(f"--simulate={self.simulate}")
        if self.tied:
            cmd.append(f"--parent-pid={os.getpid()}")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if self.tied and sys.platform.startswith("linux")
                else None,
                # Its own session: interrupting a Jupyter kernel signals the kernel's whole
                # process group, and the host must not die of that SIGINT.
                start_new_session=True,
            )
        self.pid = self.proc.pid
        if self.tied:
            atexit.register(self.stop)
        deadline = time.monotonic() + self.start_timeout
        while not self.info_path.exists():
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
        self.url = json.loads(self.info_path.read_text())["url"].rstrip("/")
        if not self.tied:
            state = self.dir / "host-state.json"
            with open(os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                json.dump({"pid": self.pid, "url": self.url, "token": self.token,
                           "simulate": self.simulate}, f)

    def running(self) -> bool:
        """Whether the host process is still there."""
        if self.pid is None:
            return False
        if self.proc is not None:
            return self.proc.poll() is None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop the host (and with it every kernel it runs)."""
        pid, self.pid = self.pid, None
        (self.dir / "host-state.json").unlink(missing_ok=True)
        if pid is None:
            return
        if self.proc is not None:
            proc, self.proc = self.proc, None
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            return
        try:  # adopted: not our child, so signal it and wait for it to go
            os.kill(pid, signal.SIGTERM)
            for _ in range(200):
                os.kill(pid, 0)
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
