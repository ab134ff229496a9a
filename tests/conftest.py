"""Test-session setup shared by every test file.

Every test runs against private Jupyter folders, so the per-user local pool the client
starts (its runtime file, ledger and config) is this test session's own, never the
developer's. The pool config makes idleness checks fast enough to test. The only fake is
the GPU: a simulated inventory, ``CLOUDGPU_SIMULATE``, named as such in test names.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SIMULATE = "H100:1,A100-80GB:1"

POOL_CONFIG = """\
# Written by tests/conftest.py: fast idleness checks for the test session's local pool.
c.PoolApp.cull_interval = 0.5
c.PoolApp.meter_interval = 0.5
c.PoolApp.disconnected_timeout = 3
"""


def _stop(pid: int, within: float = 20) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session", autouse=True)
def private_jupyter_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point Jupyter's runtime, data and config folders at a temporary folder."""
    base = tmp_path_factory.mktemp("jupyter")
    env = {
        "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
        "JUPYTER_DATA_DIR": str(base / "data"),
        "JUPYTER_CONFIG_DIR": str(base / "config"),
        "CLOUDGPU_SIMULATE": SIMULATE,
    }
    (base / "config").mkdir()
    (base / "config" / "cloudgpu_pool_config.py").write_text(POOL_CONFIG)
    saved = {k: os.environ.get(k) for k in [*env, "CLOUDGPU_POOL", "CLOUDGPU_TOKEN"]}
    os.environ.update(env)
    os.environ.pop("CLOUDGPU_POOL", None)
    os.environ.pop("CLOUDGPU_TOKEN", None)
    try:
        yield base
    finally:
        info = base / "runtime" / "cloudgpu-pool.json"
        if info.exists():  # the local pool the tests' kernels started; it stops its host
            _stop(json.loads(info.read_text())["pid"])
        host_state = base / "runtime" / "cloudgpu-local-host" / "host-state.json"
        if host_state.exists():
            _stop(json.loads(host_state.read_text())["pid"])
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
