"""Variable transfer: push and pull of float64 arrays through `%%remote` on a warm session.

Sizes: 8 MB, 80 MB and 800 MB (``--quick``: 8 and 80 MB). Push is a cell that reads a
freshly made local array (new contents every repetition, so the fingerprint cache cannot
skip it); pull is a cell that binds a new remote name to a freshly made remote array (made
in an untimed cell before, so the timed cell only moves it). Throughput is
size / (cell time - an empty `%%remote` cell's time), cell time as a notebook frontend
sees it (jupyter_client execute request to idle).

Baselines, measured in the same run on the same path: raw websocket throughput (a
`websockets` client and server on 127.0.0.1, 4 MiB binary messages, no compression; for
pull the server sends), raw TCP (``sendall`` to a sink; for pull the server sends), and
ipyparallel ``view.push({'x': a}, block=True)`` / ``view.pull('x', block=True)`` with one
local engine, called from this process. The raw baselines only count the bytes they
receive; ours and ipyparallel's also rebuild the array. Memory: the peak RSS of the local
kernel, the remote kernel (and the host server between them) during the timed cell, as
(peak - RSS before) / size; the side that
receives the value must hold it once, so its "extra copies" are that minus one.

On the emulated WAN link (see _wan.py: 1 Gbit/s, 50 ms round trip; host inside the
namespace behind the DelayRelay, pool on loopback): push and pull of 80 MB against raw
TCP through the same relay and against the link rate (125 MB/s).

Targets (issue 5): at least 2x ipyparallel and at least 70% of raw websocket throughput
on loopback, at least 90% of the link rate on the WAN, no more than one extra copy of the
data in memory on either side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import _wan
import numpy as np
from _util import (
    QUICK,
    Kernel,
    Table,
    host,
    machine,
    median_ms,
    peak_rss,
    pool,
    repeat,
    reset_peak_rss,
    rss,
)

MB = 1_000_000
SIZES_MB = (8, 80) if QUICK else (8, 80, 800)
REPS = {8: 3, 80: 2, 800: 2} if QUICK else {8: 10, 80: 5, 800: 3}
N_EMPTY = 10 if QUICK else 30
WAN_MB = 80
WAN_REPS = 2 if QUICK else 4
LINK_MB_S = 125.0  # 1 Gbit/s
CHUNK = 4 * 2**20  # the same message size cloudgpu uses (cloudgpu._transfer.CHUNK)

# A sink/source for the raw baselines: TCP and websocket, each on a port of its own.
# TCP: b"P" + 8-byte length, then that many bytes -> answers b"k";
#      b"G" + 8-byte length -> sends that many bytes.
# Websocket: text "push N", then binary messages totalling N bytes -> answers "ok";
#            text "pull N" -> binary messages of up to 4 MiB totalling N bytes.
SERVER = r"""
import asyncio, json, socket, sys, threading
from websockets.asyncio.server import serve
ip, CHUNK = sys.argv[1], 4 * 2**20
blob = memoryview(bytes(CHUNK))

def recv_exact(c, n):
    data = b""
    while len(data) < n:
        got = c.recv(n - len(data))
        if not got:
            return None
        data += got
    return data

def tcp_conn(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(CHUNK)
    with c:
        while (head := recv_exact(c, 9)) is not None:
            n = int.from_bytes(head[1:], "little")
            if head[:1] == b"P":
                while n:
                    got = c.recv_into(buf, min(n, CHUNK))
                    if not got:
                        return
                    n -= got
                c.sendall(b"k")
            else:
                while n:
                    k = min(n, CHUNK)
                    c.sendall(blob[:k])
                    n -= k

def tcp_serve(s):
    while True:
        c, _ = s.accept()
        threading.Thread(target=tcp_conn, args=(c,), daemon=True).start()

async def ws_handler(ws):
    async for m in ws:
        op, n = m.split()
        n = int(n)
        if op == "push":
            while n > 0:
                n -= len(await ws.recv())
            await ws.send("ok")
        else:
            while n:
                k = min(n, CHUNK)
                await ws.send(blob[:k])
                n -= k

async def main():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, 0))
    s.listen(8)
    threading.Thread(target=tcp_serve, args=(s,), daemon=True).start()
    async with serve(ws_handler, ip, 0, max_size=None, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        print(json.dumps({"tcp": s.getsockname()[1], "ws": port}), flush=True)
        await asyncio.Future()

asyncio.run(main())
"""


@contextlib.contextmanager
def baseline_server(prefix: Sequence[str] = (), ip: str = "127.0.0.1") -> Iterator[dict[str, int]]:
    """The raw TCP and websocket sink/source: {"tcp": port, "ws": port}."""
    proc = subprocess.Popen([*prefix, sys.executable, "-c", SERVER, ip],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line:
            raise RuntimeError("the baseline server did not start")
        yield json.loads(line)
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


class RawTCP:
    """One persistent TCP connection to the baseline server."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray(CHUNK)

    def push(self, data: memoryview) -> float:
        start = time.perf_counter()
        self.sock.sendall(b"P" + data.nbytes.to_bytes(8, "little"))
        self.sock.sendall(data)
        if self.sock.recv(1) != b"k":
            raise RuntimeError("raw TCP sink did not acknowledge")
        return time.perf_counter() - start

    def pull(self, nbytes: int) -> float:
        start = time.perf_counter()
        self.sock.sendall(b"G" + nbytes.to_bytes(8, "little"))
        left = nbytes
        while left:
            got = self.sock.recv_into(self.buf, min(left, CHUNK))
            if not got:
                raise RuntimeError("raw TCP source closed early")
            left -= got
        return time.perf_counter() - start

    def close(self) -> None:
        self.sock.close()


class RawWebsocket:
    """One persistent websocket to the baseline server, driven from a private event loop."""

    def __init__(self, port: int) -> None:
        from websockets.asyncio.client import connect

        self.loop = asyncio.new_event_loop()
        self.ws = self.loop.run_until_complete(
            connect(f"ws://127.0.0.1:{port}", max_size=None, compression=None))

    def push(self, data: memoryview) -> float:
        async def go() -> float:
            start = time.perf_counter()
            await self.ws.send(f"push {data.nbytes}")
            for offset in range(0, data.nbytes, CHUNK):
                await self.ws.send(data[offset: offset + CHUNK])
            if await self.ws.recv() != "ok":
                raise RuntimeError("raw websocket sink did not acknowledge")
            return time.perf_counter() - start
        return self.loop.run_until_complete(go())

    def pull(self, nbytes: int) -> float:
        async def go() -> float:
            start = time.perf_counter()
            await self.ws.send(f"pull {nbytes}")
            left = nbytes
            while left > 0:
                left -= len(await self.ws.recv())
            return time.perf_counter() - start
        return self.loop.run_until_complete(go())

    def close(self) -> None:
        self.loop.run_until_complete(self.ws.close())
        self.loop.close()


def rate(size_mb: float, seconds: Sequence[float], minus: float = 0.0) -> float | str:
    """MB/s from the median time, less ``minus`` seconds of fixed overhead."""
    net = statistics.median(seconds) - minus
    return size_mb / net if net > 0 else "n/a (below the empty-cell time)"


def array(size_mb: int, fill: float) -> memoryview:
    return memoryview(np.full(size_mb * MB // 8, fill)).cast("B")


def raw_rates(client: RawTCP | RawWebsocket, size_mb: int, reps: int, warmup: int = 1
              ) -> tuple[float | str, ...]:
    """(push MB/s, pull MB/s) for the raw baseline."""
    data = array(size_mb, 1.0)
    push = repeat(lambda: client.push(data), reps, warmup=warmup)
    pull = repeat(lambda: client.pull(size_mb * MB), reps, warmup=warmup)
    return rate(size_mb, push), rate(size_mb, pull)


def ipyparallel_rates(sizes: Sequence[int]) -> dict[int, tuple[float | str, float | str]] | str:
    """{size: (push MB/s, pull MB/s)} with one local engine, or why it could not run."""
    try:
        import ipyparallel as ipp
    except ImportError:
        return "ipyparallel is not installed"
    cluster = ipp.Cluster(n=1, controller_ip="127.0.0.1", log_level=40)
    try:
        rc = cluster.start_and_connect_sync()
    except Exception as e:
        with contextlib.suppress(Exception):
            cluster.stop_cluster_sync()
        return f"ipyparallel did not start: {type(e).__name__}: {e}"
    try:
        rc.wait_for_engines(1, timeout=60)
        view = rc[0]
        found: dict[int, tuple[float | str, float | str]] = {}
        for size in sizes:
            pushes, pulls = [], []
            for k in range(REPS[size] + 1):
                a = np.full(size * MB // 8, float(k))
                start = time.perf_counter()
                view.push({"x": a}, block=True)
                pushes.append(time.perf_counter() - start)
                del a
                start = time.perf_counter()
                back = view.pull("x", block=True)
                pulls.append(time.perf_counter() - start)
                if back.nbytes != size * MB:
                    raise RuntimeError("ipyparallel pulled the wrong size")
                del back
            view.execute("x = None", block=True)
            found[size] = (rate(size, pushes[1:]), rate(size, pulls[1:]))
        return found
    finally:
        rc.close()
        cluster.stop_cluster_sync()


# ---------------------------------------------------------------- cloudgpu in a local kernel


class Ours:
    """A local ipykernel with cloudgpu loaded and a warm `cpu` session."""

    def __init__(self, pool_url: str, token: str, host_pid: int) -> None:
        self.kernel = Kernel({"CLOUDGPU_POOL": pool_url, "CLOUDGPU_TOKEN": token})
        self.kernel.run("%load_ext cloudgpu\nimport numpy as np\n"
                        "from cloudgpu.client import get_client\n"
                        "_magic = get_ipython().magics_manager.registry['RemoteMagics']")
        self.kernel.run("%%remote gpu=cpu\nimport numpy as np", timeout=120)
        self.local_pid = self.kernel.pid()
        self.remote_pid = int(self.kernel.value("get_client().sessions['cpu'].remote['pid']"))
        self.host_pid = host_pid
        self.fill = 0.0

    def inner(self) -> float:
        """The last cell's CellResult.seconds: first byte sent to last byte received."""
        return float(self.kernel.value("_magic.last_result.seconds"))

    def empty(self, n: int) -> tuple[list[float], list[float]]:
        """(cell seconds, CellResult.seconds) of ``n`` empty cells after two warm-ups."""
        outer, inner = [], []
        for i in range(n + 2):
            t = self.kernel.run("%%remote gpu=cpu\npass")
            if i >= 2:
                outer.append(t)
                inner.append(self.inner())
        return outer, inner

    def _measured(self, code: str) -> tuple[float, dict[str, int]]:
        """Run ``code``; (seconds, {process: peak RSS growth in bytes})."""
        pids = {"local": self.local_pid, "remote": self.remote_pid, "host": self.host_pid}
        before = {}
        for name, pid in pids.items():
            reset_peak_rss(pid)
            before[name] = rss(pid)
        seconds = self.kernel.run(code)
        return seconds, {name: peak_rss(pid) - before[name] for name, pid in pids.items()}

    def push(self, size_mb: int) -> tuple[float, float, dict[str, int]]:
        """Push a fresh local array; (cell seconds, CellResult.seconds, RSS growth)."""
        self.fill += 1
        self.kernel.run("%%remote gpu=cpu --no-pull\nx = None")  # the old copy goes first
        self.kernel.run(f"x = None\nx = np.full({size_mb * MB // 8}, {self.fill})")
        seconds, grown = self._measured("%%remote gpu=cpu --no-pull\nn_ = x.size")
        sent = self.kernel.value("_magic.last_result.sent['x']['bytes']")
        if sent < size_mb * MB:
            raise RuntimeError(f"x was not sent whole: {sent} bytes (fingerprint cache?)")
        return seconds, self.inner(), grown

    def pull(self, size_mb: int) -> tuple[float, float, dict[str, int]]:
        """Pull a fresh remote array; (cell seconds, CellResult.seconds, RSS growth)."""
        self.fill += 1
        self.kernel.run(f"%%remote gpu=cpu --no-pull\ny = None\n"
                        f"z = np.full({size_mb * MB // 8}, {self.fill})")
        self.kernel.run("y = None")
        seconds, grown = self._measured("%%remote gpu=cpu\ny = z")
        got = self.kernel.value("_magic.last_result.received['y']['bytes']")
        ok = self.kernel.value(f"bool(y.nbytes == {size_mb * MB} and y[-1] == {self.fill})")
        if got < size_mb * MB or not ok:
            raise RuntimeError(f"y did not come back whole: {got} bytes received")
        return seconds, self.inner(), grown

    def clear(self) -> None:
        self.kernel.run("%%remote gpu=cpu --no-pull\nx = y = z = None")
        self.kernel.run("x = y = None")

    def close(self) -> None:
        self.kernel.close()


@dataclass
class Measured:
    """One size through cloudgpu: per direction, cell seconds, CellResult.seconds, growth."""

    cell: dict[str, list[float]] = field(default_factory=lambda: {"push": [], "pull": []})
    inner: dict[str, list[float]] = field(default_factory=lambda: {"push": [], "pull": []})
    growth: dict[str, list[int]] = field(default_factory=dict)


def measure(ours: Ours, size_mb: int, reps: int, warmup: int) -> Measured:
    """Alternate push and pull of ``size_mb`` MB, ``warmup + reps`` times each."""
    found = Measured()
    for i in range(warmup + reps):
        for direction, fn in (("push", ours.push), ("pull", ours.pull)):
            seconds, inner, grown = fn(size_mb)
            if i >= warmup:
                found.cell[direction].append(seconds)
                found.inner[direction].append(inner)
                for side, value in grown.items():
                    found.growth.setdefault(f"{direction} {side}", []).append(value)
    ours.clear()
    return found


def fmt_rate(v: float | str) -> str:
    return v if isinstance(v, str) else f"{v:,.0f} MB/s"


def ratio(a: float | str, b: float | str | None) -> str:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return f"{a / b:.2f}x"
    return "-"


# glibc serves allocations under its (adaptive, up to 32 MiB) mmap threshold from the heap,
# where pages freed by the previous repetition are reused: RSS growth means nothing there.
MIN_MEMORY_MB = 40
UNDER_MMAP = "not measured: under glibc's mmap threshold, freed heap pages are reused"


def loopback(throughput: Table, memory: Table) -> None:
    results: dict[int, Measured] = {}
    with host() as (url, token, host_pid), pool([(url, token)]) as (pool_url, pool_token):
        ours = Ours(pool_url, pool_token, host_pid)
        try:
            outer, inner = ours.empty(N_EMPTY)
            empty, empty_inner = statistics.median(outer), statistics.median(inner)
            for i, size in enumerate(SIZES_MB):
                results[size] = measure(ours, size, REPS[size], warmup=1 if i == 0 else 0)
        finally:
            ours.close()
    raw: dict[str, dict[int, tuple[float | str, ...]]] = {"ws": {}, "tcp": {}}
    with baseline_server() as ports:
        for kind, cls in (("ws", RawWebsocket), ("tcp", RawTCP)):
            client = cls(ports[kind])
            try:
                for size in SIZES_MB:
                    raw[kind][size] = raw_rates(client, size, REPS[size])
            finally:
                client.close()
    ipp = ipyparallel_rates(SIZES_MB)
    inner_note = f"CellResult.seconds {empty_inner * 1000:.1f} ms (the rest: local kernel, magic)"
    throughput.rows.append(["empty `%%remote` cell (subtracted)", f"{empty * 1000:.1f} ms",
                            "-", "-", "-", "-", "-", inner_note])
    for size in SIZES_MB:
        found = results[size]
        for d, direction in enumerate(("push", "pull")):
            times = found.cell[direction]
            mine = rate(size, times, minus=empty)
            inner = rate(size, found.inner[direction], minus=empty_inner)
            ipp_rate = ipp[size][d] if isinstance(ipp, dict) else "skipped"
            ws, tcp = raw["ws"][size][d], raw["tcp"][size][d]
            met = []
            if isinstance(mine, float) and isinstance(ipp_rate, float):
                met.append("2x ipyparallel " + ("met" if mine >= 2 * ipp_rate else "MISSED"))
            if isinstance(mine, float) and isinstance(ws, float):
                met.append("70% websocket " + ("met" if mine >= 0.7 * ws else "MISSED"))
            throughput.rows.append([
                f"{direction} {size} MB", fmt_rate(mine), fmt_rate(ipp_rate), fmt_rate(ws),
                fmt_rate(tcp), ratio(mine, ipp_rate), ratio(mine, ws),
                f"cell {median_ms(times):,.0f} ms; by CellResult.seconds "
                f"{fmt_rate(inner)}; " + ", ".join(met)])
            if size < MIN_MEMORY_MB:
                memory.rows.append([f"{direction} {size} MB", "-", "-", "-", UNDER_MMAP])
                continue
            # The receiving side must hold the value once: that is not an extra copy.
            extra = {}
            for side in ("local", "remote", "host"):
                grown = statistics.median(found.growth[f"{direction} {side}"]) / (size * MB)
                receives = (direction, side) in (("push", "remote"), ("pull", "local"))
                extra[side] = grown - 1 if receives else grown
            verdict = "met" if max(extra["local"], extra["remote"]) <= 1.0 else "MISSED"
            memory.rows.append([f"{direction} {size} MB", f"{extra['local']:.2f}",
                                f"{extra['remote']:.2f}", f"{extra['host']:.2f}",
                                f"<= 1 each side: {verdict}"])
    if isinstance(ipp, str):
        throughput.rows.append(["ipyparallel", "skipped", "-", "-", "-", "-", "-", ipp])


DRAIN = 0.5  # seconds for connections through a DelayRelay to close before it stops


def wan(table: Table) -> None:
    try:
        with _wan.namespace(rate="1gbit", rtt_ms=50) as link:
            with baseline_server(prefix=link.prefix, ip=link.host_ip) as ports, \
                    _wan.DelayRelay((link.host_ip, ports["tcp"]), link.rtt_ms / 2) as relay:
                client = RawTCP(relay.port)
                try:
                    # No warm-up needed: the relay's sockets see no delay (see _wan.py).
                    tcp = raw_rates(client, WAN_MB, WAN_REPS, warmup=0)
                finally:
                    client.close()
                    time.sleep(DRAIN)
            with host(prefix=link.prefix, ip=link.host_ip) as (url, token, host_pid):
                port = int(url.rsplit(":", 1)[1])
                with _wan.DelayRelay((link.host_ip, port), link.rtt_ms / 2) as relay:
                    with pool([(f"http://127.0.0.1:{relay.port}", token)]) as (pool_url, ptok):
                        ours = Ours(pool_url, ptok, host_pid)
                        try:
                            outer, _ = ours.empty(3 if QUICK else 10)
                            empty = statistics.median(outer)
                            found = measure(ours, WAN_MB, WAN_REPS, warmup=0)
                        finally:
                            ours.close()
                    time.sleep(DRAIN)
    except _wan.Unavailable as e:
        for direction in ("push", "pull"):
            table.add(f"{direction} {WAN_MB} MB, 50 ms / 1 Gbit/s link", "skipped", None,
                      note=str(e))
        return
    table.add("empty `%%remote` cell on the link (subtracted)", empty * 1000, None)
    for d, direction in enumerate(("push", "pull")):
        times = found.cell[direction]
        mine = rate(WAN_MB, times, minus=empty)
        share = f"{mine / LINK_MB_S:.0%} of the link rate" if isinstance(mine, float) else ""
        met = "met" if isinstance(mine, float) and mine >= 0.9 * LINK_MB_S else "MISSED"
        table.add(f"{direction} {WAN_MB} MB vs raw TCP through the same relay", mine, tcp[d],
                  unit="MB/s", note=f"cell {median_ms(times):,.0f} ms")
        table.add(f"{direction} {WAN_MB} MB vs the link rate (1 Gbit/s)", mine, LINK_MB_S,
                  unit="MB/s", note=f"{share}; target >= 90%: {met}")


def main() -> None:
    print(f"variable transfer on {machine()}{' (quick)' if QUICK else ''}", flush=True)
    started = time.perf_counter()
    throughput = Table("Variable transfer on loopback (MB/s = size / (cell - empty cell))",
                       columns=("transfer", "cloudgpu", "ipyparallel", "raw websocket",
                                "raw TCP", "ours / ipyparallel", "ours / websocket",
                                "note (targets: >= 2x ipyparallel, >= 70% websocket)"))
    memory = Table("Extra copies in memory during the transfer ((peak RSS - before) / size, "
                   "less the received value itself)",
                   columns=("transfer", "local kernel", "remote kernel",
                            "host server (between)", "target"))
    loopback(throughput, memory)
    throughput.show()
    memory.show()
    link = Table("Variable transfer on the emulated WAN (50 ms round trip, 1 Gbit/s)")
    wan(link)
    link.show()
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
