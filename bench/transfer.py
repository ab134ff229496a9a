"""Variable transfer: push and pull of float64 arrays through `%%remote` on a warm session.

Sizes: 8 MB, 80 MB and 800 MB (``--quick``: 8 and 80 MB). Push is a cell that reads a
freshly made local array (new contents every repetition, so the fingerprint cache cannot
skip it); pull is a cell that binds a new remote name to a freshly made remote array (made
in an untimed cell before, so the timed cell only moves it). Throughput is
size / median(cell time - the time of an empty `%%remote` cell run just before it), cell
time as a notebook frontend sees it (jupyter_client execute request to idle). Pairing each
cell with an empty one, rather than subtracting one median taken at the start, keeps the
slow and fast spells of a shared machine out of the difference, which for 8 MB is a
few milliseconds between two cells of 20-30.

Baselines, measured in the same run on the same path: raw websocket throughput (a
`websockets` client and server on 127.0.0.1, 4 MiB binary messages, no compression; for
pull the server sends), raw TCP (``sendall`` to a sink; for pull the server sends; both
receive into buffers they use over and over, so for pull the note adds raw TCP into fresh
memory, which a receiver that keeps the value cannot avoid), and
ipyparallel ``view.push({'x': a}, block=True)`` / ``view.pull('x', block=True)`` with one
local engine, called from this process right after each of ours (its cluster idles
beside ours throughout). The raw baselines only count the bytes they receive; ours and
ipyparallel's also rebuild the array. Memory: the peak RSS of the local kernel, the remote
kernel (and the host server between them) during the timed cell, as (peak - RSS before) /
size; the side that receives the value must hold it once, so its "extra copies" are that
minus one.

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
import mmap
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
N_EMPTY = 5 if QUICK else 10  # warm-up cells before the first size
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

    def pull(self, nbytes: int, fresh: bool = False) -> float:
        """Seconds to receive ``nbytes``: into one small buffer used over and over, or
        (``fresh``) into a new mapping of them all, as a receiver that keeps the value
        must (its pages fault in as the bytes arrive; unmapping it is not timed)."""
        start = time.perf_counter()
        whole = memoryview(mmap.mmap(-1, nbytes)) if fresh else None
        self.sock.sendall(b"G" + nbytes.to_bytes(8, "little"))
        left = nbytes
        while left:
            into = self.buf if whole is None else whole[nbytes - left:]
            got = self.sock.recv_into(into, min(left, CHUNK))
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


def rate(size_mb: float, seconds: Sequence[float]) -> float | str:
    """MB/s from the median time."""
    net = statistics.median(seconds)
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


class Ipyparallel:
    """One local ipyparallel engine, driven from this process: the baseline, timed in the
    same loop as ours so that both see the same moment of a noisy machine."""

    def __init__(self) -> None:
        #: Why it could not run, or None.
        self.unavailable: str | None = None
        try:
            import ipyparallel as ipp
        except ImportError:
            self.unavailable = "ipyparallel is not installed"
            return
        self._cluster = ipp.Cluster(n=1, controller_ip="127.0.0.1", log_level=40)
        try:
            self._rc = self._cluster.start_and_connect_sync()
            self._rc.wait_for_engines(1, timeout=60)
        except Exception as e:
            with contextlib.suppress(Exception):
                self._cluster.stop_cluster_sync()
            self.unavailable = f"ipyparallel did not start: {type(e).__name__}: {e}"
            return
        self._view = self._rc[0]

    def push(self, size_mb: int, fill: float) -> float:
        """Seconds to push a fresh array of ``size_mb`` MB as ``x``."""
        a = np.full(size_mb * MB // 8, fill)
        start = time.perf_counter()
        self._view.push({"x": a}, block=True)
        return time.perf_counter() - start

    def pull(self, size_mb: int) -> float:
        """Seconds to pull ``x`` back (the array the last push sent)."""
        start = time.perf_counter()
        back = self._view.pull("x", block=True)
        seconds = time.perf_counter() - start
        if back.nbytes != size_mb * MB:
            raise RuntimeError("ipyparallel pulled the wrong size")
        self._view.execute("x = None", block=True)
        return seconds

    def close(self) -> None:
        if self.unavailable is None:
            self._rc.close()
            self._cluster.stop_cluster_sync()


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
            t, t_inner = self.empty_once()
            if i >= 2:
                outer.append(t)
                inner.append(t_inner)
        return outer, inner

    def empty_once(self) -> tuple[float, float]:
        """(cell seconds, CellResult.seconds) of one empty cell."""
        return self.kernel.run("%%remote gpu=cpu\npass"), self.inner()

    def _measured(self, code: str) -> tuple[float, dict[str, int]]:
        """Run ``code``; (seconds, {process: peak RSS growth in bytes})."""
        pids = {"local": self.local_pid, "remote": self.remote_pid, "host": self.host_pid}
        before = {}
        for name, pid in pids.items():
            reset_peak_rss(pid)
            before[name] = rss(pid)
        seconds = self.kernel.run(code)
        return seconds, {name: peak_rss(pid) - before[name] for name, pid in pids.items()}

    def push(self, size_mb: int) -> Timed:
        """Push a fresh local array, an empty cell just before it."""
        self.fill += 1
        self.kernel.run("%%remote gpu=cpu --no-pull\nx = None")  # the old copy goes first
        self.kernel.run(f"x = None\nx = np.full({size_mb * MB // 8}, {self.fill})")
        empty = self.empty_once()
        seconds, grown = self._measured("%%remote gpu=cpu --no-pull\nn_ = x.size")
        sent = self.kernel.value("_magic.last_result.sent['x']['bytes']")
        if sent < size_mb * MB:
            raise RuntimeError(f"x was not sent whole: {sent} bytes (fingerprint cache?)")
        return Timed(seconds - empty[0], self.inner() - empty[1], empty[0], grown)

    def pull(self, size_mb: int) -> Timed:
        """Pull a fresh remote array, an empty cell just before it."""
        self.fill += 1
        self.kernel.run(f"%%remote gpu=cpu --no-pull\ny = None\n"
                        f"z = np.full({size_mb * MB // 8}, {self.fill})")
        self.kernel.run("y = None")
        empty = self.empty_once()
        seconds, grown = self._measured("%%remote gpu=cpu\ny = z")
        got = self.kernel.value("_magic.last_result.received['y']['bytes']")
        ok = self.kernel.value(f"bool(y.nbytes == {size_mb * MB} and y[-1] == {self.fill})")
        if got < size_mb * MB or not ok:
            raise RuntimeError(f"y did not come back whole: {got} bytes received")
        return Timed(seconds - empty[0], self.inner() - empty[1], empty[0], grown)

    def clear(self) -> None:
        self.kernel.run("%%remote gpu=cpu --no-pull\nx = y = z = None")
        self.kernel.run("x = y = None")

    def close(self) -> None:
        self.kernel.close()


@dataclass
class Timed:
    """One timed transfer cell, less the empty cell run just before it."""

    net: float  # cell seconds - the empty cell's
    inner: float  # CellResult.seconds - the empty cell's
    empty: float  # the empty cell's seconds
    grown: dict[str, int]  # {process: peak RSS growth in bytes}


def _directions() -> dict[str, list[float]]:
    return {"push": [], "pull": []}


@dataclass
class Measured:
    """One size: per direction, our net seconds, CellResult.seconds and the paired empty
    cells', RSS growth, and ipyparallel's seconds in the same loop."""

    net: dict[str, list[float]] = field(default_factory=_directions)
    inner: dict[str, list[float]] = field(default_factory=_directions)
    empty: dict[str, list[float]] = field(default_factory=_directions)
    ipp: dict[str, list[float]] = field(default_factory=_directions)
    growth: dict[str, list[int]] = field(default_factory=dict)


def measure(ours: Ours, size_mb: int, reps: int, warmup: int,
            ipp: Ipyparallel | None = None) -> Measured:
    """Alternate push and pull of ``size_mb`` MB, ``warmup + reps`` times each, each of
    ours right after an empty cell and right before ipyparallel's (where given)."""
    found = Measured()
    for i in range(warmup + reps):
        for direction in ("push", "pull"):
            timed = ours.push(size_mb) if direction == "push" else ours.pull(size_mb)
            theirs = None
            if ipp is not None:
                theirs = ipp.push(size_mb, ours.fill) if direction == "push" \
                    else ipp.pull(size_mb)
            if i < warmup:
                continue
            found.net[direction].append(timed.net)
            found.inner[direction].append(timed.inner)
            found.empty[direction].append(timed.empty)
            if theirs is not None:
                found.ipp[direction].append(theirs)
            for side, value in timed.grown.items():
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
    ipp = Ipyparallel()
    try:
        with host() as (url, token, host_pid), \
                pool([(url, token)]) as (pool_url, pool_token):
            ours = Ours(pool_url, pool_token, host_pid)
            try:
                ours.empty(N_EMPTY)  # warm-up
                for i, size in enumerate(SIZES_MB):
                    results[size] = measure(ours, size, REPS[size], warmup=1 if i == 0 else 0,
                                            ipp=ipp if ipp.unavailable is None else None)
            finally:
                ours.close()
    finally:
        ipp.close()
    raw: dict[str, dict[int, tuple[float | str, ...]]] = {"ws": {}, "tcp": {}}
    fresh: dict[int, float | str] = {}  # raw TCP pulls into new memory: a pull's floor
    with baseline_server() as ports:
        for kind, cls in (("ws", RawWebsocket), ("tcp", RawTCP)):
            client = cls(ports[kind])
            try:
                for size in SIZES_MB:
                    raw[kind][size] = raw_rates(client, size, REPS[size])
                    if isinstance(client, RawTCP):
                        fresh[size] = rate(size, repeat(
                            lambda n=size * MB, c=client: c.pull(n, fresh=True), REPS[size],
                            warmup=1))
            finally:
                client.close()
    empties = [t for found in results.values() for d in found.empty.values() for t in d]
    throughput.rows.append(["empty `%%remote` cell (subtracted, each just before)",
                            f"{median_ms(empties):.1f} ms", "-", "-", "-", "-", "-",
                            f"{min(empties) * 1000:.1f}-{max(empties) * 1000:.1f} ms over the run"])
    for size in SIZES_MB:
        found = results[size]
        for d, direction in enumerate(("push", "pull")):
            mine = rate(size, found.net[direction])
            inner = rate(size, found.inner[direction])
            ipp_rate = rate(size, found.ipp[direction]) if found.ipp[direction] else "skipped"
            ws, tcp = raw["ws"][size][d], raw["tcp"][size][d]
            met = []
            if isinstance(mine, float) and isinstance(ipp_rate, float):
                met.append("2x ipyparallel " + ("met" if mine >= 2 * ipp_rate else "MISSED"))
            if isinstance(mine, float) and isinstance(ws, float):
                met.append("70% websocket " + ("met" if mine >= 0.7 * ws else "MISSED"))
            floor = (f"raw TCP into fresh memory {fmt_rate(fresh[size])}; "
                     if direction == "pull" else "")
            throughput.rows.append([
                f"{direction} {size} MB", fmt_rate(mine), fmt_rate(ipp_rate), fmt_rate(ws),
                fmt_rate(tcp), ratio(mine, ipp_rate), ratio(mine, ws),
                f"cell - empty {median_ms(found.net[direction]):,.1f} ms; by CellResult.seconds "
                f"{fmt_rate(inner)}; {floor}" + ", ".join(met)])
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
    if ipp.unavailable is not None:
        throughput.rows.append(["ipyparallel", "skipped", "-", "-", "-", "-", "-",
                                ipp.unavailable])


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
                            ours.empty(3)  # warm-up
                            found = measure(ours, WAN_MB, WAN_REPS, warmup=0)
                        finally:
                            ours.close()
                    time.sleep(DRAIN)
    except _wan.Unavailable as e:
        for direction in ("push", "pull"):
            table.add(f"{direction} {WAN_MB} MB, 50 ms / 1 Gbit/s link", "skipped", None,
                      note=str(e))
        return
    empties = found.empty["push"] + found.empty["pull"]
    table.add("empty `%%remote` cell on the link (subtracted, each just before)",
              median_ms(empties), None)
    for d, direction in enumerate(("push", "pull")):
        times = found.net[direction]
        mine = rate(WAN_MB, times)
        share = f"{mine / LINK_MB_S:.0%} of the link rate" if isinstance(mine, float) else ""
        met = "met" if isinstance(mine, float) and mine >= 0.9 * LINK_MB_S else "MISSED"
        table.add(f"{direction} {WAN_MB} MB vs raw TCP through the same relay", mine, tcp[d],
                  unit="MB/s", note=f"cell - empty {median_ms(times):,.0f} ms")
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
