"""The agent's end of the side channel (see ``cloudgpu._side``): big frames off the comm path.

The agent listens on a Unix socket beside its connection file (``kernel-<id>.side`` for
``kernel-<id>.json``), where only the host reaches it. For each client connection the
host accepted and authenticated, the host sends ``{"channel": id}`` with the client's
socket attached (SCM_RIGHTS), or, for a TLS connection it relays, without: then the Unix
connection itself carries the bytes. One thread per channel reads what the client pushes
into preallocated buffers; the kernel's main thread claims a batch's frames when the
batch's last comm message arrives (:meth:`SideChannels.take`), and writes pulled frames
itself (:meth:`SideChannels.send`). Frames whose cell was given up (aborted, or cancelled
before its message) are freed by a later claim, or when the channel closes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from cloudgpu._side import IO_TIMEOUT, Buffer, read_message, write_message

__all__ = ["SideChannels", "socket_path"]

log = logging.getLogger("cloudgpu.agent")

REGISTER_TIMEOUT = 30.0  # seconds a comm message may wait for its channel to be handed over
GIVEN_UP_AFTER = 60.0  # seconds a batch passed over by a later one waits before it is freed


def socket_path(connection_file: str | os.PathLike[str]) -> Path:
    """Where the agent of the kernel with this connection file listens."""
    return Path(connection_file).with_suffix(".side")


class _Channel:
    def __init__(self, channel_id: str, sock: socket.socket) -> None:
        self.id = channel_id
        self.sock = sock
        #: A socket object of its own for writing, with a timeout per slice.
        self.writer = sock.dup()
        self.writer.settimeout(IO_TIMEOUT)
        self.closed: str | None = None
        self.arrived: dict[str, list[Buffer]] = {}
        self.arrived_at: dict[str, float] = {}  # time.monotonic() of each arrived batch
        self.progressed = time.monotonic()


class SideChannels:
    """The side channels of one kernel's clients, by id."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a previous kernel's, with this connection file
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        path.chmod(0o600)
        self._listener.listen(16)
        self._channels: dict[str, _Channel] = {}
        self._changed = threading.Condition()
        #: Seconds a batch passed over by a later one is kept (see :meth:`take`).
        self.given_up_after = GIVEN_UP_AFTER
        threading.Thread(target=self._accept, name="cloudgpu-side", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                message, fds, _, _ = socket.recv_fds(conn, 4096, 1)
                channel_id = str(json.loads(message)["channel"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("Dropped a side channel handed over badly: %s", e)
                conn.close()
                continue
            if fds:  # the client's own socket: the Unix connection has done its job
                sock = socket.socket(fileno=fds[0])
                conn.close()
            else:  # the host relays (TLS): this connection is the channel
                sock = conn
            channel = _Channel(channel_id, sock)
            with self._changed:
                self._channels[channel_id] = channel
                self._changed.notify_all()
            threading.Thread(target=self._read, args=(channel,), name="cloudgpu-side-read",
                             daemon=True).start()

    def _read(self, channel: _Channel) -> None:
        def progressed(done: int, total: int) -> None:
            channel.progressed = time.monotonic()

        try:
            while True:
                batch, frames = read_message(channel.sock, progressed)
                with self._changed:
                    channel.arrived[batch] = frames
                    channel.arrived_at[batch] = time.monotonic()
                    self._changed.notify_all()
        except EOFError:
            why = "the client closed it"
        except OSError as e:
            why = f"it broke ({type(e).__name__}: {e})"
        self._close(channel, why)

    def _close(self, channel: _Channel, why: str) -> None:
        with self._changed:
            if channel.closed is None:
                channel.closed = why
                channel.arrived.clear()  # nobody can ask for these any more: free them
                channel.arrived_at.clear()
            self._changed.notify_all()
        for sock in (channel.sock, channel.writer):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _channel(self, channel_id: str) -> _Channel:
        """The channel, waiting a while for the host's hand-over (it may lag the comm)."""
        deadline = time.monotonic() + REGISTER_TIMEOUT
        with self._changed:
            while channel_id not in self._channels:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OSError(f"side channel {channel_id} was never handed over")
                self._changed.wait(left)
            return self._channels[channel_id]

    def take(self, channel_id: str, batch: str) -> list[Buffer]:
        """The frames the client sent as ``batch`` on ``channel_id``, once they all arrived.

        Raises:
            OSError: the channel closed, or stalled, before they did.
        """
        channel = self._channel(channel_id)
        with self._changed:
            while batch not in channel.arrived:
                if channel.closed is not None:
                    raise OSError(f"the side channel closed before {batch} arrived: "
                                  f"{channel.closed}")
                if time.monotonic() - channel.progressed > 2 * IO_TIMEOUT:
                    raise OSError(f"nothing came by the side channel for {2 * IO_TIMEOUT:.0f} s")
                self._changed.wait(1.0)
            self._free_given_up(channel, batch)
            channel.arrived_at.pop(batch, None)
            return channel.arrived.pop(batch)

    def _free_given_up(self, channel: _Channel, claimed: str) -> None:
        """Free the batches that came before ``claimed`` and waited ``given_up_after``
        seconds: their cells were given up (aborted by the kernel, or cancelled between
        their frames and their message), or they would have been claimed first.

        A client sends its batches' messages in the order their frames came, and the kernel
        claims them in that order; only two of its cells racing each other may swap, by the
        moment one waits for the other's message, not by a minute."""
        now = time.monotonic()
        keys = list(channel.arrived)
        for old in keys[:keys.index(claimed)]:
            if now - channel.arrived_at.get(old, now) > self.given_up_after:
                channel.arrived_at.pop(old, None)
                log.warning("Side channel %s: batch %s (%d bytes) was never claimed; freed",
                            channel.id, old, _size(channel.arrived.pop(old)))

    def unclaimed(self) -> int:
        """Bytes that came by the side channels and wait for their cell to claim them."""
        with self._changed:
            return sum(_size(frames) for channel in self._channels.values()
                       for frames in channel.arrived.values())

    def send(self, channel_id: str, batch: str, frames: Sequence[memoryview]) -> None:
        """Send ``frames`` to the client as ``batch``.

        Raises:
            OSError: the channel is closed or broke (it is closed then).
        """
        channel = self._channel(channel_id)
        if channel.closed is not None:
            raise OSError(f"the side channel is closed: {channel.closed}")
        try:
            write_message(channel.writer, batch, frames)
        except OSError as e:
            self._close(channel, f"it broke ({type(e).__name__}: {e})")
            raise

    def close(self) -> None:
        """Stop listening (the kernel is going away)."""
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _size(frames: Sequence[Buffer]) -> int:
    return sum(len(frame) for frame in frames)
