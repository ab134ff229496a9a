"""An emulated wide-area link for benchmarks: a network namespace, a veth pair, a rate limit
and a delay.

The host under test runs inside a namespace this module creates (``ip netns``), reached
over a veth pair whose both ends are shaped to the link rate with ``tbf``. This machine's
kernel has no ``netem``, so the delay is added in user space by a relay on 127.0.0.1 that
holds each chunk for half the round trip in each direction. The relay buffers without
limit, so TCP window effects of a real long link are not modelled: transfer figures on
this link are an upper bound for a real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

NS = "cloudgpu-bench"
HOST_IP, PEER_IP = "10.213.77.2", "10.213.77.1"


class Unavailable(RuntimeError):
    """Raised when the link cannot be emulated here (no root, no `ip`/`tc`)."""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _tc_rate(device: str, rate: str, netns: bool) -> None:
    cmd = ["tc", "qdisc", "add", "dev", device, "root", "tbf", "rate", rate, "burst", "256kb",
           "latency", "100ms"]
    subprocess.run(["ip", "netns", "exec", NS, *cmd] if netns else cmd, check=True,
                   capture_output=True)


@dataclass
class Link:
    """The emulated link: run servers inside with ``prefix``, reach them at ``host_ip``."""

    rtt_ms: float
    rate: str
    host_ip: str = HOST_IP

    @property
    def prefix(self) -> list[str]:
        """Prepend to a command to run it inside the namespace."""
        return ["ip", "netns", "exec", NS]


@contextlib.contextmanager
def namespace(rate: str = "1gbit", rtt_ms: float = 50.0) -> Iterator[Link]:
    """Create the namespace and shaped veth pair; remove them afterwards, whatever happens.

    Raises:
        Unavailable: without root, or without iproute2.
    """
    if os.geteuid() != 0:
        raise Unavailable("needs root to create a network namespace (run as root)")
    if not (shutil.which("ip") and shutil.which("tc")):
        raise Unavailable("needs iproute2 (`ip`, `tc`): apt-get install iproute2")
    subprocess.run(["ip", "link", "del", "cgb0"], capture_output=True)
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    try:
        _ip("netns", "add", NS)
        _ip("link", "add", "cgb0", "type", "veth", "peer", "name", "cgb1")
        _ip("link", "set", "cgb1", "netns", NS)
        _ip("addr", "add", f"{PEER_IP}/30", "dev", "cgb0")
        _ip("link", "set", "cgb0", "up")
        _ip("netns", "exec", NS, "ip", "addr", "add", f"{HOST_IP}/30", "dev", "cgb1")
        _ip("netns", "exec", NS, "ip", "link", "set", "cgb1", "up")
        _ip("netns", "exec", NS, "ip", "link", "set", "lo", "up")
        _tc_rate("cgb0", rate, netns=False)
        _tc_rate("cgb1", rate, netns=True)
        yield Link(rtt_ms, rate)
    except subprocess.CalledProcessError as e:
        raise Unavailable(f"`{' '.join(e.cmd)}` failed: {e.stderr.decode().strip()}") from e
    finally:
        subprocess.run(["ip", "link", "del", "cgb0"], capture_output=True)
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


class DelayRelay:
    """A TCP relay on 127.0.0.1 that delays every byte by ``one_way_ms`` in each direction."""

    def __init__(self, target: tuple[str, int], one_way_ms: float) -> None:
        self.target = target
        self.delay = one_way_ms / 1000
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="delay-relay")

    def __enter__(self) -> DelayRelay:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._shutdown)
        self._thread.join(10)

    def _shutdown(self) -> None:
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        self._loop.call_later(0.1, self._loop.stop)  # let the cancelled pumps unwind

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer),
                                 return_exceptions=True)
        except asyncio.CancelledError:
            pass  # the relay shuts down: asyncio's server would log a cancelled handler
        for w in (writer, up_writer):
            w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    writer.close()
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        task = asyncio.ensure_future(deliver())
        try:
            while True:
                try:
                    data = await reader.read(1 << 20)
                except ConnectionError:
                    data = b""
                await queue.put((time.monotonic() + self.delay, data))
                if not data:
                    break
            with contextlib.suppress(ConnectionError):
                await task
        finally:
            task.cancel()


_ECHO = ("import socket\ns=socket.socket()\n"
         "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR,1)\n"
        "s.bind(('{ip}', 7)); s.listen(1)\nc,_=s.accept()\n"
        "c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)\n"
        "while (d := c.recv(64)): c.sendall(d)\n")


def measured_rtt(link: Link, n: int = 20) -> float:
    """Median TCP round trip of one byte through a DelayRelay into the namespace, ms."""
    echo = subprocess.Popen([*link.prefix, sys.executable, "-c", _ECHO.format(ip=link.host_ip)])
    try:
        time.sleep(0.5)
        with DelayRelay((link.host_ip, 7), link.rtt_ms / 2) as relay, \
                socket.create_connection(("127.0.0.1", relay.port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            samples = []
            for _ in range(n):
                t = time.perf_counter()
                s.sendall(b"x")
                s.recv(1)
                samples.append(time.perf_counter() - t)
        return statistics.median(samples) * 1000
    finally:
        echo.kill()
        echo.wait()
