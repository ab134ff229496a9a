"""A host the pool cannot reach for a while: the kernels of the sessions that ended
meanwhile are stopped once it answers again, and their GPUs are free; a notebook that
reaches such a kernel first is told that its session ended, not resumed there.

A real pool reaches a real host (simulated GPUs) through the test's TCP proxy; the test
cuts that path (``TcpProxy.block``: every connection reset, new ones refused) while it
ends a session, and mends it after. Nothing else stands in for anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cloudgpu.kernel import ProxyKernel
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.connect import write_connection_file
from kernel_driver import ok, run
from servers import HostFactory, HostProcess, PoolProcess, wait_until
from tcp_proxy import Rerouted, TcpProxy, port_of

from cloudgpu import _loop
from cloudgpu._core import SessionCore
from cloudgpu.client import Client
from cloudgpu.errors import RemoteKernelDiedError
from cloudgpu.hardware import parse_spec
from cloudgpu.host_client import HostClient
from cloudgpu.session import RemoteSession

pytestmark = pytest.mark.timeout(120)

#: The faults' quick pool (``conftest.FAST_POOL``), with the warm kernels it keeps.
QUICK_POOL = """\
c.PoolApp.cull_interval = 0.3
c.PoolApp.meter_interval = 0.3
c.PoolApp.heartbeat_interval = 0.5
c.PoolApp.disconnected_timeout = 0
c.PoolApp.warm_kernels = {warm}
"""
WARM_POOL = QUICK_POOL.format(warm="{'A100-80GB': 1}")


@contextlib.contextmanager
def warm_pool_behind_its_own_proxy(tmp: Path, host: HostProcess,
                                   ) -> Iterator[tuple[PoolProcess, TcpProxy]]:
    """A pool with a warm kernel, reaching the host through a proxy of its own: the other
    tests' outages do not touch it, nor its outage theirs."""
    proxy = TcpProxy(("127.0.0.1", port_of(host.url)))
    config = tmp / "warm_pool_config.py"
    config.write_text(WARM_POOL)
    try:
        pool = PoolProcess(tmp, [dataclasses.replace(host, url=proxy.url)], config,
                           name="warm").start()
        try:
            yield pool, proxy
        finally:
            pool.stop()
    finally:
        proxy.close()


def warm_kernel(host: HostProcess) -> str:
    """The pool's warm kernel: the one holding the host's A100, once there is one."""
    found: list[str] = []

    def held() -> bool:
        found[:] = [g["kernel_id"] for g in host.gpus()
                    if g["type"] == "A100-80GB" and g.get("kernel_id")]
        return bool(found)

    wait_until(held, within=60, what="the pool's warm A100 kernel")
    return found[0]


def api(pool: PoolProcess, method: str, path: str, **kw: Any) -> dict[str, Any]:
    response = pool.request(method, path, **kw)
    assert response.status_code in (200, 201), response.text
    return response.json()  # type: ignore[no-any-return]


def running_session(pool: PoolProcess, hardware: str) -> dict[str, Any]:
    """A new session on ``hardware``, once it runs."""
    sid = api(pool, "POST", "/api/sessions", json={"hardware": hardware})["id"]
    view: dict[str, Any] = {}

    def started() -> bool:
        view.update(api(pool, "GET", f"/api/sessions/{sid}"))
        return view["state"] not in ("queued", "starting")

    wait_until(started, within=60, what=f"session {sid} starting")
    assert view["state"] == "running", view
    return view


def held_by(host: HostProcess, kernel_id: str) -> int:
    """How many of the host's GPUs the kernel holds, as the host sees it."""
    return sum(1 for gpu in host.gpus() if gpu.get("kernel_id") == kernel_id)


def test_a_session_stopped_while_its_host_is_cut_off_has_its_kernel_stopped_after(
        proxied_pool: PoolProcess, proxy: TcpProxy, host: HostProcess) -> None:
    view = running_session(proxied_pool, "H100")
    kernel_id = view["kernel_id"]
    assert held_by(host, kernel_id) == 1
    with proxy.outage():
        ended = api(proxied_pool, "DELETE", f"/api/sessions/{view['id']}")
        assert ended["state"] == "stopped", ended
        # The stop did not reach the host: its kernel runs on, holding its GPU.
        assert host.kernel_alive(kernel_id) and held_by(host, kernel_id) == 1
    wait_until(lambda: not host.kernel_alive(kernel_id), within=60,
               what="the pool stopping the kernel once the host answered again")
    assert held_by(host, kernel_id) == 0
    proxied_pool.wait_for_log(f"Stopped kernel {kernel_id}")


def test_the_kernels_of_a_host_judged_lost_are_stopped_when_it_answers_again(
        tmp_path: Path, host: HostProcess) -> None:
    with warm_pool_behind_its_own_proxy(tmp_path, host) as (pool, proxy):
        view = running_session(pool, "H100")
        kernel_id, sid = view["kernel_id"], view["id"]
        warm = warm_kernel(host)
        with proxy.outage():
            # Two missed heartbeats, and the pool ends the session as lost (billing
            # stops); the host was only cut off, and its kernels run on.
            wait_until(lambda: api(pool, "GET", f"/api/sessions/{sid}")["state"] == "lost",
                       within=60, what="the pool judging the host lost")
            assert host.kernel_alive(kernel_id) and host.kernel_alive(warm)
        wait_until(lambda: not host.kernel_alive(kernel_id) and not host.kernel_alive(warm),
                   within=60, what="the pool stopping the lost session's kernel and its warm "
                                   "kernel once the host answered")
        assert held_by(host, kernel_id) == 0
        # The host takes sessions again, on the GPU the stray kernel held.
        again = running_session(pool, "H100")
        api(pool, "DELETE", f"/api/sessions/{again['id']}")


def test_a_notebook_reaching_its_kernel_again_after_the_pool_lost_the_host_is_not_resumed(
        proxied_pool: PoolProcess, proxy: TcpProxy, host: HostProcess, tmp_path: Path) -> None:
    """A partition cuts both the pool and the notebook off the host; the pool judges it lost
    and ends the session. The notebook reaches the kernel again first (the pool still
    cannot): it is told the pool's word, instead of resuming on a kernel nobody pays for,
    which the pool stops as soon as it reaches the host."""
    notebook_path = TcpProxy(("127.0.0.1", port_of(host.url)))
    back, printed = tmp_path / "back", []
    code = (f"import os, time\nprint('go', flush=True)\n"
            f"while not os.path.exists({str(back)!r}): time.sleep(0.01)\n"
            f"print('after', flush=True)")

    def sink(kind: str, payload: dict[str, Any]) -> None:
        if kind == "output" and payload.get("msg_type") == "stream":
            printed.append(payload["content"]["text"])
        elif kind == "notice":
            printed.append(f"[{payload['text']}]")

    async def until(done: Callable[[], bool], cell: asyncio.Future[Any]) -> None:
        while not done():
            await asyncio.wait([cell], timeout=0.01)
            assert not cell.done(), cell.exception()

    async def go() -> tuple[str, str]:
        provider = Rerouted(proxied_pool.url, proxied_pool.token, notebook_path.url)
        grant = await provider.acquire(parse_spec("cpu"))

        async def check() -> str | None:
            return await provider.ended_reason(grant)

        session = await RemoteSession.open(grant, check=check)
        try:
            cell = asyncio.ensure_future(session.run_cell(code, {}, [], sink))
            await until(lambda: "go" in "".join(printed), cell)
            await asyncio.to_thread(notebook_path.block)
            await until(lambda: not session.kernel.link.connected, cell)
            attempts = notebook_path.connections
            await asyncio.to_thread(notebook_path.hold, True)
            notebook_path.unblock()
            # A reconnection reaches the host, and waits in its handshake.
            await until(lambda: notebook_path.connections > attempts, cell)
            await asyncio.to_thread(proxy.block)  # the pool's path too
            await asyncio.to_thread(
                wait_until, lambda: api(proxied_pool, "GET", f"/api/sessions/"
                                        f"{grant.session_id}")["state"] == "lost",
                60, "the pool judging the host lost")
            back.touch()  # the kernel, cut off from the pool, ends the cell meanwhile
            await asyncio.to_thread(notebook_path.release)
            with pytest.raises(RemoteKernelDiedError) as info:
                await cell
            return str(info.value), grant.kernel_id
        finally:
            proxy.unblock()
            notebook_path.unblock()
            notebook_path.release()
            await session.close(shutdown=False)
            await provider.aclose()

    try:
        text, kernel_id = asyncio.run(go())
    finally:
        notebook_path.close()
    assert "the pool says: its machine was lost" in text, text
    assert "after" not in "".join(printed), (printed, text)
    wait_until(lambda: not host.kernel_alive(kernel_id), within=60,
               what="the pool stopping the stray kernel once it reaches the host")


@dataclasses.dataclass
class Restart:
    """A pool started again while one of its hosts is cut off."""

    pool: PoolProcess
    kept: dict[str, Any]  # the session the pool ran on the late host before
    late: HostProcess
    path: TcpProxy  # the pool's way to the late host
    began: float  # when the pool started again


@contextlib.contextmanager
def restarted_without_its_late_host(host_factory: HostFactory, tmp: Path, name: str,
                                    config: str = "") -> Iterator[Restart]:
    """Two hosts: ``{name}-early`` (H100) and ``{name}-late`` (H200, reached through a
    proxy). A static pool that runs an H200 session on the late one is killed, and starts
    again on its ledger while the proxy is blocked."""
    hosts = host_factory.start_many({f"{name}-early": "H100:1", f"{name}-late": "H200:1"})
    early, late = hosts[f"{name}-early"], hosts[f"{name}-late"]
    path = TcpProxy(("127.0.0.1", port_of(late.url)))
    config_file = tmp / f"{name}_pool_config.py"
    config_file.write_text(QUICK_POOL.format(warm="{}") + config)
    listed = [early, dataclasses.replace(late, url=path.url)]
    try:
        first = PoolProcess(tmp, listed, config_file, name=f"{name}-before").start()
        try:
            kept = running_session(first, "H200")
        finally:
            first.kill()
        path.block()
        began = time.time()
        pool = PoolProcess(tmp, listed, config_file, name=f"{name}-after", db=first.db).start()
        try:
            yield Restart(pool, kept, late, path, began)
        finally:
            pool.stop()
    finally:
        path.close()
        early.stop()
        late.stop()


def test_a_pool_starts_without_a_host_that_does_not_answer_and_adds_it_once_it_does(
        host_factory: HostFactory, tmp_path: Path) -> None:
    """A static pool restarts while one of its hosts is cut off: it starts with the others
    instead of not at all, keeps the session it had there (its heartbeat judges the host,
    as ever), and the late host's GPUs join once it answers, after the kernels left there
    that no session holds are stopped."""
    # Misses enough that the pool does not judge the late host lost within the test.
    with restarted_without_its_late_host(host_factory, tmp_path, "late",
                                         "c.PoolApp.heartbeat_misses = 1000\n") as it:
        pool, kept = it.pool, it.kept

        async def leave_a_kernel() -> str:  # behind the pool's back
            admin = HostClient(it.late.url, it.late.token)
            try:
                return str((await admin.start_kernel("cpu"))["id"])
            finally:
                await admin.aclose()

        left_behind = asyncio.run(leave_a_kernel())

        def total(gpu: str) -> int:
            hardware = api(pool, "GET", "/api/hardware")["hardware"]
            return int(next(h for h in hardware if h["type"] == gpu)["total"] or 0)

        assert (total("H100"), total("H200")) == (1, 0)
        pool.wait_for_log("does not answer: the pool starts without it")
        assert api(pool, "GET", f"/api/sessions/{kept['id']}")["state"] == "running"
        early_ask = pool.request("POST", "/api/sessions", json={"hardware": "H200:2"})
        assert early_ask.status_code >= 400, early_ask.text
        assert "1 host(s) it has not heard from yet" in early_ask.json()["message"]
        it.path.unblock()
        wait_until(lambda: total("H200") == 1, within=60,
                   what="the late host's GPU joining the pool")
        pool.wait_for_log("its GPUs join the pool (1x H200); stopped 1 kernel(s) left")
        assert not it.late.kernel_alive(left_behind)
        assert it.late.kernel_alive(kept["kernel_id"])
        assert api(pool, "GET", f"/api/sessions/{kept['id']}")["state"] == "running"
        api(pool, "DELETE", f"/api/sessions/{kept['id']}")
        again = running_session(pool, "H200")
        assert [g["kernel_id"] for g in it.late.gpus()] == [again["kernel_id"]]
        api(pool, "DELETE", f"/api/sessions/{again['id']}")


def test_a_session_kept_for_a_host_that_never_answers_is_lost_at_its_last_sighting(
        host_factory: HostFactory, tmp_path: Path) -> None:
    """The late host never comes back: the pool judges it lost, as any host, and bills the
    session it kept to when the pool last saw it, not to the restart."""
    with restarted_without_its_late_host(host_factory, tmp_path, "gone") as it:
        wait_until(lambda: api(it.pool, "GET", f"/api/sessions/{it.kept['id']}")["state"]
                   == "lost", within=60, what="the pool judging the silent host lost")
        view = api(it.pool, "GET", f"/api/sessions/{it.kept['id']}")
        assert view["stop_reason"].startswith("its machine was lost"), view
        assert view["ended"] < it.began, (view["ended"], it.began)


@pytest.mark.skipif(shutil.which("bwrap") is None,
                    reason="bubblewrap is not installed (apt-get install bubblewrap)")
def test_a_shared_pool_leaves_out_a_late_host_that_does_not_isolate_its_kernels(
        host_factory: HostFactory, tmp_path: Path) -> None:
    """What a shared pool refuses at its start (a host running kernels unsandboxed), it
    refuses from a host that joins later too."""
    sandboxed = host_factory.start("H100:1", name="sandboxed-early",
                                   args=["--isolation=bubblewrap"])
    open_host = host_factory.start("H200:1", name="open-late")
    path = TcpProxy(("127.0.0.1", port_of(open_host.url)))
    config = tmp_path / "shared_pool_config.py"
    config.write_text(QUICK_POOL.format(warm="{}"))
    try:
        path.block()
        pool = PoolProcess(tmp_path, [sandboxed, dataclasses.replace(open_host, url=path.url)],
                           config, name="shared", allow_unisolated=False).start()
        try:
            path.unblock()
            pool.wait_for_log(f"Host {path.url} runs kernels without isolation (none), and "
                              f"this pool is shared", within=60)
            pool.wait_for_log("it is left out")
            hardware = api(pool, "GET", "/api/hardware")["hardware"]
            h200 = next(h for h in hardware if h["type"] == "H200")
            assert h200["total"] == 0 and not h200["not_isolated"], h200
        finally:
            pool.stop()
    finally:
        path.close()
        sandboxed.stop()
        open_host.stop()


@dataclasses.dataclass
class Partition:
    """A pool over two hosts, reached through two proxies; only the pool's way to the
    first is cut (:meth:`cut`), while a notebook reaches that host directly."""

    pool: PoolProcess
    hosts: dict[str, HostProcess]  # "cut", "spare"
    cut_path: TcpProxy  # the pool's way to the host that is cut off
    spare_path: TcpProxy

    def client(self) -> Client:
        """A notebook's client: it reaches the host to be cut off directly."""
        return Client(Rerouted(self.pool.url, self.pool.token,
                               {self.cut_path.url: self.hosts["cut"].url}))

    def cut(self, session_id: str) -> None:
        """Add the spare host, cut the pool off the first, until it judges ``session_id``
        (on the first) lost."""
        self.spare_path.unblock()
        wait_until(lambda: sum(h["total"] or 0 for h in api(self.pool, "GET", "/api/hardware")
                               ["hardware"] if h["type"] == "H200") == 2, 60,
                   "the spare host joining")
        self.cut_path.block()
        wait_until(lambda: api(self.pool, "GET", f"/api/sessions/{session_id}")["state"]
                   == "lost", 60, "the pool judging the cut-off host lost")


@contextlib.contextmanager
def partitioned(host_factory: HostFactory, tmp: Path, name: str) -> Iterator[Partition]:
    """A :class:`Partition` whose first session goes to the host to be cut off."""
    hosts = host_factory.start_many({f"{name}-cut": "H200:1", f"{name}-spare": "H200:1"})
    hosts = {"cut": hosts[f"{name}-cut"], "spare": hosts[f"{name}-spare"]}
    cut_path = TcpProxy(("127.0.0.1", port_of(hosts["cut"].url)))
    spare_path = TcpProxy(("127.0.0.1", port_of(hosts["spare"].url)))
    config = tmp / f"{name}_pool_config.py"
    config.write_text(QUICK_POOL.format(warm="{}"))
    spare_path.block()  # so that the first session is on the host to be cut off
    try:
        pool = PoolProcess(tmp, [dataclasses.replace(hosts["cut"], url=cut_path.url),
                                 dataclasses.replace(hosts["spare"], url=spare_path.url)],
                           config, name=name).start()
        try:
            yield Partition(pool, hosts, cut_path, spare_path)
        finally:
            cut_path.unblock()
            pool.stop()
    finally:
        cut_path.close()
        spare_path.close()
        for host in hosts.values():
            host.stop()


def test_a_notebook_still_reaching_a_kernel_the_pool_lost_moves_to_a_new_session(
        host_factory: HostFactory, tmp_path: Path) -> None:
    """Only the pool is cut off a host: it judges the host lost and ends the session, while
    the notebook, whose connection never dropped, runs cells on a kernel nobody pays for.
    A cell's check with the pool tells it; the next cell runs on a new session."""
    said: list[str] = []

    def emit(kind: str, payload: Any) -> None:
        if kind == "notice":
            said.append(payload["text"])
        elif kind == "output" and payload.get("msg_type") == "stream":
            said.append(payload["content"]["text"])

    async def go(cut: Partition) -> tuple[str, str, str]:
        client = cut.client()
        try:
            core = SessionCore(client, parse_spec("H200"), key="H200")
            await core.open(emit)
            await core.run_cell(emit, "x = 1", {}, [])
            first = core.remote.grant
            assert first.host_url == cut.hosts["cut"].url, first
            await asyncio.to_thread(cut.cut, first.session_id)
            for _ in range(200):  # cells go on there until a check with the pool tells
                if any("the pool ended this" in text for text in said):
                    break
                await core.run_cell(emit, "import time\ntime.sleep(0.05)", {}, [])
            await core.run_cell(emit, "print('moved')", {}, [])
            return first.session_id or "", core.remote.grant.session_id or "", \
                core.remote.grant.host_url
        finally:
            cut.cut_path.unblock()
            await client.shutdown()
            await client.aclose()

    with partitioned(host_factory, tmp_path, "magic") as cut:
        old, new, where = asyncio.run(go(cut))
        spare = cut.spare_path.url
    told = [text for text in said if "the pool ended this" in text]
    assert len(told) == 1 and "its machine was lost" in told[0], said
    assert new != old and where == spare, (old, new, where)
    assert said[-1] == "moved\n", said


@contextlib.contextmanager
def cloud_gpu_kernel_in_this_process(client: Client, hardware: str,
                                     tmp: Path) -> Iterator[BlockingKernelClient]:
    """A Cloud GPU kernel (the ``ProxyKernel`` its launcher runs, on the same loop) with a
    client the test made, and a frontend talking to it over its ZMQ sockets on 127.0.0.1."""
    path = tmp / "cloud-gpu-kernel.json"
    write_connection_file(str(path), ip="127.0.0.1", key=secrets.token_hex(16).encode())

    async def create() -> ProxyKernel:
        return ProxyKernel(json.loads(path.read_text()), parse_spec(hardware), client=client)

    kernel = _loop.run_sync(create(), timeout=30)
    serving = _loop.submit(kernel.run())
    kc = BlockingKernelClient(connection_file=str(path))
    kc.load_connection_file()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        yield kc
    finally:
        kc.stop_channels()
        _loop.get_loop().call_soon_threadsafe(kernel.stop)
        serving.result(60)
        _loop.run_sync(client.aclose(), timeout=60)


def test_a_cloud_gpu_kernel_still_reaching_a_kernel_the_pool_lost_lets_it_go(
        host_factory: HostFactory, tmp_path: Path) -> None:
    """As above, for the Cloud GPU kernel: a cell's check with the pool tells it, and its
    cells fail with the pool's word (as when it loses its kernel) instead of running on."""
    with partitioned(host_factory, tmp_path, "kernel") as cut:
        client = cut.client()
        with cloud_gpu_kernel_in_this_process(client, "H200", tmp_path) as kc:
            ok(kc, "x = 1", timeout=90)
            grant = next(iter(client.sessions.values())).grant
            assert grant.host_url == cut.hosts["cut"].url, grant
            cut.cut(grant.session_id or "")
            for _ in range(200):  # cells go on there until a check with the pool tells
                ex = run(kc, "import time\ntime.sleep(0.05)")
                if ex.status != "ok":
                    break
            assert ex.status == "error" and ex.reply["ename"] == "RemoteKernelDiedError", \
                ex.describe()
            text = ex.reply["evalue"]
            assert "the pool ended this 1x H200 (simulated) session while its kernel still " \
                   "ran cells (its machine was lost" in text, text
            assert "Restart the kernel" in text, text
            again = run(kc, "print(x)")
            assert again.status == "error" and "the pool ended this" in again.tracebacks()
            assert "no remote kernel: the pool ended this" in ok(kc, "%cloudgpu status").stream()
            assert not client.sessions, "the kernel still holds the session the pool ended"
