"""The pool: a real ``cloudgpu pool`` over real ``cloudgpu host`` processes, driven over REST.

Three hosts run as subprocesses with simulated inventories (the only fake: there is no
GPU here, so every test name says "simulated"), and one pool with the ``static`` backend
serves them on 127.0.0.1 to three users. Prices are raised so far (H100 at $1 per second)
that budgets trip within seconds. The hosts and the pool are shared by the module, since
starting them is the slow part; each test releases what it took (``_release_everything``).
Tests that kill a pool start their own over the same hosts, with their own ledger.

The hosts are the conftest ``host_factory``'s and the pool a ``servers.PoolProcess``.
The notebook side is a real local ipykernel with ``%load_ext cloudgpu``, pointed at the
pool through ``CLOUDGPU_POOL``/``CLOUDGPU_TOKEN``, driven through jupyter_client with
tests/kernel_driver.py, as tests/test_magic.py does it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cloudgpu.remote_host.pool.backend import Backend, load_backend
from cloudgpu.remote_host.pool.backends import LocalBackend, StaticBackend
from jupyter_client.blocking.client import BlockingKernelClient
from kernel_driver import CLIENT, Message, ok, run, start_kernel, stop_kernel, value
from servers import HostFactory, HostProcess, PoolProcess, wait_until

from cloudgpu._format import duration
from cloudgpu.errors import AuthenticationError, CloudGPUError
from cloudgpu.host_client import HostClient
from cloudgpu.pool_client import PoolClient, describe_wait
from cloudgpu.provider import Grant
from cloudgpu.session import RemoteSession

HOST_INVENTORIES = {"a": "H100:2", "b": "H100:1,A100-80GB:1", "c": "A100-80GB:2"}
TOTALS = {"H100": 3, "A100-80GB": 3}
PRICES = {"H100": 3600.0, "A100-80GB": 1800.0}  # dollars per GPU-hour: $1/s and $0.50/s
USERS = ("alice", "bob", "carol", "dave")
# A type only the pool's operator added (no host has one): the magic must know it from the pool.
EXTRA_TYPE = {"MI300X": {"memory_gb": 192, "price_per_hour": 4.0, "aliases": ["mi300"]}}
DAVE_DAILY_LIMIT = 3.0
ACTIVE = ("queued", "starting", "running")


# --- processes: hosts and pools ------------------------------------------------------


class User:
    """One user's view of a pool, through its REST API (synchronous, for readable tests)."""

    def __init__(self, pool: UsersPool, name: str) -> None:
        self.pool, self.name = pool, name
        self.token = pool.tokens[name]

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self.pool.request(method, path, token=self.token, **kw)

    def create(self, hardware: str, **options: Any) -> dict[str, Any]:
        response = self.request("POST", "/api/sessions", json={"hardware": hardware, **options})
        assert response.status_code == 201, response.text
        return response.json()  # type: ignore[no-any-return]

    def get(self, session_id: str, wait: float = 0, version: int = -1) -> dict[str, Any]:
        params = {"wait": wait, "version": version} if wait else {}
        response = self.request("GET", f"/api/sessions/{session_id}", params=params)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def delete(self, session_id: str) -> dict[str, Any]:
        response = self.request("DELETE", f"/api/sessions/{session_id}")
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def sessions(self, all: bool = False) -> list[dict[str, Any]]:
        response = self.request("GET", "/api/sessions", params={"all": 1} if all else {})
        assert response.status_code == 200, response.text
        return response.json()["sessions"]  # type: ignore[no-any-return]

    def hardware(self) -> dict[str, dict[str, Any]]:
        response = self.request("GET", "/api/hardware")
        assert response.status_code == 200, response.text
        return {t["type"]: t for t in response.json()["hardware"]}

    def cost(self) -> dict[str, Any]:
        response = self.request("GET", "/api/cost")
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def wait_for(self, session_id: str, done: Callable[[dict[str, Any]], bool],
                 within: float = 30, seen: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Long-poll the session, as a waiting notebook does, until ``done(view)``."""
        deadline = time.monotonic() + within
        view = self.get(session_id)
        while True:
            if seen is not None:
                seen.append(view)
            if done(view):
                return view
            left = deadline - time.monotonic()
            assert left > 0, f"session {session_id} never got there; last view: {view}"
            view = self.get(session_id, wait=min(left, 10), version=view["version"])

    def running(self, session_id: str, within: float = 30) -> dict[str, Any]:
        view = self.wait_for(session_id, lambda s: s["state"] not in ("queued", "starting"),
                             within)
        assert view["state"] == "running", view
        return view

    def ended(self, session_id: str, within: float = 30,
              seen: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return self.wait_for(session_id, lambda s: s["state"] not in ACTIVE, within, seen)


class UsersPool(PoolProcess):
    """A pool process (static backend over the given hosts) as this module's users see it;
    started at once."""

    def __init__(self, tmp: Path, hosts: dict[str, HostProcess], db: Path, config: Path,
                 tokens: dict[str, str], name: str) -> None:
        super().__init__(tmp, hosts.values(), config, name=name, db=db)
        self.tokens = tokens
        self.start()

    def user(self, name: str) -> User:
        return User(self, name)

    def poll_is_waiting(self, session_id: str, version: int, wait: int) -> None:
        """Until a long poll of the session (``?wait=&version=``) is waiting at the pool."""
        self.wait_for_log(f"Session {session_id}: waiting up to {wait} s for a change past "
                          f"version {version}")

    def release_all(self) -> None:
        """Stop every active session of every user; the pool frees the GPUs at once."""
        for name in USERS:
            user = self.user(name)
            for s in user.sessions():
                user.delete(s["id"])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pool")


@pytest.fixture(scope="module")
def hosts(host_factory: HostFactory) -> dict[str, HostProcess]:
    """Three simulated hosts, started side by side."""
    return host_factory.start_many(HOST_INVENTORIES)


@pytest.fixture(scope="module")
def tokens() -> dict[str, str]:
    return {name: secrets.token_hex(24) for name in USERS}


@pytest.fixture(scope="module")
def pool_config(workdir: Path, tokens: dict[str, str]) -> Path:
    path = workdir / "pool_config.py"
    path.write_text(
        "# tests/test_pool.py: four users, prices that trip budgets in seconds, fast checks.\n"
        f"c.PoolApp.users = {({t: n for n, t in tokens.items()})!r}\n"
        f"c.PoolApp.user_limits = {({'dave': DAVE_DAILY_LIMIT})!r}\n"
        "c.PoolApp.cull_interval = 0.3\n"
        "c.PoolApp.meter_interval = 0.3\n"
        "c.PoolApp.disconnected_timeout = 0\n"
        "c.PoolApp.bad_tokens_allowed = 1000  # wrong tokens on purpose; throttled elsewhere\n"
        f"c.PoolApp.catalog_overrides = "
        f"{({**{k: {'price_per_hour': v} for k, v in PRICES.items()}, **EXTRA_TYPE})!r}\n"
    )
    return path


@pytest.fixture(scope="module")
def pool(workdir: Path, hosts: dict[str, HostProcess], pool_config: Path,
         tokens: dict[str, str]) -> Iterator[UsersPool]:
    """The shared pool (static backend over the three hosts)."""
    proc = UsersPool(workdir, hosts, workdir / "ledger.sqlite", pool_config, tokens, "pool")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(autouse=True)
def _release_everything(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test of the shared pool, stop whatever sessions it left."""
    yield
    if "pool" in request.fixturenames:
        request.getfixturevalue("pool").release_all()


def gpu_holders(hosts: dict[str, HostProcess]) -> dict[tuple[str, int], str | None]:
    """(host name, GPU index) -> the kernel holding it, as the hosts report."""
    return {(h.name, g["index"]): g["kernel_id"] for h in hosts.values() for g in h.gpus()}


def host_of(hosts: dict[str, HostProcess], url: str) -> HostProcess:
    return next(h for h in hosts.values() if h.url == url.rstrip("/"))


# --- 1. the hardware list ----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_hardware_list_counts_simulated_gpus_of_all_hosts_with_prices(pool: UsersPool) -> None:
    alice = pool.user("alice")
    info = alice.request("GET", "/api/pool").json()
    assert info["user"] == "alice" and info["backend"] == "static"
    assert info["hosts"] == 3 and info["simulated"] is True

    hw = alice.hardware()
    for gpu_type, total in TOTALS.items():
        row = hw[gpu_type]
        assert (row["free"], row["total"], row["queued"]) == (total, total, 0), row
        assert row["price_per_hour"] == PRICES[gpu_type]
        assert row["simulated"] is True and row["available"] is True
    assert (hw["H200"]["total"], hw["H200"]["available"], hw["H200"]["simulated"]) == \
        (0, False, False)
    assert hw["cpu"]["total"] is None and hw["cpu"]["available"] is True

    # Taking GPUs shows at once, for everyone.
    s = alice.create("H100:2")
    alice.running(s["id"])
    row = pool.user("bob").hardware()["H100"]
    assert (row["free"], row["total"]) == (1, 3)
    alice.delete(s["id"])
    assert pool.user("bob").hardware()["H100"]["free"] == 3


# --- 2. scheduling ------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_simulated_gpus_fifo_per_type_fallbacks_any_and_one_host_per_session(
        pool: UsersPool, hosts: dict[str, HostProcess]) -> None:
    alice, bob = pool.user("alice"), pool.user("bob")

    # `any`: the cheapest free GPU (A100-80GB at $1800/h beats H100 at $3600/h).
    cheap = alice.running(alice.create("any")["id"])
    assert (cheap["gpu_type"], cheap["count"], cheap["rate_per_hour"]) == ("A100-80GB", 1, 1800)
    alice.delete(cheap["id"])

    # Two H100s of one session land on one host, the only one that has two.
    s1 = alice.running(alice.create("H100:2")["id"])
    assert s1["host_url"].rstrip("/") == hosts["a"].url
    assert s1["simulated"] is True and len(s1["gpus"]) == 2
    holders = gpu_holders(hosts)
    assert holders[("a", 0)] == holders[("a", 1)] == s1["kernel_id"]
    s2 = bob.running(bob.create("H100")["id"])
    assert s2["host_url"].rstrip("/") == hosts["b"].url

    # Every H100 is taken: requests queue in order, and REST says who is ahead.
    q1 = alice.create("h100")
    q2 = bob.create("H100:2")
    q3 = alice.create("H100")
    views = {name: alice.get(q["id"]) if q is not q2 else bob.get(q["id"])
             for name, q in (("q1", q1), ("q2", q2), ("q3", q3))}
    assert [(v["state"], v["ahead"], v["waiting_for"]) for v in views.values()] == [
        ("queued", 0, ["H100"]), ("queued", 1, ["H100"]), ("queued", 2, ["H100"])]
    assert views["q1"]["hardware"] == "H100"
    assert describe_wait(views["q3"]) == "waiting for H100: 2 ahead of you"
    assert describe_wait(views["q1"]) == "waiting for H100: you are next"
    row = alice.hardware()["H100"]
    assert (row["free"], row["queued"]) == (0, 3)

    # A fallback takes the A100 at once instead of queueing for an H100.
    fb = bob.running(bob.create("H100|A100-80GB")["id"])
    assert fb["gpu_type"] == "A100-80GB"
    bob.delete(fb["id"])

    # A released H100 goes to the first in line at once: its waiting long poll returns.
    answer: list[dict[str, Any]] = []
    before = alice.get(q1["id"])["version"]  # queue changes since `views` moved it on
    poll = threading.Thread(target=lambda: answer.append(
        alice.get(q1["id"], wait=20, version=before)))
    poll.start()
    pool.poll_is_waiting(q1["id"], before, wait=20)
    bob.delete(s2["id"])
    poll.join(25)
    assert answer and answer[0]["state"] in ("starting", "running"), answer
    assert answer[0]["version"] != before, "the poll timed out instead"
    granted = alice.running(q1["id"])
    assert granted["host_url"].rstrip("/") == hosts["b"].url

    # No overtaking within a type: the H100 freed on host b fits q3, but q2 (H100:2) is first.
    alice.delete(q1["id"])
    v3 = alice.get(q3["id"])
    assert (v3["state"], v3["ahead"]) == ("queued", 1), v3
    assert alice.hardware()["H100"]["free"] == 1

    # Host a's two H100s come free: q2 gets both, then q3 gets host b's.
    alice.delete(s1["id"])
    g2 = bob.running(q2["id"])
    g3 = alice.running(q3["id"])
    assert g2["host_url"].rstrip("/") == hosts["a"].url and g2["count"] == 2
    assert g3["host_url"].rstrip("/") == hosts["b"].url
    holders = gpu_holders(hosts)
    assert holders[("a", 0)] == holders[("a", 1)] == g2["kernel_id"]
    assert holders[("b", 0)] == g3["kernel_id"]


@pytest.mark.timeout(30)
def test_simulated_free_gpu_is_granted_without_ever_reporting_a_wait(pool: UsersPool) -> None:
    alice = pool.user("alice")
    seen: list[dict[str, Any]] = []
    created = alice.create("H100")
    alice.wait_for(created["id"], lambda s: s["state"] == "running", seen=seen)
    # The notebook shows describe_wait() of each view until running: never "waiting" here.
    lines = [describe_wait(v) for v in [created, *seen] if v["state"] != "running"]
    assert not [line for line in lines if "waiting" in line], (created, lines)


@pytest.mark.timeout(60)
def test_simulated_queue_position_updates_live_when_someone_ahead_leaves(
        pool: UsersPool) -> None:
    alice, bob = pool.user("alice"), pool.user("bob")
    alice.running(alice.create("H100:2")["id"])
    bob.running(bob.create("H100")["id"])
    first = alice.create("H100")
    second = bob.get(bob.create("H100")["id"])
    assert (second["state"], second["ahead"]) == ("queued", 1)

    answer: list[dict[str, Any]] = []
    poll = threading.Thread(target=lambda: answer.append(
        bob.get(second["id"], wait=5, version=second["version"])))
    poll.start()
    pool.poll_is_waiting(second["id"], second["version"], wait=5)
    alice.delete(first["id"])  # the one ahead gives up
    poll.join(10)
    # The waiting cell's line ("1 ahead of you") must change now, not when the poll times out.
    assert answer[0]["ahead"] == 0, answer
    assert answer[0]["version"] != second["version"], \
        "the long poll of a waiting session did not return when its queue position changed"


# --- 3. concurrency -----------------------------------------------------------------------


@dataclass
class Held:
    user: str
    spec: str
    view: dict[str, Any] = field(default_factory=dict)
    granted_at: float = 0.0
    released_at: float = 0.0

    @property
    def devices(self) -> set[tuple[str, int]]:
        return {(self.view["host_url"].rstrip("/"), g["index"]) for g in self.view["gpus"]}


@pytest.mark.timeout(90)
def test_simulated_gpus_are_never_over_granted_under_16_concurrent_clients(
        pool: UsersPool, hosts: dict[str, HostProcess]) -> None:
    specs = ["H100", "A100-80GB", "H100|A100-80GB", "any", "H100:2", "A100-80GB:2"]
    users = ["alice", "bob", "carol"]
    jobs = [Held(users[i % 3], specs[i % len(specs)]) for i in range(16)]
    samples: list[tuple[str, int, str, str]] = []  # (host url, index, type, kernel) held
    hardware_rows: list[dict[str, Any]] = []

    async def client(job: Held) -> None:
        pc = PoolClient(pool.url, pool.tokens[job.user])
        try:
            view = await pc.create(job.spec)
            while view["state"] in ("queued", "starting"):
                view = await pc.session(view["id"], wait=20, version=view["version"])
            job.granted_at = time.monotonic()
            job.view = view
            if view["state"] == "running":
                await asyncio.sleep(0.3)
            job.released_at = time.monotonic()
            await pc.delete(view["id"])
        finally:
            await pc.aclose()

    async def sampler(done: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            while not done.is_set():
                for h in hosts.values():
                    r = await http.get(f"{h.url}/api/cloudgpu/host",
                                       headers={"Authorization": f"token {h.token}"})
                    for g in r.json()["inventory"]["gpus"]:
                        if g["kernel_id"]:
                            samples.append((h.url, g["index"], g["type"], g["kernel_id"]))
                r = await http.get(f"{pool.url}/api/hardware",
                                   headers={"Authorization": f"token {pool.tokens['alice']}"})
                hardware_rows.extend(r.json()["hardware"])
                await asyncio.sleep(0.05)

    async def main() -> None:
        done = asyncio.Event()
        watcher = asyncio.create_task(sampler(done))
        try:
            await asyncio.gather(*(client(job) for job in jobs))
        finally:
            done.set()
            await watcher

    asyncio.run(main())

    # Every request was granted, with what it asked for, on one host.
    for job in jobs:
        v = job.view
        assert v["state"] == "running", (job.spec, v)
        wanted = {c.split(":")[0]: int(c.split(":")[1]) if ":" in c else 1
                  for c in job.spec.split("|")}
        assert v["gpu_type"] in wanted or "any" in wanted, (job.spec, v)
        assert v["count"] == wanted.get(v["gpu_type"], 1) == len(v["gpus"]), v
        assert {g["type"] for g in v["gpus"]} == {v["gpu_type"]}
    # No GPU was held by two sessions at once, so no type was ever over-granted.
    for i, a in enumerate(jobs):
        for b in jobs[i + 1:]:
            if a.granted_at < b.released_at and b.granted_at < a.released_at:
                assert not a.devices & b.devices, (a.view, b.view)
    for gpu_type, total in TOTALS.items():
        for t in sorted({j.granted_at for j in jobs}):
            busy = sum(j.view["count"] for j in jobs if j.view["gpu_type"] == gpu_type
                       and j.granted_at <= t < j.released_at)
            assert busy <= total, (gpu_type, t, busy)
    for row in hardware_rows:
        if row["type"] in TOTALS:
            assert 0 <= row["free"] <= row["total"] == TOTALS[row["type"]], row
    # What the hosts said they held is what the pool said it granted.
    by_kernel = {j.view["kernel_id"]: j for j in jobs}
    assert samples, "the sampler saw no GPU in use"
    for url, index, _gpu_type, kernel_id in samples:
        assert kernel_id in by_kernel, f"{url} GPU {index} held by an unknown kernel"
        assert (url, index) in by_kernel[kernel_id].devices
    # And everything is free again.
    assert all(k is None for k in gpu_holders(hosts).values())
    hw = pool.user("bob").hardware()
    assert [(hw[t]["free"], hw[t]["queued"]) for t in TOTALS] == [(3, 0), (3, 0)]


# --- 4. budgets ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_simulated_session_is_warned_at_80_percent_and_stopped_at_its_max_cost(
        pool: UsersPool, hosts: dict[str, HostProcess]) -> None:
    alice = pool.user("alice")
    s = alice.running(alice.create("H100", max_cost=2.0)["id"])  # $1/s: 2 s
    host = host_of(hosts, s["host_url"])
    seen: list[dict[str, Any]] = []
    end = alice.ended(s["id"], within=20, seen=seen)

    warned = [v for v in seen if v["state"] == "running" and v["warnings"]]
    assert warned, seen
    assert any("80%" in w and "max_cost" in w for w in warned[0]["warnings"]), warned[0]
    assert end["state"] == "stopped"
    assert "max_cost" in end["stop_reason"] and "$2.00" in end["stop_reason"], end
    assert 1.9 <= end["cost"] <= 2.25, end  # stopped at the budget, not a meter tick later
    assert not host.kernel_alive(s["kernel_id"])
    assert s["kernel_id"] not in gpu_holders(hosts).values()
    assert alice.hardware()["H100"]["free"] == 3
    # The cost stays what it was once stopped (at $1/s, any time that passed would show).
    assert alice.get(s["id"])["cost"] == end["cost"]


@pytest.mark.timeout(60)
def test_simulated_daily_limit_stops_the_running_session_and_refuses_new_ones(
        pool: UsersPool, hosts: dict[str, HostProcess]) -> None:
    dave = pool.user("dave")
    assert dave.request("GET", "/api/pool").json()["daily_limit"] == DAVE_DAILY_LIMIT
    s = dave.running(dave.create("H100")["id"])  # $1/s against a $3 daily limit
    end = dave.ended(s["id"], within=20)
    assert end["state"] == "stopped"
    assert "daily budget" in end["stop_reason"] and "$3.00" in end["stop_reason"], end
    # Warned once, as it crossed 80% (not again at each meter tick, as spending rose).
    [warning] = end["warnings"]
    assert re.fullmatch(r"(8\d|9\d)% of your daily budget of \$3\.00 used", warning), end
    assert not host_of(hosts, s["host_url"]).kernel_alive(s["kernel_id"])

    refused = dave.request("POST", "/api/sessions", json={"hardware": "A100-80GB"})
    assert refused.status_code == 402, refused.text
    body = refused.json()
    assert "daily budget of $3.00 is spent" in body["message"]
    assert body["error"] == "BudgetExceededError"
    assert dave.sessions() == []
    report = dave.cost()
    assert report["today"] >= DAVE_DAILY_LIMIT and report["daily_limit"] == DAVE_DAILY_LIMIT
    # Others are not affected by dave's limit.
    pool.user("bob").running(pool.user("bob").create("A100-80GB")["id"])


# --- 5. idle culling ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_simulated_idle_session_is_culled_but_a_busy_one_is_not(
        pool: UsersPool, hosts: dict[str, HostProcess]) -> None:
    alice = pool.user("alice")
    idle = alice.running(alice.create("H100", idle_timeout=1)["id"])
    end = alice.ended(idle["id"], within=10)
    assert end["state"] == "stopped" and "idle" in end["stop_reason"], end
    assert not host_of(hosts, idle["host_url"]).kernel_alive(idle["kernel_id"])
    assert alice.hardware()["H100"]["free"] == 3

    busy = alice.running(alice.create("H100", idle_timeout=2)["id"])
    grant = Grant(busy["host_url"], busy["token"], busy["kernel_id"], "H100", busy["gpus"],
                  busy["simulated"], session_id=busy["id"])

    async def sleep_there() -> str:
        session = await RemoteSession.open(grant)
        out: list[str] = []
        try:
            result = await session.run_cell(
                "import time\ntime.sleep(3.5)\nprint('woke')", {}, [],
                lambda kind, msg: out.append(msg["content"].get("text", "")))
        finally:
            await session.close(shutdown=False)
        assert result.status == "ok", result.error
        return "".join(out)

    assert asyncio.run(sleep_there()).strip() == "woke"
    assert alice.get(busy["id"])["state"] == "running", "culled while a cell was running"
    # Once idle again, it goes too.
    end = alice.ended(busy["id"], within=10)
    assert "idle" in end["stop_reason"], end


# --- 6. the ledger after kill -9 --------------------------------------------------------


def _run_on(grant: Grant, code: str) -> str:
    async def go() -> str:
        session = await RemoteSession.open(grant)
        out: list[str] = []
        try:
            result = await session.run_cell(
                code, {}, [], lambda kind, msg: out.append(msg["content"].get("text", "")))
        finally:
            await session.close(shutdown=False)
        assert result.status == "ok", result.error
        return "".join(out)

    return asyncio.run(go())


def _metered(db: Path, *session_ids: str) -> bool:
    """Whether the ledger shows each session seen alive by a meter round after it started."""
    with contextlib.closing(sqlite3.connect(db)) as con:
        seen = dict(con.execute("SELECT id, last_seen > started FROM sessions").fetchall())
    return all(seen.get(i) for i in session_ids)


def _grant(view: dict[str, Any]) -> Grant:
    return Grant(view["host_url"], view["token"], view["kernel_id"], view["hardware"],
                 view["gpus"], view["simulated"], session_id=view["id"])


@pytest.mark.timeout(90)
def test_simulated_sessions_survive_kill_9_of_the_pool(
        workdir: Path, hosts: dict[str, HostProcess], pool_config: Path,
        tokens: dict[str, str]) -> None:
    tmp = workdir / "kill9"
    tmp.mkdir()
    db = tmp / "ledger.sqlite"
    first = UsersPool(tmp, hosts, db, pool_config, tokens, "first")
    second: UsersPool | None = None
    try:
        alice = first.user("alice")
        kept = alice.running(alice.create("H100:2")["id"])
        lost = alice.running(alice.create("A100-80GB")["id"])
        waiting = alice.get(alice.create("H100:2")["id"])
        assert waiting["state"] == "queued"
        assert _run_on(_grant(kept), "state_there = 41\nprint('set')").strip() == "set"
        wait_until(lambda: _metered(db, kept["id"], lost["id"]), within=10,
                   what="the meter recording that both sessions ran")

        first.kill()
        # What SIGKILL left on disk: a WAL-journalled ledger with all three sessions.
        with sqlite3.connect(db) as con:
            assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            rows = {r[0]: r[1:] for r in con.execute(
                "SELECT id, state, started, last_seen, kernel_id FROM sessions")}
        con.close()
        assert {i: r[0] for i, r in rows.items()} == {
            kept["id"]: "running", lost["id"]: "running", waiting["id"]: "queued"}
        lost_last_seen = rows[lost["id"]][2]
        assert lost_last_seen is not None and lost_last_seen >= lost["started"]
        # The data plane does not need the pool.
        assert _run_on(_grant(kept), "print(state_there + 1)").strip() == "42"
        # While the pool is down, one session's kernel goes away on its host.
        lost_host = host_of(hosts, lost["host_url"])
        before_delete = time.time()
        lost_host.delete_kernel(lost["kernel_id"])
        after_delete = time.time()

        second = UsersPool(tmp, hosts, db, pool_config, tokens, "second")
        alice = second.user("alice")
        listed = {s["id"]: s for s in alice.sessions(all=True)}
        assert set(listed) == set(rows), "a session went missing from the ledger"

        again = alice.get(kept["id"])
        assert again["state"] == "running"
        assert (again["started"], again["kernel_id"], again["host_url"]) == \
            (kept["started"], kept["kernel_id"], kept["host_url"])
        assert host_of(hosts, kept["host_url"]).kernel_alive(kept["kernel_id"])
        cost = again["cost"]
        assert cost == pytest.approx((time.time() - kept["started"]) * 2, abs=1.0)
        assert alice.get(kept["id"])["cost"] > cost  # still billed: at $2/s, by the moment
        assert second.user("bob").hardware()["H100"]["free"] == 1
        # Its kernel kept its state, and the same session token still opens it.
        assert _run_on(_grant(again), "print(state_there + 2)").strip() == "43"

        gone = alice.get(lost["id"])
        assert gone["state"] == "stopped"
        assert "shut down (while the pool was down)" in gone["stop_reason"], gone
        # Billed exactly until its kernel ended, as its host remembers: not to the last
        # time the old pool saw it, nor to when the new pool noticed.
        assert before_delete <= gone["ended"] <= after_delete, (gone, lost_last_seen)

        queued = alice.get(waiting["id"])
        assert (queued["state"], queued["ahead"]) == ("queued", 0), queued
        alice.delete(kept["id"])
        granted = alice.running(waiting["id"], within=20)
        assert granted["host_url"].rstrip("/") == hosts["a"].url

        second.stop()  # a clean stop ends its sessions and frees their GPUs
        assert second.proc.returncode == 0, second.log.read_text()
        assert all(k is None for k in gpu_holders(hosts).values())
        with sqlite3.connect(db) as con:
            states = dict(con.execute("SELECT id, state FROM sessions").fetchall())
        con.close()
        assert states[waiting["id"]] == "stopped"
        assert all(s not in ACTIVE for s in states.values()), states
    finally:
        first.stop()
        if second is not None:
            second.stop()
        for host in hosts.values():
            host.reset()


# --- 7. isolation -------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_simulated_users_cannot_see_touch_or_open_each_others_sessions(
        pool: UsersPool, hosts: dict[str, HostProcess]) -> None:
    alice, bob = pool.user("alice"), pool.user("bob")
    mine = alice.running(alice.create("H100")["id"])
    theirs = bob.running(bob.create("A100-80GB")["id"])
    assert mine["host_url"] == theirs["host_url"]  # both on host b: the token is the boundary

    for method in ("GET", "DELETE"):
        response = bob.request(method, f"/api/sessions/{mine['id']}")
        assert response.status_code == 404, response.text
        assert mine["id"] in response.json()["message"]
    assert alice.get(mine["id"])["state"] == "running"
    assert [s["id"] for s in bob.sessions()] == [theirs["id"]]
    assert mine["id"] not in {s["id"] for s in bob.sessions(all=True)}
    assert mine["id"] not in {s["id"] for s in bob.cost()["sessions"]}
    assert all("token" not in s for s in alice.sessions()), "a listing leaks session tokens"

    async def with_alices_token() -> None:
        async with HostClient(mine["host_url"], mine["token"]) as host:
            model = await host.kernel(mine["kernel_id"])
            assert model is not None and model["id"] == mine["kernel_id"]
            conn = await host.connect(mine["kernel_id"], lambda *a: None)
            await conn.close()
            for method, path in [("GET", f"/api/kernels/{theirs['kernel_id']}"),
                                 ("DELETE", f"/api/kernels/{theirs['kernel_id']}"),
                                 ("GET", "/api/kernels"), ("GET", "/api/cloudgpu/host")]:
                with pytest.raises(AuthenticationError, match="403"):
                    await host.request(method, path)
            with pytest.raises(AuthenticationError, match="403"):
                await host.connect(theirs["kernel_id"], lambda *a: None)

    asyncio.run(with_alices_token())
    assert host_of(hosts, theirs["host_url"]).kernel_alive(theirs["kernel_id"])
    assert bob.get(theirs["id"])["state"] == "running"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("token", [None, "", "not-a-pool-token"])
def test_pool_without_a_valid_token_is_403_with_a_clear_message(
        pool: UsersPool, token: str | None) -> None:
    headers = {} if token is None else {"Authorization": f"token {token}".strip()}
    for method, path in [("GET", "/api/pool"), ("GET", "/api/hardware"),
                         ("GET", "/api/sessions"), ("POST", "/api/sessions"),
                         ("GET", "/api/cost"), ("DELETE", "/api/sessions/00ff")]:
        response = httpx.request(method, pool.url + path, headers=headers, timeout=30)
        assert response.status_code == 403, (path, response.text)
        message = response.json()["message"]
        assert ("wrong" if token else "missing") in message and "CLOUDGPU_TOKEN" in message


# --- 8. bad requests ----------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("body,status,says", [
    ({"hardware": "H1000"}, 400, "Unknown GPU `H1000`. Did you mean `H100`?"),
    ({"hardware": "H100:0"}, 400, "from 1 to"),
    ({"hardware": "H100:two"}, 400, "whole number"),
    ({"hardware": "H100|"}, 400, "empty alternative"),
    ({"hardware": "H100|h100"}, 400, "twice"),
    ({"hardware": ""}, 400, "Empty hardware spec"),
    ({"hardware": "   "}, 400, "Empty hardware spec"),
    ({"hardware": 100}, 400, 'Give the hardware: {"hardware": "H100"}'),
    ({"hardware": ["H100"]}, 400, 'Give the hardware'),
    ({}, 400, "Give the hardware"),
    ({"hardware": "H100:3"}, 409, "No host in this pool can ever give `H100:3`"),
    ({"hardware": "H200"}, 409, "No host in this pool can ever give `H200`"),
    ({"hardware": "A100-80GB:3"}, 409, "at most 2 per host"),
    ({"hardware": "H100", "max_cost": -1}, 400, "max_cost must be a positive number"),
    ({"hardware": "H100", "max_cost": 0}, 400, "max_cost must be a positive number"),
    ({"hardware": "H100", "max_cost": "abc"}, 400, "`max_cost` must be a number"),
    ({"hardware": "H100", "max_cost": True}, 400, "`max_cost` must be a number"),
    ({"hardware": "H100", "idle_timeout": "soon"}, 400, "`idle_timeout` must be a number"),
])
def test_bad_session_requests_get_clear_errors_and_create_nothing(
        pool: UsersPool, body: dict[str, Any], status: int, says: str) -> None:
    alice = pool.user("alice")
    response = alice.request("POST", "/api/sessions", content=json.dumps(body))
    assert response.status_code == status, response.text
    assert says in response.json()["message"], response.text
    assert alice.sessions() == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("options", [{"max_cost": float("nan")}, {"max_cost": float("inf")},
                                     {"idle_timeout": -5}, {"idle_timeout": float("nan")}])
def test_non_finite_budgets_and_negative_timeouts_are_refused(
        pool: UsersPool, options: dict[str, float]) -> None:
    """JSON allows NaN and Infinity; neither is a budget, and a timeout is never negative.

    Every H100 is held first, so a request the pool wrongly accepts stays queued and is
    withdrawn at once: it never runs, so its timers cannot disturb the shared pool.
    """
    alice, bob = pool.user("alice"), pool.user("bob")
    bob.running(bob.create("H100:2")["id"])
    bob.running(bob.create("H100")["id"])
    response = alice.request("POST", "/api/sessions",
                             content=json.dumps({"hardware": "H100", **options}))
    if response.status_code == 201:
        alice.delete(response.json()["id"])
    assert response.status_code == 400, response.text
    name = next(iter(options))
    assert name in response.json()["message"], response.text


@pytest.mark.timeout(30)
def test_bad_request_bodies_and_session_ids(pool: UsersPool) -> None:
    alice = pool.user("alice")
    for content, says in [("{not json", "not JSON"), ('["H100"]', "JSON object")]:
        response = alice.request("POST", "/api/sessions", content=content)
        assert response.status_code == 400 and says in response.json()["message"], response.text
    for method in ("GET", "DELETE"):
        response = alice.request(method, "/api/sessions/0123456789abcdef")
        assert response.status_code == 404, response.text
        assert "No session `0123456789abcdef`" in response.json()["message"]
    s = alice.create("cpu")
    for params in ({"wait": "soon"}, {"wait": 5, "version": "latest"}):
        response = alice.request("GET", f"/api/sessions/{s['id']}", params=params)
        assert response.status_code == 400, (params, response.status_code, response.text)
        assert next(iter(reversed(params))) in response.json()["message"], response.text


# --- 10. backends -------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_backends_are_found_by_entry_point_name() -> None:
    assert load_backend("local") is LocalBackend
    assert load_backend("static") is StaticBackend
    assert issubclass(load_backend("static"), Backend)
    with pytest.raises(CloudGPUError) as info:
        load_backend("ray-but-misspelt")
    message = str(info.value)
    assert "Unknown pool backend `ray-but-misspelt`" in message
    assert "local" in message and "static" in message and "cloudgpu.backends" in message


# --- 9. the magic against the pool --------------------------------------------------------


@pytest.fixture
def notebook(pool: UsersPool) -> Iterator[BlockingKernelClient]:
    """A fresh local ipykernel whose %%remote cells go to the shared pool as alice.

    One per test: a test that fails with a hung cell must not leave the next one a busy kernel.
    """
    km, kc = start_kernel(CLOUDGPU_POOL=pool.url, CLOUDGPU_TOKEN=pool.tokens["alice"])
    try:
        ok(kc, "%load_ext cloudgpu")
        yield kc
    finally:
        stop_kernel(km, kc)


def _session_id(kc: BlockingKernelClient, spec: str) -> str:
    sid: str = value(kc, f"{CLIENT}.sessions[{spec!r}].grant.session_id")
    return sid


#: The notebook client's live H100 sessions (their keys), as ``value`` evaluates it.
LIVE_H100 = f"[key for key, s in {CLIENT}.sessions.items() if 'H100' in key and s.alive]"


@pytest.mark.timeout(90)
def test_magic_simulated_cost_line_and_a_new_session_after_idle_culling(
        notebook: BlockingKernelClient, pool: UsersPool) -> None:
    kc, alice = notebook, pool.user("alice")
    ok(kc, "base = 20")
    ex = ok(kc, "%%remote gpu=H100 idle_timeout=1\nseen = base + 1\n")
    assert value(kc, "seen") == 21
    quiet = ex.status_lines()[-1]
    assert "1x H100 (simulated)" in quiet, ex.describe()
    assert re.search(r"\d+\.\d\d s", quiet) and "$" in quiet, quiet
    assert "this cell" in quiet and "session" in quiet, quiet

    first = _session_id(kc, "H100")
    end = alice.ended(first, within=15)
    assert end["state"] == "stopped" and "idle" in end["stop_reason"], end
    # The next cell at once, whether or not the notebook's client has seen the cull yet:
    # the host stopped the kernel before the pool's ledger said so, and drops what reaches
    # a kernel it is stopping, so the cell cannot start there and runs on a new session.
    ex = ok(kc, "%%remote gpu=H100\nseen_again = base * 2\n")
    assert value(kc, "seen_again") == 40
    notes = [line for line in ex.status_lines() if "previous one was stopped" in line]
    assert notes and "idle" in notes[0], ex.describe()
    second = _session_id(kc, "H100")
    assert second != first and alice.get(second)["state"] == "running"


@pytest.mark.timeout(90)
def test_magic_cell_fails_clearly_when_max_cost_trips_mid_cell_on_simulated_h100(
        notebook: BlockingKernelClient, pool: UsersPool) -> None:
    kc = notebook
    ok(kc, "keep = 'local'")
    ex = run(kc, "%%remote gpu=H100 --new max_cost=2\n"
                 "import time\n"
                 "print('started', flush=True)\n"
                 "time.sleep(30)\n"
                 "keep = 'remote'\n", timeout=20)
    assert ex.status == "error", ex.describe()
    assert "started" in ex.stream()
    text = ex.error_text()
    assert "max_cost" in text and "$2.00" in text, text
    # The stopped session is let go at once: the next cell cannot reach its kernel while
    # the pool shuts it down (it did, and failed with the same error).
    assert value(kc, LIVE_H100) == []
    # Nothing local is lost and the notebook goes on.
    assert value(kc, "keep") == "local"
    ok(kc, "keep = keep.upper()")
    assert value(kc, "keep") == "LOCAL"
    ex = ok(kc, "%%remote gpu=H100\nprint(keep)\n")
    assert ex.stream() == "LOCAL\n"


@pytest.mark.timeout(90)
def test_magic_waits_live_for_simulated_h100s_bob_holds_then_runs_and_reports(
        notebook: BlockingKernelClient, pool: UsersPool) -> None:
    kc, alice, bob = notebook, pool.user("alice"), pool.user("bob")
    held = bob.running(bob.create("H100:2")["id"])  # the only host with two H100s
    released: list[float] = []

    def release_when_waiting(m: Message) -> None:
        if m.msg_type in ("display_data", "update_display_data") and not released \
                and "waiting for H100" in m.content["data"]["text/plain"]:
            bob.delete(held["id"])
            released.append(time.monotonic())

    ex = run(kc, "%%remote gpu=H100:2\nimport os\nprint(os.environ['CUDA_VISIBLE_DEVICES'])\n",
             on_message=release_when_waiting)
    assert ex.status == "ok", ex.describe()
    assert released, ex.describe()
    assert ex.stream() == "0,1\n"
    waiting = [line for line in ex.status_lines() if "waiting for H100" in line]
    assert waiting[0] == "cloudgpu: waiting for H100: you are next", ex.describe()
    sid = _session_id(kc, "H100:2")

    out = ok(kc, "%remote status").stream()
    row = next(line for line in out.splitlines() if sid in line)
    assert row.startswith("*") and "2x H100 (simulated)" in row and "running" in row, out

    out = ok(kc, "%remote hardware").stream()
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "3600.00" in rows["H100"] and "1/3 (simulated)" in rows["H100"], out
    assert "1800.00" in rows["A100-80GB"] and "3/3 (simulated)" in rows["A100-80GB"], out
    assert rows["H200"].split()[-1] == "-", out

    out = ok(kc, "%remote cost").stream()
    report = alice.cost()
    assert out.splitlines()[0].startswith("Today: $"), out
    assert "This notebook's sessions: $" in out
    row = next(line for line in out.splitlines() if sid in line)
    assert "2x H100 (simulated)" in row and "running" in row, out
    assert {s["id"] for s in report["sessions"]} <= set(re.findall(r"\b[0-9a-f]{16}\b", out))
    assert report["today"] > 0 and not math.isnan(report["today"])


@pytest.mark.timeout(60)
def test_magic_knows_hardware_types_the_pool_operator_added(
        notebook: BlockingKernelClient) -> None:
    # Not in the shipped catalog, so the pool's catalog decides: known there, but no host
    # has one, so the pool answers at once that it can never give it.
    ex = run(notebook, "%%remote gpu=mi300\nprint('ran')")
    assert ex.status == "error" and "ran" not in ex.stream()
    assert "No host in this pool can ever give `MI300X`" in ex.error_text(), ex.describe()
    # A typo is still a clear error, and the list of known names includes the pool's.
    ex = run(notebook, "%%remote gpu=MI3000X\nprint('ran')")
    assert "Unknown GPU `MI3000X`" in ex.error_text() and "MI300X" in ex.error_text()


@pytest.mark.timeout(60)
def test_magic_shows_the_80_percent_budget_warning_under_the_next_cell(
        notebook: BlockingKernelClient, pool: UsersPool) -> None:
    kc, alice = notebook, pool.user("alice")
    ok(kc, "import cloudgpu.client as _c\n_c.WARNINGS_EVERY = 0  # ask on every cell")
    # $1/s: the pool warns at $16 (after 16 s) and stops the session at $20, so once the
    # warning is there the next cell has 4 s to run, not a fraction of a second.
    first = ok(kc, "%%remote gpu=H100 max_cost=20\npass")
    assert "⚠" not in first.status_lines()[-1]
    alice.wait_for(_session_id(kc, "H100"), lambda s: bool(s["warnings"]), within=30)
    line = ok(kc, "%%remote gpu=H100\npass").status_lines()[-1]
    assert "⚠ 80% of the session's max_cost of $20.00 used" in line, line


@pytest.mark.parametrize(("seconds", "reads"), [
    (1.5, "2 s"), (119, "119 s"), (120, "2 min"), (900, "15 min"), (7199, "120 min"),
    (7200, "2 h"), (86400, "24 h"),
])
def test_durations_in_stop_reasons_read_in_a_unit_that_fits(seconds: float, reads: str) -> None:
    """A day's busy_disconnected_timeout reads ``24 h``, not ``1440 min``."""
    assert duration(seconds) == reads
