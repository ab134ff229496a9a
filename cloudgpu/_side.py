"""The side channel: big frames on a TCP connection of their own, straight to the agent.

Variables normally travel as comm messages on the kernel websocket: the client masks
every byte it sends (RFC 6455), the host relays them between the websocket and ZMQ in
Python, and the agent reassembles 4 MiB chunks. Frames of ``SIDE_MIN`` bytes and more
skip all of that: the client opens one more connection to the host's port,

    GET /api/kernels/{kernel_id}/side?channel={id} HTTP/1.1
    Authorization: token {token}
    Connection: Upgrade
    Upgrade: cloudgpu-side

which the host authenticates exactly as the kernel websocket (the host token, or a token
scoped to that kernel), answers ``101 Switching Protocols`` and hands to the kernel's
agent: the socket itself over a Unix socket (SCM_RIGHTS), or, behind TLS, a relay. From
then on the connection carries messages both ways, each a 4-byte big-endian length, a
JSON header ``{"id": batch, "sizes": [n, ...]}`` and the frames' bytes, read straight
into preallocated buffers. The comm messages of the batch still carry the headers and
small frames; a value's ``side`` lists the frames that came this way.

The client uses it half-duplex (one send or receive at a time), so that a TLS socket is
never used by two threads at once. Anything that goes wrong raises :class:`SideError`,
and the caller moves the frames as comm messages instead.
"""

from __future__ import annotations

import asyncio
import errno
import json
import mmap
import socket
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from ._prefault import Prefault
from ._spares import MAPPED_MIN, SPARES
from .serialize import Serialized, flat

__all__ = [
    "PROTOCOL",
    "SIDE_MIN",
    "Buffer",
    "SideChannel",
    "SideError",
    "pick",
    "read_message",
    "write_message",
]

#: Frames at least this big take the side channel.
SIDE_MIN = 1 << 20
PROTOCOL = "cloudgpu-side"
SLICE = 8 * 2**20  # bytes per send or receive call: progress, and a timeout per slice
CONNECT_TIMEOUT = 10.0
IO_TIMEOUT = 60.0  # seconds a started message may stall before the connection is given up
MAX_HEADER = 1 << 20

#: What a frame is received into (see :func:`receive_buffer`).
Buffer = bytearray | mmap.mmap

#: Told (bytes done, bytes in all) as a message moves: every ``SLICE`` bytes and at the end.
Report = Callable[[int, int], None]


class SideError(Exception):
    """Raised when the side channel cannot be opened or broke; the comm path takes over.

    Attributes:
        permanent: trying again on this kernel is pointless (the host refused, or has none).
    """

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def pick(values: dict[str, Serialized], minimum: int = SIDE_MIN) -> list[tuple[int, int]]:
    """The (value index, frame index) of every frame big enough for the side channel."""
    return [(vi, fi) for vi, s in enumerate(values.values())
            for fi, frame in enumerate(s.frames) if frame.nbytes >= minimum]


def write_message(sock: socket.socket, batch: str, frames: Sequence[memoryview],
                  report: Report | None = None) -> None:
    """Send one message: length, header, frames (blocking; raises OSError)."""
    header = json.dumps({"id": batch, "sizes": [f.nbytes for f in frames]}).encode()
    sock.sendall(len(header).to_bytes(4, "big") + header)
    total, done = sum(f.nbytes for f in frames), 0
    for frame in frames:
        data = flat(frame)
        for offset in range(0, data.nbytes, SLICE):
            part = data[offset: offset + SLICE]
            sock.sendall(part)
            done += part.nbytes
            if report is not None:
                report(done, total)


def read_message(sock: socket.socket, report: Report | None = None,
                 first_timeout: float | None = None,
                 ) -> tuple[str, list[Buffer]]:
    """Receive one message: (batch id, frames), each frame in a buffer of its own.

    Waits up to ``first_timeout`` (None: for ever) for the message to begin, then
    ``IO_TIMEOUT`` per slice. A frame of a size that came before may land in a buffer made
    ready for it (``_spares.py``), others in :func:`receive_buffer`'s.

    Raises:
        EOFError: the connection closed cleanly before a message began.
        OSError: it broke, stalled, or the peer sent something that is not a message.
    """
    sock.settimeout(first_timeout)
    head = _read_exact(sock, 4, at_start=True)
    sock.settimeout(IO_TIMEOUT)
    size = int.from_bytes(head, "big")
    if size > MAX_HEADER:
        raise OSError(f"a side channel header of {size} bytes is not one")
    try:
        header = json.loads(_read_exact(sock, size))
        batch, sizes = str(header["id"]), [int(n) for n in header["sizes"]]
    except (ValueError, KeyError, TypeError) as e:
        raise OSError(f"a malformed side channel header: {e}") from e
    total, done = sum(sizes), 0
    spares = [SPARES.take(n) for n in sizes]
    frames: list[Buffer] = [receive_buffer(n) if spare is None else spare
                            for spare, n in zip(spares, sizes, strict=True)]
    ahead = Prefault(frames, present=[i for i, spare in enumerate(spares) if spare is not None])
    reported = 0
    for frame in frames:
        view = memoryview(frame)
        offset = 0
        while offset < len(frame):
            got = sock.recv_into(view[offset:], min(len(frame) - offset, SLICE))
            if not got:
                raise OSError(f"the side connection closed {total - done:,} bytes short")
            offset += got
            done += got
            ahead.reached(done)
            if report is not None and (done - reported >= SLICE or done == total):
                reported = done
                report(done, total)
    SPARES.arrived(sizes)
    return batch, frames


def receive_buffer(size: int) -> Buffer:
    """A writable buffer to receive ``size`` bytes into.

    A big one is a fresh mapping, whose pages :class:`~._prefault.Prefault` makes present
    while the bytes arrive (``bytearray`` zero-fills all of it first: 460 ms for 800 MB
    on the VM of ``bench/RESULTS.md``). Transparent huge pages (as numpy asks for) were
    3x faster to fault in while the memory was warm, but 2-6x slower once the VM had taken
    freed memory back, which it does within seconds: not used.

    Raises:
        MemoryError: there is no room for it.
    """
    if size >= MAPPED_MIN:
        try:
            return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except OSError as e:
            if e.errno == errno.ENOMEM:
                raise MemoryError(f"no room for {size:,} bytes: {e.strerror}") from e
            raise
    return bytearray(size)


def _read_exact(sock: socket.socket, n: int, at_start: bool = False) -> bytes:
    data = bytearray()
    while len(data) < n:
        got = sock.recv(n - len(data))
        if not got:
            if at_start and not data:
                raise EOFError("the side connection closed")
            raise OSError("the side connection closed mid-message")
        data += got
    return bytes(data)


def _connect(url: str, token: str, kernel_id: str, channel: str,
             tls: Callable[[], Any]) -> socket.socket:
    """Open the connection and ask for the upgrade (blocking)."""
    parts = urllib.parse.urlsplit(url)
    secure = parts.scheme == "https"
    address = (parts.hostname or "127.0.0.1", parts.port or (443 if secure else 80))
    opened: list[socket.socket] = []  # closed again when the upgrade fails on the way
    try:
        sock: socket.socket = socket.create_connection(address, timeout=CONNECT_TIMEOUT)
        opened.append(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if secure:
            sock = tls().wrap_socket(sock, server_hostname=address[0])
            opened.append(sock)
        path = f"{parts.path.rstrip('/')}/api/kernels/{kernel_id}/side?channel={channel}"
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                      f"Authorization: token {token}\r\nConnection: Upgrade\r\n"
                      f"Upgrade: {PROTOCOL}\r\n\r\n").encode())
        head = bytearray()
        while not head.endswith(b"\r\n\r\n"):
            got = sock.recv(1)  # byte by byte: nothing past the answer is ours to read
            if not got or len(head) > 65536:
                raise OSError("the host closed the connection before answering")
            head += got
    except OSError as e:
        for opened_sock in opened:
            opened_sock.close()
        raise SideError(f"cannot open the side channel to {url}: {type(e).__name__}: {e}") \
            from e
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        sock.close()
        raise SideError(f"{url} answered the side channel with {lines[0]!r}", True) from None
    if status != 101:
        message = _body_message(sock, lines) or lines[0]
        sock.close()
        raise SideError(f"{url} refused the side channel (HTTP {status}): {message}",
                        permanent=status != 503)
    return sock


def _body_message(sock: socket.socket, lines: list[str]) -> str:
    """The ``message`` of a JSON error body, as much as can be read."""
    length = next((int(v) for k, _, v in (line.partition(":") for line in lines)
                   if k.strip().lower() == "content-length" and v.strip().isdigit()), 0)
    try:
        body = json.loads(_read_exact(sock, min(length, 65536))) if length else {}
    except (OSError, ValueError):
        return ""
    return str(body.get("message") or body.get("reason") or "") if isinstance(body, dict) \
        else ""


class SideChannel:
    """One client's side connection to one kernel's agent.

    Use :meth:`open`. ``id`` names it in the comm messages that say which frames came
    this way.
    """

    def __init__(self, sock: socket.socket, channel_id: str) -> None:
        self.id = channel_id
        self._sock = sock
        self._lock = asyncio.Lock()
        #: Why it broke, once it did: it is not used again.
        self.broken: str | None = None

    @classmethod
    async def open(cls, url: str, token: str, kernel_id: str,
                   tls: Callable[[], Any]) -> SideChannel:
        """Connect to ``kernel_id``'s agent through the host at ``url``.

        Raises:
            SideError: the host could not be reached, refused, or has no side channel.
        """
        channel_id = uuid.uuid4().hex
        sock = await asyncio.to_thread(_connect, url, token, kernel_id, channel_id, tls)
        return cls(sock, channel_id)

    async def send(self, batch: str, frames: Sequence[memoryview],
                   report: Report | None = None) -> None:
        """Send ``frames`` as batch ``batch``.

        Raises:
            SideError: the connection broke (then nothing may be assumed to have arrived).
        """
        async with self._lock:
            self._check()
            try:
                await asyncio.to_thread(write_message, self._sock, batch, frames,
                                        self._threadsafe(report))
            except OSError as e:
                raise self._break(f"sending {batch}: {type(e).__name__}: {e}") from e

    async def receive(self, batch: str, report: Report | None = None) -> list[Buffer]:
        """The frames the agent sends for batch ``batch`` (it sends one message per pull).

        Raises:
            SideError: the connection broke or closed first, or carried another batch.
            MemoryError: the frames do not fit in this process (the channel is closed).
        """
        async with self._lock:
            self._check()
            try:
                got, frames = await asyncio.to_thread(read_message, self._sock,
                                                      self._threadsafe(report))
            except (OSError, EOFError) as e:
                raise self._break(f"receiving {batch}: {type(e).__name__}: {e}") from e
            except MemoryError as e:  # what was not read is still on the way: it is spent
                self._break(f"receiving {batch}: out of memory ({e})")
                raise
            if got != batch:
                raise self._break(f"expected batch {batch}, the agent sent {got}")
            return frames

    def _threadsafe(self, report: Report | None) -> Report | None:
        if report is None:
            return None
        loop = asyncio.get_running_loop()

        def from_thread(done: int, total: int) -> None:
            loop.call_soon_threadsafe(report, done, total)

        return from_thread

    def _check(self) -> None:
        if self.broken is not None:
            raise SideError(f"the side channel broke earlier ({self.broken})")

    def _break(self, why: str) -> SideError:
        self.broken = why
        self.close()
        return SideError(f"the side channel broke {why}")

    def close(self) -> None:
        """Close the connection; a thread blocked on it wakes with an error."""
        self.broken = self.broken or "closed"
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already gone
        self._sock.close()
