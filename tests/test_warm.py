"""Warm kernels: a real pool keeps pre-started kernels and hands them out at once, and
holds one, unbilled, for a notebook's first cell (``%load_ext cloudgpu`` asks).

The pool runs over the `host` fixture (conftest.py), whose GPUs are simulated
(H100:2,A100-80GB:1; the warm kernels asked for here are cpu and H100); everything else
is real processes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kernel_driver import CLIENT, ok, start_kernel, stop_kernel, value
from servers import HostProcess, PoolProcess, wait_until

pytestmark = pytest.mark.timeout(120)


def warm_pool(tmp: Path, host: HostProcess, config: str) -> PoolProcess:
    """A static-backend pool over ``host`` with ``config``, started."""
    (tmp / "pool_config.py").write_text(config)
    return PoolProcess(tmp, [host], tmp / "pool_config.py").start()


def running(pool: PoolProcess, session: dict[str, object]) -> dict[str, object]:
    """Long-poll the session until it is no longer queued or starting."""
    while session["state"] in ("queued", "starting"):
        session = pool.request("GET", f"/api/sessions/{session['id']}",
                               params={"wait": 20, "version": session["version"]}).json()
    return session


def test_a_warm_kernel_is_granted_at_once_and_replaced(host: HostProcess,
                                                       tmp_path: Path) -> None:
    pool = warm_pool(tmp_path, host, 'c.PoolApp.warm_kernels = {"cpu": 1, "H100": 1}\n')
    try:
        wait_until(lambda: len(host.kernels()) == 2)  # one cpu, one H100, both warm
        warm_ids = {k["id"] for k in host.kernels()}
        # A warm GPU kernel still counts as free.
        h100 = next(h for h in pool.request("GET", "/api/hardware").json()["hardware"]
                    if h["type"] == "H100")
        assert (h100["free"], h100["total"]) == (2, 2)

        session = pool.request("POST", "/api/sessions", json={"hardware": "H100"}).json()
        assert session["state"] == "running"  # no waiting: the POST itself answers running
        assert session["kernel_id"] in warm_ids
        # Its scoped token opens it, though the kernel was started before the session.
        scoped = httpx.get(f"{host.url}/api/kernels/{session['kernel_id']}",
                           headers={"Authorization": f"token {session['token']}"})
        assert scoped.status_code == 200
        # One H100 is still free, so a new warm H100 kernel takes the place of the one given.
        wait_until(lambda: len(host.kernels()) == 3)
        pool.request("DELETE", f"/api/sessions/{session['id']}")
        wait_until(lambda: len(host.kernels()) == 2 and
                   session["kernel_id"] not in {k["id"] for k in host.kernels()})
    finally:
        pool.stop()
    wait_until(lambda: host.kernels() == [])  # a pool that stops takes its warm kernels along


def test_a_request_for_more_gpus_stops_warm_kernels_to_make_room(host: HostProcess,
                                                                  tmp_path: Path) -> None:
    pool = warm_pool(tmp_path, host, 'c.PoolApp.warm_kernels = {"H100": 1}\n')
    try:
        wait_until(lambda: len(host.kernels()) == 1)
        warm_id = host.kernels()[0]["id"]
        # Both H100s: the warm kernel holding one of them is stopped to make room.
        session = running(pool, pool.request("POST", "/api/sessions",
                                             json={"hardware": "H100:2"}).json())
        assert session["state"] == "running", session
        assert session["count"] == 2 and session["kernel_id"] != warm_id
        assert {k["id"] for k in host.kernels()} == {session["kernel_id"]}
        pool.request("DELETE", f"/api/sessions/{session['id']}")
        wait_until(lambda: len(host.kernels()) == 1 and  # warm again, now that GPUs are free
                   host.kernels()[0]["id"] != session["kernel_id"])
    finally:
        pool.stop()


def test_kernels_left_by_a_killed_pool_are_stopped_on_restart(host: HostProcess,
                                                              tmp_path: Path) -> None:
    pool = warm_pool(tmp_path, host, 'c.PoolApp.warm_kernels = {"cpu": 2}\n')
    wait_until(lambda: len(host.kernels()) == 2)
    session = pool.request("POST", "/api/sessions", json={"hardware": "cpu"}).json()
    assert session["state"] == "running"
    wait_until(lambda: len(host.kernels()) == 3)
    pool.kill()
    pool.start()  # same ledger
    try:
        # The session's kernel is kept; the two warm ones nobody owns were swept and the
        # new pool made its own two.
        wait_until(lambda: len(host.kernels()) == 3)
        ids = {k["id"] for k in host.kernels()}
        assert session["kernel_id"] in ids
        again = pool.request("GET", f"/api/sessions/{session['id']}").json()
        assert again["state"] == "running" and again["started"] == session["started"]
    finally:
        pool.stop()
    wait_until(lambda: host.kernels() == [])


# --- holds: a warm kernel kept, unbilled, for a notebook's first cell -------------------------

def _session(pool: PoolProcess, session_id: str) -> dict[str, Any]:
    return pool.request("GET", f"/api/sessions/{session_id}").json()  # type: ignore[no-any-return]


def _listed(pool: PoolProcess) -> set[str]:
    return {s["id"] for s in pool.request("GET", "/api/sessions").json()["sessions"]}


def test_a_hold_is_not_billed_or_listed_until_a_cell_claims_it(host: HostProcess,
                                                               tmp_path: Path) -> None:
    pool = warm_pool(tmp_path, host, 'c.PoolApp.warm_kernels = {"cpu": 1}\n')
    try:
        wait_until(lambda: len(host.kernels()) == 1)
        warm_id = host.kernels()[0]["id"]
        held = pool.request("POST", "/api/holds", json={"hardware": "cpu", "seconds": 60})
        assert held.status_code == 201, held.text
        hold = held.json()
        assert hold["state"] == "running" and hold["kernel_id"] == warm_id
        assert hold["started"] is None and hold["cost"] == 0 and hold["hold_until"]
        scoped = httpx.get(f"{host.url}/api/kernels/{warm_id}",
                           headers={"Authorization": f"token {hold['token']}"})
        assert scoped.status_code == 200  # its client can connect while it is held
        assert hold["id"] not in _listed(pool)
        assert pool.request("GET", "/api/cost").json()["sessions"] == []

        before = time.time()
        claimed = pool.request("POST", f"/api/sessions/{hold['id']}/claim",
                               json={"max_cost": 5}).json()
        assert claimed["started"] >= before and claimed["hold_until"] is None
        assert claimed["max_cost"] == 5
        assert hold["id"] in _listed(pool)
        pool.request("DELETE", f"/api/sessions/{hold['id']}")
    finally:
        pool.stop()


def test_only_a_ready_warm_cpu_kernel_is_ever_held(host: HostProcess, tmp_path: Path) -> None:
    pool = warm_pool(tmp_path, host, 'c.PoolApp.warm_kernels = {"H100": 1}\n')
    try:
        wait_until(lambda: len(host.kernels()) == 1)
        gpu = pool.request("POST", "/api/holds", json={"hardware": "H100", "seconds": 60})
        assert gpu.status_code == 400 and "Only a CPU kernel" in gpu.json()["message"]
        cpu = pool.request("POST", "/api/holds", json={"hardware": "cpu", "seconds": 60})
        assert cpu.status_code == 409 and "No warm cpu kernel" in cpu.json()["message"]
        assert len(host.kernels()) == 1  # nothing was started for either
        assert pool.request("GET", "/api/sessions", params={"all": 1}).json()["sessions"] == []
    finally:
        pool.stop()


def test_an_unclaimed_hold_ends_at_its_time_having_cost_nothing(host: HostProcess,
                                                                tmp_path: Path) -> None:
    pool = warm_pool(tmp_path, host, 'c.PoolApp.warm_kernels = {"cpu": 1}\n'
                                     'c.PoolApp.meter_interval = 0.2\n')
    try:
        wait_until(lambda: len(host.kernels()) == 1)
        hold = pool.request("POST", "/api/holds", json={"hardware": "cpu", "seconds": 1}).json()
        wait_until(lambda: _session(pool, hold["id"])["state"] != "running", within=30,
                   what="the pool ending the hold")
        ended = _session(pool, hold["id"])
        assert ended["stop_reason"] == "held for a first cell that did not come"
        assert ended["started"] is None and ended["cost"] == 0
        wait_until(lambda: not host.kernel_alive(hold["kernel_id"]))
        late = pool.request("POST", f"/api/sessions/{hold['id']}/claim", json={})
        assert late.status_code == 404 and "ended before a cell took it" in late.text
        assert pool.request("GET", "/api/cost").json()["today"] == 0
    finally:
        pool.stop()


# --- holds from a notebook: `%load_ext cloudgpu` holds, the first cell takes ---------------------

HELD = f"getattr({CLIENT}.held, 'kernel_id', None)"
HELD_SESSION = f"{CLIENT}.held.grant.session_id"


@pytest.fixture
def held_notebook(host: HostProcess, tmp_path: Path,
                  request: pytest.FixtureRequest) -> Iterator[tuple[PoolProcess, Any, str]]:
    """A pool keeping a warm cpu kernel, and a notebook kernel that loaded the extension
    and holds that kernel: (pool, kernel client, held kernel id). The hold lasts 120 s,
    or the seconds the test gives as the fixture's (indirect) parameter."""
    seconds = getattr(request, "param", 120)
    pool = warm_pool(tmp_path, host, 'c.PoolApp.warm_kernels = {"cpu": 1}\n')
    km = kc = None
    try:
        wait_until(lambda: len(host.kernels()) == 1)
        km, kc = start_kernel(CLOUDGPU_POOL=pool.url, CLOUDGPU_TOKEN=pool.token,
                              CLOUDGPU_WARM_HOLD=str(seconds))
        ok(kc, "%load_ext cloudgpu")
        wait_until(lambda: value(kc, HELD) is not None, within=60, what="the notebook holding")
        yield pool, kc, value(kc, HELD)
    finally:
        if km is not None and kc is not None:
            stop_kernel(km, kc)
        pool.stop()


def test_the_first_cell_takes_the_held_kernel_over_its_open_connection(
        held_notebook: tuple[PoolProcess, Any, str]) -> None:
    pool, kc, held = held_notebook
    session_id = value(kc, HELD_SESSION)
    conn = value(kc, f"id({CLIENT}.held.kernel.link.conn)")
    before = time.time()
    ex = ok(kc, "%%remote gpu=cpu\nprint('hi')")
    assert ex.stream().strip() == "hi"
    cpu = f"{CLIENT}.sessions['cpu']"
    assert value(kc, f"{cpu}.kernel_id") == held
    # The very websocket opened at %load_ext, never dropped or made again.
    assert value(kc, f"id({cpu}.kernel.link.conn)") == conn
    assert value(kc, f"{cpu}.kernel.link.reconnects") == 0
    assert value(kc, HELD) is None
    session = _session(pool, session_id)
    assert session["hold_until"] is None and session["started"] >= before  # billed from the cell
    assert session_id in _listed(pool)


@pytest.mark.parametrize("held_notebook", [1], indirect=True)
def test_an_unused_hold_is_given_back_after_its_while(
        held_notebook: tuple[PoolProcess, Any, str], host: HostProcess) -> None:
    pool, kc, held = held_notebook
    session_id = value(kc, HELD_SESSION)
    wait_until(lambda: _session(pool, session_id)["state"] != "running", within=30,
               what="the notebook giving the hold back")
    ended = _session(pool, session_id)
    assert ended["stop_reason"] == "stopped by its owner"  # the client, not the pool's reaper
    assert ended["started"] is None and ended["cost"] == 0
    assert value(kc, HELD) is None
    wait_until(lambda: not host.kernel_alive(held))
    cost = pool.request("GET", "/api/cost").json()
    assert cost["today"] == 0 and cost["sessions"] == []
    # The first cell, now, asks the pool as it would have without a hold.
    ok(kc, "%%remote gpu=cpu\nx = 1")
    assert value(kc, f"{CLIENT}.sessions['cpu'].kernel_id") != held


def test_a_first_cell_on_other_hardware_gives_the_hold_back(
        held_notebook: tuple[PoolProcess, Any, str], host: HostProcess) -> None:
    pool, kc, held = held_notebook
    session_id = value(kc, HELD_SESSION)
    ok(kc, "%%remote gpu=H100\nx = 1", timeout=90)
    assert value(kc, f"{CLIENT}.sessions['H100'].kernel_id") != held
    wait_until(lambda: _session(pool, session_id)["state"] != "running",
               what="the notebook giving the hold back")
    assert _session(pool, session_id)["cost"] == 0
    wait_until(lambda: not host.kernel_alive(held))
    assert [s["hardware"] for s in pool.request("GET", "/api/cost").json()["sessions"]] == \
        ["H100"]


@pytest.mark.timeout(180)
def test_with_no_pool_configured_the_local_pool_holds_for_the_first_cell() -> None:
    """The embedded default: the local pool keeps one warm cpu kernel, and a notebook that
    loads the extension once it is up holds it. (The first notebook may find no warm
    kernel ready yet, if it had to start the pool: its first cell then asks as usual.)"""
    km, kc = start_kernel()
    try:
        ok(kc, "%load_ext cloudgpu")
        ok(kc, "%%remote gpu=cpu\nx = 1", timeout=90)
        km2, kc2 = start_kernel()
        try:
            ok(kc2, "%load_ext cloudgpu")
            wait_until(lambda: value(kc2, HELD) is not None, within=60,
                       what="the second notebook holding the local pool's warm kernel")
            held = value(kc2, HELD)
            ok(kc2, "%%remote gpu=cpu\nprint('hi')", timeout=90)
            assert value(kc2, f"{CLIENT}.sessions['cpu'].kernel_id") == held
        finally:
            stop_kernel(km2, kc2)
    finally:
        stop_kernel(km, kc)
