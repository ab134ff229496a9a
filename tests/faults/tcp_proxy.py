"""A TCP proxy on 127.0.0.1 that a test controls: it drops connections and refuses new ones.

It stands where a network would: between a client and a host. ``drop()`` resets every
connection through it at once (as a network that goes away does), ``drop_latest()`` only the
newest one; ``block()`` also refuses
new connections until ``unblock()`` (an outage). Made with ``accepting=False``, it is a server
too busy to accept: its accept queue stays full, so a client's connection is never made,
until ``start_accepting()``. ``hold()`` is a network that is slow one way: what hosts send
on the websockets through it (kernel channels) waits in the proxy, in order, until
``release()``, while what clients send still goes through (``hold(new=True)``: connections
made meanwhile too, from their first byte). It runs on its own event loop in a thread, so a
test can drive it from plain synchronous code. ``Rerouted`` is a pool provider whose
grants point elsewhere than the pool says (at a proxy, say).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from cloudgpu.hardware import HardwareSpec
from cloudgpu.pool_client import PoolProvider
from cloudgpu.provider import Grant

__all__ = ["Rerouted", "TcpProxy", "port_of"]


def port_of(url: str) -> int:
    """The port of ``http://127.0.0.1:PORT``."""
    return int(url.rstrip("/").rsplit(":", 1)[1])


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target``.

    Args:
        target: (host, port) to forward to.
        accepting: False: accept nothing until :meth:`start_accepting`.
    """

    def __init__(self, target: tuple[str, int], accepting: bool = True) -> None:
        self.target = target
        self.port = 0
        self.connections = 0  # accepted, over the proxy's life
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy",
                                        daemon=True)
        self._server: asyncio.Server | None = None
        # In the order they were accepted (a dict as an ordered set).
        self._pairs: dict[_Pair, None] = {}
        self._blocked = False
        self._holding_new = False  # new connections start held (``hold(new=True)``)
        # Not accepting: the listening socket, and the connection that fills its queue.
        self._listener: socket.socket | None = None
        self._queued: socket.socket | None = None
        self._thread.start()
        self.port = self._call(self._start(accepting))

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    async def _start(self, accepting: bool) -> int:
        if accepting:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            return int(self._server.sockets[0].getsockname()[1])
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(0)  # room for one connection waiting to be accepted: taken,
        self._queued = socket.create_connection(self._listener.getsockname())  # so SYNs drop
        return int(self._listener.getsockname()[1])

    async def _start_accepting(self) -> None:
        if self._server is not None or self._listener is None or self._queued is None:
            return
        self._listener.accept()[0].close()  # the connection that filled the queue
        self._queued.close()
        self._server = await asyncio.start_server(self._serve, sock=self._listener)

    def start_accepting(self) -> None:
        """A proxy made with ``accepting=False`` starts accepting (and forwarding)."""
        self._call(self._start_accepting())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._blocked:
            _reset(writer)
            return
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        pair = _Pair(writer, up_writer)
        if self._holding_new:
            pair.flowing.clear()
        self._pairs[pair] = None
        try:
            await asyncio.gather(_pump(reader, up_writer, seen=pair.sent),
                                 _pump(up_reader, writer, gate=pair.flowing))
        finally:
            self._pairs.pop(pair, None)
            for w in pair.writers:
                w.close()

    async def _drop(self, latest: bool = False) -> int:
        pairs = list(self._pairs)[-1:] if latest else list(self._pairs)
        for pair in pairs:
            for writer in pair.writers:
                _reset(writer)
            pair.flowing.set()  # nothing held is left to deliver
        return len(pairs)

    def drop(self) -> int:
        """Reset every connection through the proxy now; returns how many there were."""
        return int(self._call(self._drop()))

    def drop_latest(self) -> int:
        """Reset only the connection accepted last (if it is still open); returns 1 or 0."""
        return int(self._call(self._drop(latest=True)))

    async def _hold(self, new: bool) -> int:
        self._holding_new = new
        held = [pair for pair in self._pairs if pair.websocket]
        for pair in held:
            pair.flowing.clear()
            pair.sent_while_held = 0
        return len(held)

    def hold(self, new: bool = False) -> int:
        """Keep what hosts send on the open websockets in the proxy until :meth:`release`
        (what clients send goes on); returns how many websockets are held. With ``new``,
        connections accepted meanwhile are held from their start (a websocket's upgrade
        answer too: its client waits in the handshake)."""
        return int(self._call(self._hold(new)))

    def sent_while_held(self) -> int:
        """Bytes clients sent on the held websockets since :meth:`hold`."""
        return sum(pair.sent_while_held for pair in list(self._pairs)
                   if not pair.flowing.is_set())

    async def _release(self) -> None:
        self._holding_new = False
        for pair in self._pairs:
            pair.flowing.set()

    def release(self) -> None:
        """Deliver what :meth:`hold` kept, in order, and go on as before."""
        self._call(self._release())

    def block(self) -> int:
        """An outage: drop every connection and refuse new ones until ``unblock()``."""
        self._blocked = True
        return self.drop()

    def unblock(self) -> None:
        """The network is back."""
        self._blocked = False

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """``block()`` for the duration of the ``with``."""
        self.block()
        try:
            yield
        finally:
            self.unblock()

    def close(self) -> None:
        """Stop the proxy and its thread."""
        async def stop() -> None:
            await self._drop()
            if self._server is not None:
                self._server.close()
            for sock in (self._listener, self._queued):
                if sock is not None:
                    sock.close()

        self._call(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


class _Pair:
    """One connection through the proxy: the client's side and the target's."""

    def __init__(self, client: asyncio.StreamWriter, target: asyncio.StreamWriter) -> None:
        self.writers = (client, target)
        self.flowing = asyncio.Event()  # cleared: what the target sends waits
        self.flowing.set()
        self.websocket = False  # the client asked for an upgrade to a websocket
        self.sent_while_held = 0
        self._start = b""

    def sent(self, data: bytes) -> None:
        """What the client sent, on its way to the target."""
        if len(self._start) < 4096:
            self._start += data[:4096]
            self.websocket = b"upgrade: websocket" in self._start.lower()
        if not self.flowing.is_set():
            self.sent_while_held += len(data)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                seen: Callable[[bytes], None] | None = None,
                gate: asyncio.Event | None = None) -> None:
    """Copy ``reader`` to ``writer`` until EOF; ``seen`` is shown each chunk, and a cleared
    ``gate`` keeps each (and the EOF) until it is set."""
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(1 << 16):
            if seen is not None:
                seen(data)
            if gate is not None:
                await gate.wait()
            writer.write(data)
            await writer.drain()
    if gate is not None:
        await gate.wait()
    with contextlib.suppress(ConnectionError, OSError, RuntimeError):
        writer.write_eof()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset, as a broken network looks to both ends."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


class Rerouted(PoolProvider):
    """A pool's grants, with their host reached another way than the pool reaches it:
    ``to`` maps the host URLs the pool gives to those used here, or (a string) is where
    every host is reached (a test's proxy)."""

    def __init__(self, pool_url: str, token: str, to: str | Mapping[str, str]) -> None:
        super().__init__(pool_url, token)
        self.to = to

    async def acquire(self, spec: HardwareSpec, **kw: Any) -> Grant:
        grant = await super().acquire(spec, **kw)
        url = self.to if isinstance(self.to, str) else self.to.get(grant.host_url,
                                                                   grant.host_url)
        return dataclasses.replace(grant, host_url=url)
