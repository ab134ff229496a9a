"""Dropped connections between a client and a real host: nothing lost, nothing doubled.

A real ``cloudgpu host`` (simulated GPUs), reached through a TCP proxy the test controls
(``tcp_proxy.py``): the proxy resets connections, as a network that goes away does, and
refuses new ones during an outage. The client is cloudgpu's own session layer
(``RemoteSession`` on ``RemoteKernel``), exactly what ``%%remote`` and the Cloud GPU kernel
drive (their own tests through the proxy are in test_front_ends_reconnect.py). Where the
pool's word matters (a session it keeps or stopped while the client was cut off), a real
pool reaches the host directly and only the client goes through the proxy. Every drop is
triggered by an event the test sees (an output line, transfer progress, a notice), never
by time.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from servers import HostFactory, HostProcess, PoolProcess
from tcp_proxy import Rerouted, TcpProxy, port_of

from cloudgpu._core import SessionCore
from cloudgpu._http import async_client
from cloudgpu.client import Client
from cloudgpu.errors import HostConnectionError
from cloudgpu.hardware import parse_spec
from cloudgpu.host_client import HostClient
from cloudgpu.provider import Grant
from cloudgpu.serialize import dumps, loads
from cloudgpu.session import CellResult, RemoteSession

pytestmark = pytest.mark.timeout(120)


class Cell:
    """What one remote cell sent back, as the session's sink saw it."""

    def __init__(self, on_line: Callable[[str], None] | None = None) -> None:
        self.lines: list[str] = []
        self.notices: list[str] = []
        self.progress: list[dict[str, Any]] = []
        self._partial = ""
        self._on_line = on_line
        self.on_progress: Callable[[dict[str, Any]], None] | None = None

    def sink(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "notice":
            self.notices.append(payload["text"])
        elif kind == "progress":
            self.progress.append(payload)
            if self.on_progress is not None:
                self.on_progress(payload)
        elif payload["msg_type"] == "stream":
            self._partial += payload["content"]["text"]
            *done, self._partial = self._partial.split("\n")
            for line in done:
                self.lines.append(line)
                if self._on_line is not None:
                    self._on_line(line)


async def open_through(proxy: TcpProxy, host: HostProcess, hardware: str = "cpu",
                       reconnect_timeout: float = 60) -> tuple[RemoteSession, HostClient]:
    admin = HostClient(host.url, host.token)
    model = await admin.start_kernel(hardware)
    grant = Grant(proxy.url, host.token, model["id"], hardware)
    session = await RemoteSession.open(grant, reconnect_timeout=reconnect_timeout)
    return session, admin


async def close(session: RemoteSession, admin: HostClient) -> None:
    await session.close(shutdown=False)
    await admin.shutdown(session.kernel_id)
    await admin.aclose()


def in_thread(action: Callable[[], object]) -> None:
    """Run ``action`` off the event loop (the proxy's own calls block until done)."""
    threading.Thread(target=action, daemon=True).start()


def test_output_survives_a_drop_mid_stream_complete_in_order_once(
        proxy: TcpProxy, host: HostProcess) -> None:
    dropped: list[int] = []

    def on_line(line: str) -> None:
        if line == "line 20" and not dropped:
            dropped.append(1)
            in_thread(proxy.drop)

    async def go() -> tuple[CellResult, Cell, int]:
        session, admin = await open_through(proxy, host)
        try:
            cell = Cell(on_line)
            result = await session.run_cell(
                "import time\nfor i in range(200):\n    print('line', i, flush=True)\n"
                "    time.sleep(0.005)\nanswer = 42", {}, ["answer"], cell.sink)
            return result, cell, session.kernel.link.reconnects
        finally:
            await close(session, admin)

    result, cell, reconnects = asyncio.run(go())
    assert dropped, "the drop never happened"
    assert result.status == "ok", result.error
    assert cell.lines == [f"line {i}" for i in range(200)]
    assert loads(result.pulled["answer"].codec, result.pulled["answer"].frames) == 42
    assert reconnects >= 1
    assert any("dropped" in n for n in cell.notices), cell.notices
    assert any("reconnected" in n and "nothing was lost" in n for n in cell.notices), cell.notices


def test_inputs_and_outputs_survive_drops_during_a_64_mb_transfer(
        proxy: TcpProxy, host: HostProcess) -> None:
    """A drop while sending, and another while receiving: the value arrives whole."""
    rng = np.random.default_rng(7)
    big = rng.integers(0, 2**62, size=8 * 2**20, dtype=np.int64)  # 64 MiB
    drops: dict[str, int] = {}

    def on_progress(info: dict[str, Any]) -> None:
        direction = info["direction"]
        if direction not in drops and info["done"] >= info["total"] // 3:
            drops[direction] = proxy.drop()

    async def go() -> tuple[CellResult, Cell]:
        session, admin = await open_through(proxy, host)
        try:
            cell = Cell()
            cell.on_progress = on_progress
            result = await session.run_cell("doubled = big * 2", {"big": dumps(big, "big")},
                                            ["doubled"], cell.sink)
            return result, cell
        finally:
            await close(session, admin)

    result, cell = asyncio.run(go())
    assert set(drops) == {"push", "pull"}, drops
    assert result.status == "ok", (result.error, result.push_errors)
    back = loads(result.pulled["doubled"].codec, result.pulled["doubled"].frames)
    np.testing.assert_array_equal(back, big * 2)
    assert sum("reconnected" in n for n in cell.notices) >= 2, cell.notices


def test_an_outage_longer_than_the_replay_buffer_says_how_much_was_lost(
        host_factory: HostFactory, tmp_path: Path) -> None:
    """A host that keeps only 5 frames per session; 40 lines are printed during an outage.

    The test and the kernel take turns through files, so the kernel shares the test's
    filesystem: no sandbox, whatever CLOUDGPU_TEST_ISOLATION says."""
    small = host_factory.start(None, name="small-buffer",
                               args=["--GPUKernelManager.replay_max_frames=5",
                                     "--isolation=none"])
    proxy = TcpProxy(("127.0.0.1", port_of(small.url)))
    go_file, printed = tmp_path / "go", tmp_path / "printed"

    def on_line(line: str) -> None:
        if line == "waiting":
            def outage() -> None:
                proxy.block()
                go_file.touch()  # the kernel prints its 40 lines into the outage
                while not printed.exists():
                    threading.Event().wait(0.02)
                proxy.unblock()
            in_thread(outage)

    code = (f"import os, time\nprint('waiting', flush=True)\n"
            f"while not os.path.exists({str(go_file)!r}): time.sleep(0.01)\n"
            f"for i in range(40): print('lost?', i, flush=True)\n"
            f"time.sleep(0.3)\nopen({str(printed)!r}, 'w').close()\nprint('after', flush=True)")

    async def go() -> tuple[CellResult, Cell]:
        session, admin = await open_through(proxy, small)
        try:
            cell = Cell(on_line)
            return await session.run_cell(code, {}, [], cell.sink), cell
        finally:
            await close(session, admin)

    try:
        result, cell = asyncio.run(go())
    finally:
        proxy.close()
        small.stop()
    assert result.status == "ok", result.error
    assert cell.lines[0] == "waiting" and cell.lines[-1] == "after", cell.lines
    lost_notices = [n for n in cell.notices if "were lost" in n]
    assert lost_notices, cell.notices
    count = int(lost_notices[0].split(";")[1].split()[0])
    assert count > 0
    # What arrived is in order, and what did not is counted: none missing unexplained.
    received = [int(line.split()[1]) for line in cell.lines if line.startswith("lost?")]
    assert received == sorted(received)


def test_the_cell_fails_clearly_when_the_host_stays_unreachable(
        proxy: TcpProxy, host: HostProcess) -> None:
    async def go() -> str:
        session, admin = await open_through(proxy, host, reconnect_timeout=1.0)
        try:
            cell = Cell(lambda line: in_thread(proxy.block) if line == "go" else None)
            with pytest.raises(Exception) as info:
                await session.run_cell("print('go', flush=True)\nimport time\ntime.sleep(30)",
                                       {}, [], cell.sink)
            return f"{type(info.value).__name__}: {info.value}"
        finally:
            proxy.unblock()
            await close(session, admin)

    text = asyncio.run(go())
    assert text.startswith("HostConnectionError"), text
    assert "could not be made again within 1 s" in text, text


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, host: HostProcess) -> Iterator[PoolProcess]:
    """A pool that reaches the module's host directly: cutting the proxy cuts a client off
    its kernel, while the pool still hears the host and can say the session runs."""
    tmp = tmp_path_factory.mktemp("direct-pool")
    config = tmp / "pool_config.py"
    config.write_text("c.PoolApp.heartbeat_interval = 0.5\nc.PoolApp.warm_kernels = {}\n")
    started = PoolProcess(tmp, [host], config).start()
    yield started
    started.stop()


@contextlib.asynccontextmanager
async def keyed_core(proxy: TcpProxy, pool: PoolProcess,
                     **settings: Any) -> AsyncIterator[SessionCore]:
    """A core on a cpu session kept under a key, as ``%%remote`` drives one, whose host is
    reached through the proxy; ``settings`` are the client's."""
    client = Client(Rerouted(pool.url, pool.token, proxy.url), **settings)
    try:
        yield SessionCore(client, parse_spec("cpu"), key="cpu")
    finally:
        await client.shutdown()
        await client.aclose()


async def while_running(cell: asyncio.Future[Any], until: Callable[[], bool]) -> None:
    """Until ``until()`` holds; the cell must still be running meanwhile."""
    while not until():
        await asyncio.wait([cell], timeout=0.01)
        assert not cell.done(), cell.exception()


def test_a_running_cell_is_waited_for_past_the_reconnect_timeout_while_the_pool_keeps_it(
        proxy: TcpProxy, pool: PoolProcess, tmp_path: Path) -> None:
    """A network away for longer than ``reconnect_timeout`` in the middle of a long cell:
    the cell goes on over there, the notebook keeps trying (saying so) for as long as the
    pool keeps the session, and gets all of the cell once it is back."""
    back, over = tmp_path / "back", threading.Event()

    def on_line(line: str) -> None:
        if line == "go":
            def outage() -> None:
                proxy.block()
                while not over.is_set() and \
                        not any("still reconnecting" in n for n in cell.notices):
                    over.wait(0.02)
                back.touch()  # the cell ends during the outage
                proxy.unblock()
            in_thread(outage)

    code = (f"import os, time\nprint('go', flush=True)\n"
            f"while not os.path.exists({str(back)!r}): time.sleep(0.01)\n"
            f"print('after', flush=True)\nanswer = 42")
    cell = Cell(on_line)

    async def go() -> CellResult:
        provider = Rerouted(pool.url, pool.token, proxy.url)
        grant = await provider.acquire(parse_spec("cpu"))

        async def check() -> str | None:
            return await provider.ended_reason(grant)

        session = await RemoteSession.open(grant, check=check, reconnect_timeout=1.0)
        try:
            return await session.run_cell(code, {}, ["answer"], cell.sink)
        finally:
            over.set()  # the outage ends, whatever became of the cell
            proxy.unblock()
            await session.close()
            await provider.release(grant)
            await provider.aclose()

    result = asyncio.run(go())
    assert result.status == "ok", result.error
    assert cell.lines == ["go", "after"], cell.lines
    assert loads(result.pulled["answer"].codec, result.pulled["answer"].frames) == 42
    waiting = [n for n in cell.notices if "still reconnecting" in n]
    assert len(waiting) == 1 and "keeps trying for as long as the pool keeps" in waiting[0], \
        cell.notices
    assert any("nothing was lost" in n for n in cell.notices), cell.notices


def test_a_cell_queued_through_an_outage_for_a_session_stopped_meanwhile_runs_on_a_new_one(
        proxy: TcpProxy, pool: PoolProcess) -> None:
    """A cell sent while the connection is down waits in the client; the pool stops the
    session meanwhile. Nothing of the cell left the notebook, so it runs on a new session
    (as ``%%remote`` cells do, keyed by hardware), saying why the old one ended."""
    said: list[tuple[str, Any]] = []

    def emit(kind: str, payload: Any) -> None:
        said.append((kind, payload))

    async def go() -> tuple[CellResult, str | None, str | None]:
        async with keyed_core(proxy, pool) as core:
            await core.open(emit)
            await core.run_cell(emit, "x = 1", {}, [])
            old = core.remote
            await asyncio.to_thread(proxy.block)
            try:
                while old.kernel.link.connected:  # until the link has seen the drop
                    await asyncio.sleep(0.01)
                queued = old.kernel.link.sent
                cell = asyncio.ensure_future(core.run_cell(emit, "print(41 + 1)", {}, []))
                # the execute request waits in the link
                await while_running(cell, lambda: old.kernel.link.sent > queued)
                stop = await asyncio.to_thread(pool.request, "DELETE",
                                               f"/api/sessions/{old.grant.session_id}")
                assert stop.status_code == 200, stop.text
            finally:
                await asyncio.to_thread(proxy.unblock)
            result = await cell
            return result, old.grant.session_id, core.remote.grant.session_id

    result, old, new = asyncio.run(go())
    assert result.status == "ok", result.error
    assert new != old
    printed = "".join(p["content"]["text"] for kind, p in said
                      if kind == "output" and p.get("msg_type") == "stream")
    assert printed == "42\n", said
    status = [p[1] for kind, p in said if kind == "status"]
    assert any("previous one was stopped: stopped by its owner" in s for s in status), status


def test_interrupting_a_cell_waited_for_past_the_reconnect_timeout_stops_the_wait(
        proxy: TcpProxy, pool: PoolProcess, tmp_path: Path) -> None:
    """Past ``reconnect_timeout``, a cell the notebook waits on for (its kernel runs it
    without us) is given up when the user interrupts, since the host cannot be reached to
    interrupt it: the cell fails at once, saying so, instead of waiting for ever."""
    said: list[tuple[str, Any]] = []
    notices: list[str] = []

    def emit(kind: str, payload: Any) -> None:
        said.append((kind, payload))
        if kind == "notice":
            notices.append(payload["text"])

    async def go() -> str:
        async with keyed_core(proxy, pool, reconnect_timeout=1.0) as core:
            await core.open(emit)
            cell = asyncio.ensure_future(core.run_cell(
                emit, "print('go', flush=True)\nimport time\ntime.sleep(60)", {}, []))
            await while_running(cell, lambda: any(
                kind == "output" and p.get("msg_type") == "stream" for kind, p in said))
            await asyncio.to_thread(proxy.block)
            try:
                await while_running(cell, lambda: any("still reconnecting" in n
                                                      for n in notices))
                await core.interrupt()
                done, _ = await asyncio.wait([cell], timeout=30)
                assert done, "the cell still waits after the interrupt"
            finally:
                await asyncio.to_thread(proxy.unblock)
            with pytest.raises(HostConnectionError) as info:
                cell.result()
            return str(info.value)

    text = asyncio.run(go())
    assert "could not be made again, and you stopped waiting for it" in text, text
    assert "interrupt to stop waiting" in " ".join(notices), notices


def test_a_connection_the_host_was_too_busy_to_accept_is_tried_again(host: HostProcess) -> None:
    """A host whose accept queue stays full for a while (a burst of kernel starts on a
    loaded machine) fails the first connection; it is tried again at once, and the request
    goes through. Every client of a host or a pool is made by ``async_client``."""
    busy = TcpProxy(("127.0.0.1", port_of(host.url)), accepting=False)
    events: list[str] = []

    async def trace(event: str, info: dict[str, Any]) -> None:
        events.append(event)
        if event.endswith("connect_tcp.failed"):  # the host gets round to accepting
            busy.start_accepting()

    async def traced(request: httpx.Request) -> None:
        request.extensions["trace"] = trace

    async def go() -> dict[str, Any]:
        client = async_client(busy.url, host.token, httpx.Timeout(30.0, connect=2.0))
        client.event_hooks["request"] = [traced]
        async with client:
            response = await client.get("/api/cloudgpu/host")
        response.raise_for_status()
        return dict(response.json())

    try:
        info = asyncio.run(go())
    finally:
        busy.close()
    assert info["inventory"]["simulated"] is True
    assert [e.rsplit(".", 1)[1] for e in events if "connect_tcp" in e] == \
        ["started", "failed", "started", "complete"]
