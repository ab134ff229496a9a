"""Finding, or starting, this user's local pool: one per user and machine, shared by notebooks."""

from __future__ import annotations

import fcntl
import os
import secrets
import sys
from pathlib import Path

import httpx
from jupyter_core.paths import jupyter_runtime_dir

from ._http import tls_context
from ._process import read_json, running, spawn, stop
from .errors import HostStartError

__all__ = ["local_pool", "stop_local_pool"]

RUNTIME_FILE = "cloudgpu-pool.json"


def _alive(info: dict[str, object]) -> bool:
    try:
        if not running(int(info["pid"])):  # type: ignore[call-overload]
            return False
        response = httpx.get(f"{info['url']}/api/pool", timeout=5, verify=tls_context(),
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
        try:
            info = read_json(info_path)
        except (OSError, ValueError):
            info = {}
        if _alive(info):
            return str(info["url"]), str(info["token"])
        token = secrets.token_hex(24)
        _, info = spawn(
            [sys.executable, "-m", "cloudgpu", "pool", "--backend=local", "--port=0",
             f"--info-file={info_path}"],
            env=dict(os.environ, CLOUDGPU_POOL_TOKEN=token), info_path=info_path,
            log_path=runtime / "cloudgpu-pool.log", what="The local cloudgpu pool",
            timeout=start_timeout, start_new_session=True,
        )
        return str(info["url"]), str(info["token"])


def stop_local_pool(timeout: float = 30.0) -> int | None:
    """Stop this user's local pool (its sessions, host and kernels with it); its pid, or None.

    Raises:
        HostStartError: when it does not exit within ``timeout`` seconds.
    """
    try:
        pid = int(read_json(Path(jupyter_runtime_dir()) / RUNTIME_FILE)["pid"])
    except (OSError, ValueError, KeyError):
        return None
    if not running(pid):
        return None
    if not stop(pid, grace=timeout, kill=False):
        raise HostStartError(f"The local pool (pid {pid}) did not stop within {timeout:.0f} s.")
    return pid
