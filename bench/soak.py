"""Soak: N sessions x cells for T minutes, with connections dropped and kernels killed at random.

Real processes: a ``cloudgpu host`` with simulated GPUs, a static pool over it, and the
client's session layer (the one ``%%remote`` and the Cloud GPU kernel use) in this
process, reaching the host through a TCP proxy (``tests/faults/tcp_proxy.py``) that a
chaos task tells, at random moments, to reset every connection. The chaos task also kills
a random session's remote kernel now and then (SIGKILL, as the OOM killer would).

Every cell prints numbered lines with a random token. What must hold, and is printed:

- outputs: every line of every cell that completed was received, in order, once;
  cells hit by a kernel kill failed saying the kernel died (and nothing else failed);
- money: for every session, the ledger's billed time matches what this process measured
  from grant to release (or to the kill), within the heartbeat and meter resolution;
- hardware: once everything is released, no GPU is held and no kernel is left running.

Usage: ``make soak`` (``SOAK_MINUTES``, default 2), or
``python bench/soak.py --minutes 2 --sessions 4``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from _util import Table, host, machine, pool

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "faults"))
from tcp_proxy import TcpProxy, port_of

from cloudgpu import _loop
from cloudgpu.client import Client
from cloudgpu.errors import CloudGPUError, RemoteKernelDiedError
from cloudgpu.hardware import parse_spec
from cloudgpu.pool_client import PoolProvider

POOL_CONFIG = """\
c.PoolApp.cull_interval = 0.5
c.PoolApp.meter_interval = 0.5
c.PoolApp.heartbeat_interval = 1.0
c.PoolApp.warm_kernels = {}
c.PoolApp.disconnected_timeout = 0
"""
LINES = 40


@dataclass
class Tally:
    """What the soak saw."""

    cells_ok: int = 0
    cells_killed: int = 0
    cells_failed_otherwise: list[str] = field(default_factory=list)
    lines_expected: int = 0
    lines_received: int = 0
    lines_wrong: int = 0
    drops: int = 0
    kills: int = 0
    reconnects: int = 0
    measured: dict[str, float] = field(default_factory=dict)  # session id -> seconds


class Soak:
    def __init__(self, client: Client, sessions: int, deadline: float, seed: int) -> None:
        self.client = client
        self.keys = [f"soak-{i}" for i in range(sessions)]
        self.deadline = deadline
        self.random = random.Random(seed)
        self.tally = Tally()
        self.granted: dict[str, float] = {}  # session id -> monotonic grant time
        self.links: dict[str, int] = {}  # session id -> reconnects of its connection
        self.ended: dict[str, float] = {}

    async def worker(self, key: str, spec: str) -> None:
        while time.monotonic() < self.deadline:
            try:
                session = await self.client.session(parse_spec(spec), key=key)
            except CloudGPUError as e:
                self.tally.cells_failed_otherwise.append(f"getting a session: {e}")
                continue
            sid = session.grant.session_id or ""
            self.granted.setdefault(sid, time.monotonic())
            token = secrets.token_hex(4)
            lines: list[str] = []
            partial = [""]

            def sink(kind: str, payload: dict[str, object], lines: list[str] = lines,
                     partial: list[str] = partial) -> None:
                if kind == "output" and payload["msg_type"] == "stream":  # type: ignore[index]
                    partial[0] += payload["content"]["text"]  # type: ignore[index]
                    *done, partial[0] = partial[0].split("\n")
                    lines.extend(done)

            code = (f"import time\nfor i in range({LINES}):\n"
                    f"    print({token!r}, i, flush=True)\n    time.sleep(0.01)\n")
            try:
                result = await session.run_cell(code, {}, [], sink)
            except RemoteKernelDiedError:
                self.tally.cells_killed += 1
                self.ended.setdefault(sid, time.monotonic())
                continue
            except CloudGPUError as e:
                self.tally.cells_failed_otherwise.append(f"{type(e).__name__}: {e}")
                continue
            if result.status != "ok":
                self.tally.cells_failed_otherwise.append(str(result.error))
                continue
            expected = [f"{token} {i}" for i in range(LINES)]
            self.tally.cells_ok += 1
            self.tally.lines_expected += LINES
            self.tally.lines_received += len(lines)
            self.tally.lines_wrong += sum(a != b for a, b in zip(lines, expected, strict=False))
            self.tally.lines_wrong += abs(len(lines) - LINES)
            self.links[sid] = session.kernel.link.reconnects
        session = self.client.sessions.get(key)
        if session is not None:
            sid = session.grant.session_id or ""
            await self.client.release(session)
            self.ended.setdefault(sid, time.monotonic())

    async def chaos(self, proxy: TcpProxy) -> None:
        loop = asyncio.get_running_loop()
        while time.monotonic() < self.deadline - 2:
            await asyncio.sleep(self.random.uniform(0.5, 2.5))
            if self.random.random() < 0.75:
                self.tally.drops += await loop.run_in_executor(None, proxy.drop) > 0
                continue
            live = [s for s in self.client.sessions.values() if s.alive and s.remote]
            if live:
                victim = self.random.choice(live)
                try:
                    os.kill(int(victim.remote["pid"]), signal.SIGKILL)
                except ProcessLookupError:
                    continue  # killed before, and its client has not heard yet
                self.tally.kills += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES",
                                                                                2)))
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    print(f"soak on {machine()}: {args.sessions} sessions, {args.minutes:g} min, "
          f"seed {args.seed}", flush=True)
    with host(simulate="H100:4") as (host_url, host_token, _pid):
        proxy = TcpProxy(("127.0.0.1", port_of(host_url)))
        try:
            with pool([(proxy.url, host_token)], config=POOL_CONFIG) as (pool_url, pool_token):
                soak, ledger, left = _loop.run_sync(run(args, pool_url, pool_token, proxy))
                gpus = httpx.get(f"{host_url}/api/cloudgpu/host", timeout=30,
                                 headers={"Authorization": f"token {host_token}"}).json()
                kernels = httpx.get(f"{host_url}/api/kernels", timeout=30,
                                    headers={"Authorization": f"token {host_token}"}).json()
        finally:
            proxy.close()
    report(soak, ledger, left, gpus["inventory"]["gpus"], kernels)


async def run(args: argparse.Namespace, pool_url: str, pool_token: str,
              proxy: TcpProxy) -> tuple[Soak, list[dict[str, object]], list[dict[str, object]]]:
    provider = PoolProvider(pool_url, pool_token)
    client = Client(provider, reconnect_timeout=60)
    soak = Soak(client, args.sessions, time.monotonic() + args.minutes * 60, args.seed)
    specs = ["H100" if i % 2 else "cpu" for i in range(args.sessions)]
    await asyncio.gather(*(soak.worker(k, s) for k, s in zip(soak.keys, specs, strict=True)),
                         soak.chaos(proxy))
    await client.aclose()
    async with httpx.AsyncClient(headers={"Authorization": f"token {pool_token}"}) as http:
        ledger = (await http.get(f"{pool_url}/api/sessions", params={"all": 1})).json()
        active = (await http.get(f"{pool_url}/api/sessions")).json()
    soak.tally.reconnects = sum(soak.links.values())
    for sid, start in soak.granted.items():
        soak.tally.measured[sid] = soak.ended.get(sid, time.monotonic()) - start
    return soak, ledger["sessions"], active["sessions"]


def report(soak: Soak, ledger: list[dict[str, object]], active: list[dict[str, object]],
           gpus: list[dict[str, object]], kernels: list[dict[str, object]]) -> None:
    t = soak.tally
    table = Table("Soak: sessions under dropped connections and killed kernels",
                  columns=("measure", "got", "expected", "ratio", "note"))
    table.add("cells completed / failed by a kernel kill", f"{t.cells_ok} / {t.cells_killed}",
              None, note=f"{t.drops} drops, {t.kills} kernel kills, {t.reconnects} reconnects")
    table.add("cells that failed for any other reason", str(len(t.cells_failed_otherwise)),
              "0", note="; ".join(t.cells_failed_otherwise[:3]))
    table.add("output lines received (completed cells)", f"{t.lines_received:,}",
              f"{t.lines_expected:,}", note=f"{t.lines_wrong} missing, doubled or out of order")
    worst = 0.0
    by_id = {str(s["id"]): s for s in ledger}
    for sid, measured in t.measured.items():
        s = by_id.get(sid)
        if s is None or s.get("started") is None or s.get("ended") is None:
            worst = float("inf")
            continue
        billed = float(s["ended"]) - float(s["started"])  # type: ignore[arg-type]
        worst = max(worst, abs(billed - measured))
    table.add("sessions in the ledger", str(len(by_id)), str(len(t.measured)))
    table.add("worst |billed - measured| per session", worst * 1000, None,
              note="grant-to-release here vs started-to-ended in the ledger; "
                   "resolution: the pool's meter and heartbeat (0.5-1 s) plus a round trip")
    held = [g for g in gpus if g.get("kernel_id")]
    table.add("GPUs still held / kernels left / sessions active", f"{len(held)} / "
              f"{len(kernels)} / {len(active)}", "0 / 0 / 0")
    table.show()
    ok = (not t.cells_failed_otherwise and t.lines_wrong == 0
          and t.lines_received == t.lines_expected and not held and not kernels and not active
          and worst < 2.5)
    print("soak: zero loss" if ok else "soak: LOSS FOUND (see the table)", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
