"""Shared by the fault tests: a proxy the test controls, a pool behind it, kernelspecs.

Everything is a real process (host, pool, kernels); the network between them is the one
thing a test breaks, through ``tcp_proxy.TcpProxy`` on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import HostProcess, PoolProcess
from tcp_proxy import TcpProxy, port_of

FAST_POOL = """\
# tests/faults: quick checks, so that faults are noticed in a test's time.
c.PoolApp.cull_interval = 0.3
c.PoolApp.meter_interval = 0.3
c.PoolApp.heartbeat_interval = 0.5
c.PoolApp.disconnected_timeout = 0
c.PoolApp.warm_kernels = {}
"""


@pytest.fixture(scope="module")
def proxy(host: HostProcess) -> Iterator[TcpProxy]:
    """A TCP proxy in front of the module's host."""
    started = TcpProxy(("127.0.0.1", port_of(host.url)))
    yield started
    started.close()


@pytest.fixture(scope="module")
def proxied_pool(tmp_path_factory: pytest.TempPathFactory, host: HostProcess,
                 proxy: TcpProxy) -> Iterator[PoolProcess]:
    """A static pool whose one host is reached through the proxy: the grants it hands out
    point there, so every notebook's connection to the host crosses the proxy."""
    tmp = tmp_path_factory.mktemp("proxied-pool")
    config = tmp / "pool_config.py"
    config.write_text(FAST_POOL)
    through = dataclasses.replace(host, url=proxy.url)
    pool = PoolProcess(tmp, [through], config).start()
    yield pool
    pool.stop()


@pytest.fixture(scope="module")
def kernelspecs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The Cloud GPU kernelspecs (CPU, H100) under a prefix Jupyter searches."""
    from cloudgpu.kernel import install_kernelspecs

    prefix = tmp_path_factory.mktemp("kernel-prefix")
    saved = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [str(prefix / "share" / "jupyter"), *filter(None, [saved])])
    install_kernelspecs(["H100"], prefix=str(prefix))
    try:
        yield prefix
    finally:
        if saved is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = saved
