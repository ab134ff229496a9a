"""A side channel (cloudgpu._side) dropped mid-transfer: the value arrives right, or not at all.

Through the TCP proxy the test controls (tcp_proxy.py), a real host and kernel. The drop
is triggered by the transfer's own progress (its first report, with bytes still to go),
never by time, and resets the side connection alone (the newest through the proxy): the
kernel websocket stays up, as when a middlebox cuts one long transfer.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import numpy as np
import pytest
from servers import HostProcess
from tcp_proxy import TcpProxy
from test_dropped_connections import close, open_through

from cloudgpu.serialize import dumps, loads
from cloudgpu.session import RemoteSession

pytestmark = pytest.mark.timeout(180)

N = 16 * 2**20  # float64s: 128 MiB, a transfer with many progress reports


class DropOnProgress:
    """A cell's sink that resets the side connection at the first progress report in
    ``direction`` with bytes still to go."""

    def __init__(self, proxy: TcpProxy, direction: str) -> None:
        self.proxy = proxy
        self.direction = direction
        self.dropped: list[int] = []

    def __call__(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "progress" and payload["direction"] == self.direction \
                and not self.dropped and payload["done"] < payload["total"]:
            self.dropped.append(self.proxy.drop_latest())


async def side_of(session: RemoteSession) -> Any:
    side = await session.kernel.side_channel()
    assert side is not None, session.kernel.side_off
    return side


def test_a_push_whose_side_connection_drops_arrives_whole_or_is_sent_again(
        proxy: TcpProxy, host: HostProcess) -> None:
    x = np.random.default_rng(1).standard_normal(N)

    async def go() -> None:
        session, admin = await open_through(proxy, host)
        try:
            side = await side_of(session)
            drop = DropOnProgress(proxy, "push")
            result = await session.run_cell(
                "import hashlib\nd = hashlib.sha256(x).hexdigest()", {"x": dumps(x, "x")},
                ["d"], drop)
            assert drop.dropped == [1], "the side connection was gone before the drop"
            assert side.broken is not None  # it did break under the transfer
            assert result.status == "ok", result.error
            assert not result.push_errors
            assert loads("cloudpickle", result.pulled["d"].frames) == \
                hashlib.sha256(x).hexdigest()
            # The next big value takes a new side channel.
            again = await session.run_cell("d = hashlib.sha256(x).hexdigest()",
                                           {"x": dumps(x[::-1].copy(), "x")}, ["d"],
                                           lambda kind, payload: None)
            assert loads("cloudpickle", again.pulled["d"].frames) == \
                hashlib.sha256(x[::-1].copy()).hexdigest()
            assert (await side_of(session)) is not side
        finally:
            await close(session, admin)

    asyncio.run(go())


def test_a_pull_whose_side_connection_drops_comes_back_right(
        proxy: TcpProxy, host: HostProcess) -> None:
    expected = np.random.default_rng(2).standard_normal(N)

    async def go() -> None:
        session, admin = await open_through(proxy, host)
        try:
            side = await side_of(session)
            drop = DropOnProgress(proxy, "pull")
            result = await session.run_cell(
                f"import numpy as np\ny = np.random.default_rng(2).standard_normal({N})", {},
                ["y"], drop)
            assert drop.dropped == [1], "the side connection was gone before the drop"
            assert side.broken is not None
            assert result.status == "ok", result.error
            y = loads("cloudpickle", result.pulled["y"].frames)
            assert y.dtype == expected.dtype and np.array_equal(y, expected)
        finally:
            await close(session, admin)

    asyncio.run(go())
