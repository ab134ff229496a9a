"""Warm kernels: a real pool keeps pre-started kernels and hands them out at once.

The pool runs over the `host` fixture (conftest.py), whose GPUs are simulated
(H100:2,A100-80GB:1; the warm kernels asked for here are cpu and H100); everything else
is real processes.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
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
