"""Finding, or starting, this user's local pool: one per user and machine, shared by notebooks."""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from jupyter_core.paths import jupyter_runtime_dir

from ._http import _tls
from .errors import HostStartError

__all__ = ["local_pool", "stop_local_pool"]

RUNTIME_FILE = "cloudgpu-pool.json"


def _alive(info: dict[str, object]) -> bool:
    try:
        os.kill(int(info["pid"]), 0)  # type: ignore[call-overload]
        response = httpx.get(f"{info['url']}/api/pool", timeout=5, verify=_tls(),
                             headers={"Authorization": f"token {info['token']}"})
    except (OSError, KeyError, ValueError, httpx.HTTPError):
        return False
    return response.status_code == 200


def local_pool(start_timeout: float = 90.0) -> tuple[str, str]:
    """The URL and token of this user's local pool, starting it if none runs.

    The pool runs detached (it outlives the notebook that started it, and serves every
    notebook of this user), with the ``local`` backend and ``$CLOUDGPU_SIMULATE``.
    Its runtime file, ``cloudgpu-pool.json`` in Jupyter's runtime folder, is mode 0600.

    Raises:
        HostStartError: when the pool does not come up; the message quotes its log.
    """
    runtime = Path(jupyter_runtime_dir())
    runtime.mkdir(parents=True, exist_ok=True)
    info_path = runtime / RUNTIME_FILE
    with open(runtime / f"{RUNTIME_FILE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two notebooks starting at once get one pool
        if info_path.exists():
            info = json.loads(info_path.read_text() or "{}")
            if _alive(info):
                return str(info["url"]), str(info["token"])
            info_path.unlink()
        token = secrets.token_hex(24)
        log_path = runtime / "cloudgpu-pool.log"
        env = dict(os.environ, CLOUDGPU_POOL_TOKEN=token)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cloudgpu", "pool", "--backend=local", "--port=0",
                 f"--info-file={info_path}"],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + start_timeout
        while not info_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.kill()
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
                raise HostStartError(
                    f"The local cloudgpu pool did not start (exit code {proc.poll()}). "
                    f"Its log ({log_path}) ends with:\n{tail}"
                )
            time.sleep(0.05)
        info = json.loads(info_path.read_text())
        return str(info["url"]), str(info["token"])


def stop_local_pool(timeout: float = 30.0) -> int | None:
    """Stop this user's local pool (its sessions, host and kernels with it); its pid, or None.

    Raises:
        HostStartError: when it does not exit within ``timeout`` seconds.
    """
    info_path = Path(jupyter_runtime_dir()) / RUNTIME_FILE
    try:
        pid = int(json.loads(info_path.read_text())["pid"])
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError, KeyError):
        return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        time.sleep(0.1)
    raise HostStartError(f"The local pool (pid {pid}) did not stop within {timeout:.0f} s.")
