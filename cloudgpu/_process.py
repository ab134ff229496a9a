"""Server processes cloudgpu starts and stops: the local pool, its host, and in tests both.

Every such server says it is ready by writing an info file (JSON: its URL, pid, ...) once
it listens; its output goes to a log, whose last lines a failed start quotes. A process is
stopped with grace: SIGTERM, a wait, then SIGKILL. Info and state files can hold tokens, so
they are written private (mode 0600) and atomically: a reader never sees half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import HostStartError

__all__ = [
    "log_tail",
    "read_json",
    "running",
    "spawn",
    "start",
    "stop",
    "wait_for_info",
    "wait_gone",
    "write_private_json",
]

_POLL = 0.02  # seconds between looks at a file or a pid while waiting for it
_PROCFS = Path("/proc/self/stat").exists()


def start(cmd: Sequence[str], *, log_path: str | Path, env: Mapping[str, str] | None = None,
          start_new_session: bool = False,
          preexec_fn: Callable[[], None] | None = None) -> subprocess.Popen[bytes]:
    """Start ``cmd`` with stdin closed and stdout and stderr appended to ``log_path``.

    Args:
        cmd: the command line.
        log_path: the log file, created if missing.
        env: the environment; this process's own by default.
        start_new_session: run it in a session of its own (signals to our process group,
            such as a kernel interrupt, then do not reach it).
        preexec_fn: called in the child before the command runs.
    """
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(cmd), env=None if env is None else dict(env), stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=start_new_session,
            preexec_fn=preexec_fn,
        )


def wait_for_info(proc: subprocess.Popen[bytes], info_path: str | Path, *,
                  log_path: str | Path, what: str, timeout: float = 60.0) -> dict[str, Any]:
    """Wait until ``proc`` writes its info file; return what it holds.

    Args:
        proc: the process that will write it.
        info_path: the file; it counts once it exists and holds a JSON object.
        log_path: the process's log, quoted when it fails to start.
        what: the process, to begin a sentence with (``"The local cloudgpu host"``).
        timeout: seconds to wait; then the process is stopped.

    Raises:
        HostStartError: when the process exits first, or writes nothing within ``timeout``;
            the message quotes the end of its log.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return read_json(info_path)
        except (OSError, ValueError):
            pass  # not there yet (or, from a writer less careful than ours, half written)
        if proc.poll() is not None:
            raise HostStartError(f"{what} exited with code {proc.returncode} while starting. "
                                 f"Its log ({log_path}) ends with:\n{log_tail(log_path)}")
        if time.monotonic() > deadline:
            stop(proc)
            raise HostStartError(f"{what} did not start within {timeout:.0f} s. "
                                 f"Its log ({log_path}) ends with:\n{log_tail(log_path)}")
        time.sleep(_POLL)


def spawn(cmd: Sequence[str], *, info_path: str | Path, log_path: str | Path, what: str,
          env: Mapping[str, str] | None = None, timeout: float = 60.0,
          start_new_session: bool = False, preexec_fn: Callable[[], None] | None = None,
          ) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start a server and wait until it is ready: :func:`start`, then :func:`wait_for_info`.

    An info file left by an earlier run is removed first, so it cannot pass for this one's.

    Returns:
        The process, and what its info file holds.

    Raises:
        HostStartError: when it does not start; the message quotes the end of its log.
    """
    Path(info_path).unlink(missing_ok=True)
    proc = start(cmd, log_path=log_path, env=env, start_new_session=start_new_session,
                 preexec_fn=preexec_fn)
    return proc, wait_for_info(proc, info_path, log_path=log_path, what=what, timeout=timeout)


def log_tail(path: str | Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log, or ``(no log)``."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop(target: subprocess.Popen[Any] | int, *, grace: float = 10.0, kill: bool = True) -> bool:
    """Stop a process with grace: SIGTERM, up to ``grace`` seconds, then SIGKILL.

    Args:
        target: a child process, or the pid of any process (one a run before ours left).
        grace: seconds it may take to shut down cleanly.
        kill: SIGKILL it when it is still there after ``grace``; with False, leave it.

    Returns:
        Whether it is gone.
    """
    if isinstance(target, subprocess.Popen):
        if target.poll() is not None:
            return True
        target.terminate()
        try:
            target.wait(grace)
            return True
        except subprocess.TimeoutExpired:
            if not kill:
                return False
            target.kill()
            target.wait()
            return True
    try:
        os.kill(target, signal.SIGTERM)
    except ProcessLookupError:
        return True
    if wait_gone(target, grace):
        return True
    if not kill:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(target, signal.SIGKILL)
    return wait_gone(target, grace)


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process; one that exited and awaits its parent's wait is not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: alive
        return True
    if not _PROCFS:  # os.kill cannot tell a zombie from a live process; take its word
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone just now
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_gone(pid: int, within: float) -> bool:
    """Wait up to ``within`` seconds for ``pid`` to end; whether it did."""
    deadline = time.monotonic() + within
    while running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL)
    return True


def write_private_json(path: str | Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as JSON that only this user can read, replacing ``path`` atomically."""
    tmp = Path(f"{path}.tmp")
    tmp.unlink(missing_ok=True)  # created afresh, so it gets mode 0600 whatever was there
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def read_json(path: str | Path) -> dict[str, Any]:
    """The JSON object in a file.

    Raises:
        OSError: when the file cannot be read.
        ValueError: when it does not hold a JSON object.
    """
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds {type(data).__name__}, not a JSON object")
    return data
