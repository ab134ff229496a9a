"""Kernels, hosts, pools and clients that die: cells fail saying what happened, no GPU bills
for nobody, the ledger is exact.

Real processes throughout: hosts with simulated GPUs, static pools with their SQLite
ledgers, local ipykernels with ``%load_ext cloudgpu``. Each death is caused by the test
(``os._exit`` in the remote cell, SIGKILL to a host or a pool, a client that exits without
releasing), at a moment the test sees (a line of output arriving).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from kernel_driver import CLIENT, Message, ok, run, start_kernel, stop_kernel, value, vanish
from servers import HostFactory, HostProcess, PoolProcess, wait_until

from cloudgpu._format import away as away_text
from cloudgpu.errors import RemoteKernelDiedError
from cloudgpu.host_client import HostClient
from cloudgpu.provider import Grant
from cloudgpu.session import RemoteSession

pytestmark = pytest.mark.timeout(120)

POOL_CONFIG = """\
c.PoolApp.cull_interval = 0.3
c.PoolApp.meter_interval = 0.3
c.PoolApp.heartbeat_interval = 0.5
c.PoolApp.disconnected_timeout = {grace}
c.PoolApp.busy_disconnected_timeout = {busy_limit}
c.PoolApp.warm_kernels = {{}}
"""


def pool_over(tmp: Path, hosts: list[HostProcess], name: str = "pool", grace: float = 0,
              db: Path | None = None, busy_limit: float = 0) -> PoolProcess:
    config = tmp / f"{name}_config.py"
    config.write_text(POOL_CONFIG.format(grace=grace, busy_limit=busy_limit))
    return PoolProcess(tmp, hosts, config, name=name, db=db).start()


def sessions(pool: PoolProcess, all: bool = True) -> dict[str, dict[str, Any]]:
    response = pool.request("GET", "/api/sessions", params={"all": 1} if all else {})
    assert response.status_code == 200, response.text
    return {s["id"]: s for s in response.json()["sessions"]}


def session_of(kc: BlockingKernelClient, spec: str) -> str:
    sid: str = value(kc, f"{CLIENT}.sessions[{spec!r}].grant.session_id")
    return sid


def notebook_on(pool: PoolProcess) -> tuple[Any, BlockingKernelClient]:
    km, kc = start_kernel(CLOUDGPU_POOL=pool.url, CLOUDGPU_TOKEN=pool.token)
    ok(kc, "%load_ext cloudgpu")
    return km, kc


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, host: HostProcess) -> Iterator[PoolProcess]:
    started = pool_over(tmp_path_factory.mktemp("deaths"), [host])
    yield started
    started.stop()


@pytest.fixture(scope="module")
def notebook(pool: PoolProcess) -> Iterator[BlockingKernelClient]:
    km, kc = notebook_on(pool)
    try:
        yield kc
    finally:
        stop_kernel(km, kc)


@pytest.mark.parametrize(("code", "says"), [
    ("import os\nos._exit(3)", "died: it exited with code 3"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
     "died: killed by signal 9 (SIGKILL); out of memory, perhaps"),
])
def test_a_dead_remote_kernel_fails_the_cell_frees_its_simulated_gpu_and_stops_billing(
        notebook: BlockingKernelClient, pool: PoolProcess, host: HostProcess, code: str,
        says: str) -> None:
    kc = notebook
    ok(kc, "%%remote gpu=H100 --new\nprint('up')", timeout=90)
    first = session_of(kc, "H100")
    sent = time.time()
    ex = run(kc, "%%remote gpu=H100\n" + code)
    answered = time.time()
    assert ex.status == "error", ex.describe()
    assert says in ex.error_text(), ex.error_text()
    # The pool ended the session when the kernel died, and the GPU is free again.
    wait_until(lambda: sessions(pool)[first]["state"] != "running", within=20,
               what="the pool ending the dead kernel's session")
    ended = sessions(pool)[first]
    assert "died" in ended["stop_reason"], ended
    assert sent <= ended["ended"] <= answered, (sent, ended["ended"], answered)
    wait_until(lambda: all(g["kernel_id"] is None for g in host.gpus()
                           if g["type"] == "H100"), within=20, what="the H100s being free")
    # The next cell gets a fresh kernel.
    again = ok(kc, "%%remote gpu=H100\nprint('fresh')", timeout=90)
    assert again.stream() == "fresh\n"
    assert session_of(kc, "H100") != first


def _dead(pid: int) -> bool:
    """Whether process ``pid`` ended (gone, or a zombie its parent has not reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_a_connection_opened_as_its_kernel_dies_is_refused_once_the_host_notices(
        host: HostProcess) -> None:
    """A client connects to a kernel whose process was just killed (the OOM killer, say),
    before the host noticed: the host refuses the connection as soon as it notices, saying
    how the kernel ended, instead of holding the client for Jupyter's 60 s
    ``kernel_info_timeout`` (a notebook reconnecting then learnt of the death that late)."""
    async def go() -> list[str]:
        admin = HostClient(host.url, host.token)
        model = await admin.start_kernel("cpu")
        session = await RemoteSession.open(Grant(host.url, host.token, model["id"], "cpu"))
        try:
            await session.run_cell("pass", {}, [], lambda kind, payload: None)
            pid = int(session.remote["pid"])
        finally:
            await session.close(shutdown=False)
        os.kill(pid, signal.SIGKILL)
        # Dead (a zombie until reaped); the host looks for dead kernels every second, so
        # the connection comes before it noticed (or, rarely, after: a plain 404 then).
        await asyncio.to_thread(wait_until, lambda: _dead(pid), 30, "the kernel dying")
        async def attempt(after: float) -> str:
            await asyncio.sleep(after)  # spread over the second before the host notices
            try:
                conn = await admin.connect(model["id"], lambda *_: None)
            except RemoteKernelDiedError as e:
                return f"refused: {e}"
            # Opened before the kernel's end showed: closed when the host notices it.
            return f"closed: {await asyncio.wait_for(conn.closed, 60)}"

        try:
            return await asyncio.gather(*(attempt(0.15 * i) for i in range(6)))
        finally:
            await admin.aclose()

    for text in asyncio.run(go()):
        assert (text.startswith("refused: ") and "has no kernel" in text) or \
            text == "closed: (4001, 'the kernel died')", text


def test_a_dead_host_loses_its_sessions_within_seconds_and_the_cell_says_so(
        host_factory: HostFactory, tmp_path: Path) -> None:
    doomed = host_factory.start("H100:1", name="doomed")
    lost_pool = pool_over(tmp_path, [doomed], name="lost")
    km, kc = notebook_on(lost_pool)
    killed: list[float] = []

    def kill_host(m: Message) -> None:
        if not killed and m.msg_type == "stream" and "working" in m.content.get("text", ""):
            killed.append(time.time())
            doomed.proc.kill()

    try:
        ok(kc, "%%remote gpu=H100\nprint('up')", timeout=90)
        sid = session_of(kc, "H100")
        ex = run(kc, "%%remote gpu=H100\nimport time\nprint('working', flush=True)\n"
                     "time.sleep(60)", on_message=kill_host)
        assert killed, "the host was never killed"
        assert ex.status == "error", ex.describe()
        assert "its machine was lost" in ex.error_text(), ex.error_text()
        view = sessions(lost_pool)[sid]
        assert view["state"] == "lost", view
        assert "host stopped answering" in view["stop_reason"], view
        # Billed until the last heartbeat the host answered: before the kill, not after.
        assert view["started"] <= view["ended"] <= killed[0], view
        hardware = {t["type"]: t for t in lost_pool.request("GET", "/api/hardware").json()[
            "hardware"]}
        assert hardware["H100"]["free"] == 0, hardware["H100"]  # its host is down
        with sqlite3.connect(lost_pool.db) as con:
            state, ended = con.execute("SELECT state, ended FROM sessions WHERE id = ?",
                                       (sid,)).fetchone()
        con.close()
        assert (state, ended) == ("lost", view["ended"])
    finally:
        stop_kernel(km, kc)
        lost_pool.stop()


def test_sessions_keep_running_while_the_pool_restarts_and_the_ledger_stays_exact(
        host_factory: HostFactory, tmp_path: Path) -> None:
    steady = host_factory.start("H100:1", name="steady")
    db = tmp_path / "ledger.sqlite"
    first = pool_over(tmp_path, [steady], name="first", db=db)
    km, kc = notebook_on(first)
    second: PoolProcess | None = None
    try:
        ok(kc, "%%remote gpu=H100\nkept = 1", timeout=90)
        sid = session_of(kc, "H100")
        started = sessions(first)[sid]["started"]
        killed: list[int] = []

        def kill_pool(m: Message) -> None:
            if not killed and m.msg_type == "stream" and "start" in m.content.get("text", ""):
                killed.append(1)
                first.kill()

        ex = run(kc, "%%remote gpu=H100\nimport time\nprint('start', flush=True)\n"
                     "time.sleep(1)\nkept += 1\nprint('end', kept)", on_message=kill_pool)
        assert killed and ex.status == "ok", ex.describe()
        assert ex.stream() == "start\nend 2\n"
        # The data plane does not go through the pool: cells go on while it is down.
        assert ok(kc, "%%remote gpu=H100\nprint(kept * 10)").stream() == "20\n"
        second = pool_over(tmp_path, [steady], name="second", db=db)
        view = sessions(second)[sid]
        assert view["state"] == "running" and view["started"] == started, view
        assert ok(kc, "%%remote gpu=H100\nprint(kept)").stream() == "2\n"
        stop_at = time.time()
        httpx.delete(f"{second.url}/api/sessions/{sid}", timeout=30,
                     headers={"Authorization": f"token {second.token}"})
        view = sessions(second)[sid]
        # One row, billed from the first start to the stop, across the restart.
        assert view["state"] == "stopped"
        assert view["ended"] == pytest.approx(stop_at, abs=2.0)
        assert view["cost"] == pytest.approx(
            (view["ended"] - started) / 3600 * view["rate_per_hour"], rel=1e-6)
    finally:
        stop_kernel(km, kc)
        for p in (first, second):
            if p is not None:
                p.stop()


def test_a_running_cell_keeps_its_session_while_its_notebook_is_away(
        host_factory: HostFactory, tmp_path: Path) -> None:
    """A laptop asleep through a long cell: the cell runs to its end, and the session is
    stopped only once it has been idle for the grace period with nobody back."""
    sleeper = host_factory.start("H100:1", name="sleeper")
    pool = pool_over(tmp_path, [sleeper], name="asleep", grace=1.5)
    try:
        sid = vanish(pool.url, pool.token, tmp_path, mid_cell=True)
        kept = f"Session {sid} has had no notebook connected"
        wait_until(lambda: kept in pool.log.read_text(errors="replace")
                   or sessions(pool)[sid]["state"] != "running", within=30,
                   what="the pool keeping the away session for its running cell")
        view = sessions(pool)[sid]
        assert view["state"] == "running", view
        # Its view says so (the lab's panel and `%remote status` show it): no stop is
        # planned while the cell runs (there is no busy limit here).
        away = view["disconnected"]
        assert away is not None and away["cell_running"] is True, view
        assert away["stop_at"] is None and away["since"] <= time.time(), view
        (tmp_path / "release").write_text("1")
        wait_until(lambda: sessions(pool)[sid]["state"] != "running", within=30,
                   what="the pool stopping the session once its cell ended")
        assert (tmp_path / "done").exists(), "the cell was cut short"
        view = sessions(pool)[sid]
        assert "no notebook was connected to it for 2 s after its cell ended" in \
            view["stop_reason"], view
    finally:
        pool.stop()


def test_a_cell_running_without_its_notebook_is_stopped_after_the_busy_limit(
        host_factory: HostFactory, tmp_path: Path) -> None:
    """An endless cell whose notebook died does not hold its GPU for ever."""
    endless = host_factory.start("H100:1", name="endless")
    pool = pool_over(tmp_path, [endless], name="endless", grace=0.5, busy_limit=2)
    try:
        sid = vanish(pool.url, pool.token, tmp_path, mid_cell=True)
        wait_until(lambda: sessions(pool)[sid]["state"] != "running", within=30,
                   what="the pool stopping the endless away session")
        view = sessions(pool)[sid]
        assert "while a cell ran (busy_disconnected_timeout 2 s)" in view["stop_reason"], view
        assert not (tmp_path / "done").exists()
        wait_until(lambda: all(g["kernel_id"] is None for g in endless.gpus()), within=20,
                   what="the host freeing its GPU")
    finally:
        pool.stop()


def test_a_session_no_notebook_is_connected_to_says_so_until_one_connects_again(
        host_factory: HostFactory, tmp_path: Path) -> None:
    """The pool's view of a session whose notebook went away: since when, and when it is
    stopped unless one comes back; a client that connects again clears it."""
    waiting = host_factory.start("H100:1", name="waiting")
    pool = pool_over(tmp_path, [waiting], name="waiting", grace=3600)
    try:
        sid = vanish(pool.url, pool.token, tmp_path)
        wait_until(lambda: sessions(pool)[sid]["disconnected"] is not None, within=30,
                   what="the pool seeing that no notebook is connected")
        view = sessions(pool)[sid]
        away = view["disconnected"]
        assert away["cell_running"] is False, view
        assert away["since"] + 3600 <= away["stop_at"] <= time.time() + 3600, view
        assert away_text(away, away["since"] + 60) == (
            "no notebook connected for 60 s; it is stopped in 59 min unless one connects "
            "again")

        mine = pool.request("GET", f"/api/sessions/{sid}").json()  # with its host token

        async def come_back() -> None:
            grant = Grant(mine["host_url"], mine["token"], mine["kernel_id"], "H100:1",
                          session_id=sid)
            session = await RemoteSession.open(grant)
            try:
                await asyncio.to_thread(
                    wait_until, lambda: sessions(pool)[sid]["disconnected"] is None, 30,
                    "the pool seeing the notebook back")
            finally:
                await session.close(shutdown=False)

        asyncio.run(come_back())
    finally:
        pool.stop()


def test_a_session_whose_client_never_returns_is_stopped_after_the_grace_period(
        host_factory: HostFactory, tmp_path: Path) -> None:
    lonely = host_factory.start("H100:1", name="lonely")
    pool = pool_over(tmp_path, [lonely], name="grace", grace=1.5)
    try:
        sid = vanish(pool.url, pool.token, tmp_path)
        wait_until(lambda: sessions(pool)[sid]["state"] != "running", within=30,
                   what="the pool stopping the abandoned session")
        view = sessions(pool)[sid]
        assert "no notebook was connected to it for 2 s" in view["stop_reason"], view
        wait_until(lambda: all(g["kernel_id"] is None for g in lonely.gpus()), within=20,
                   what="the host freeing the abandoned session's GPU")
    finally:
        pool.stop()

