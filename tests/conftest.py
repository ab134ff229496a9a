"""Test-session setup and the fixtures shared by the test files.

Every test runs against private Jupyter folders, so the per-user local pool the client
starts (its runtime file, ledger and config) is this test session's own, never the
developer's. The pool config makes idleness checks fast enough to test, and sandboxes its
kernels as ``CLOUDGPU_TEST_ISOLATION`` says (``none`` by default, as for any one user's own
pool). The only fake is the GPU: a simulated inventory, ``CLOUDGPU_SIMULATE``, named as such
in test names.

``host_factory`` and ``host`` hand out real ``cloudgpu host`` processes (see servers.py),
one set per test module, since starting them is the slow part.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import ISOLATION, HostFactory, HostProcess, LabProcess

from cloudgpu._process import read_json, stop

SIMULATE = "H100:1,A100-80GB:1"
#: The inventory of the `host` fixture.
HOST_INVENTORY = "H100:2,A100-80GB:1"

POOL_CONFIG = """\
# Written by tests/conftest.py: fast idleness checks for the test session's local pool.
c.PoolApp.cull_interval = 0.5
c.PoolApp.meter_interval = 0.5
c.PoolApp.disconnected_timeout = 3
c.LocalBackend.isolation = "{ISOLATION}"
"""


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
    (base / "config" / "cloudgpu_pool_config.py").write_text(
        POOL_CONFIG.replace("{ISOLATION}", ISOLATION))
    saved = {k: os.environ.get(k) for k in [*env, "CLOUDGPU_POOL", "CLOUDGPU_TOKEN"]}
    os.environ.update(env)
    os.environ.pop("CLOUDGPU_POOL", None)
    os.environ.pop("CLOUDGPU_TOKEN", None)
    try:
        yield base
    finally:
        info = base / "runtime" / "cloudgpu-pool.json"
        if info.exists():  # the local pool the tests' kernels started; it stops its host
            stop(read_json(info)["pid"], grace=20)
        host_state = base / "runtime" / "cloudgpu-local-host" / "host-state.json"
        if host_state.exists():
            stop(read_json(host_state)["pid"], grace=20)
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@pytest.fixture(scope="module")
def host_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostFactory]:
    """Starts real `cloudgpu host` processes for one test module; stops them after it."""
    factory = HostFactory(tmp_path_factory.mktemp("hosts"))
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def host(host_factory: HostFactory) -> Iterator[HostProcess]:
    """A real `cloudgpu host` with a simulated inventory (HOST_INVENTORY), logging every
    request at DEBUG, shared by one test module."""
    # Its tests present wrong tokens on purpose; the throttle on them has its own test.
    started = host_factory.start(HOST_INVENTORY, log_level="DEBUG",
                                 args=["--HostIdentityProvider.bad_tokens_allowed=1000"])
    yield started
    started.stop()
    assert not started.info.exists(), "the info file outlived the host"


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabProcess]:
    """A real JupyterLab with cloudgpu's server extension, on the test session's local pool
    (simulated GPUs), serving an empty temporary folder; shared by the lab tests."""
    root = tmp_path_factory.mktemp("lab-root")
    started = LabProcess(root, tmp_path_factory.mktemp("lab")).start()
    yield started
    started.stop()
