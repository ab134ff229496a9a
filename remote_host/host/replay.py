"""What a client missed while its connection was down: numbered frames, replayed on reconnect.

A client that can reconnect (cloudgpu's own, which asks with ``?cloudgpu_since=N``) gets a
:class:`ReplaySession` on the kernel: its ZMQ channels to the kernel stay open across
websocket connections, and every frame the kernel sends it is numbered and kept in a
bounded :class:`ReplayLog`, whether a websocket is attached or not. Both sides count the
frames of the Jupyter channels, so no sequence number travels in the messages: a client
that reconnects says how many it received (``N``), and the host sends it frames ``N+1``
onwards. If some of those were already dropped from the log, the client is told how many.

Out of band, on the pseudo-channel ``cloudgpu`` (never counted, and only ever sent to a
client that asked for replay), the host tells the client on every attach how many of the
client's own frames it received, so that the client can send again what was lost in the
other direction, and how many frames it could not replay; and, when the kernel dies,
how it died.
"""

from __future__ import annotations

import collections
import json
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from cloudgpu._wire import CONFUSED, NOTICE_CHANNEL, REPLACED, v1_header

__all__ = ["Frame", "ReplayLog", "ReplaySession", "notice_frame"]

#: A websocket message as the parts written one after the other: v1 header, channel, parts.
Frame = list[Any]


def frame_size(frame: Sequence[Any]) -> int:
    """The bytes a frame takes on the wire."""
    return sum(memoryview(part).nbytes for part in frame)


def v1_frame(channel: str, parts: Sequence[Any]) -> Frame:
    """The v1 websocket message of a kernel message's parts (header, parent, metadata,
    content, buffers) on ``channel``, as parts that are never joined."""
    name = channel.encode()
    return [v1_header(name, parts), name, *parts]


def notice_frame(content: dict[str, Any]) -> Frame:
    """A cloudgpu notice for the client: a v1 message on the ``cloudgpu`` pseudo-channel."""
    header = {"msg_id": uuid.uuid4().hex, "msg_type": "cloudgpu_notice", "session": "",
              "username": "cloudgpu-host", "date": "", "version": "5.3"}
    parts = [json.dumps(p).encode() for p in (header, {}, {}, content)]
    return v1_frame(NOTICE_CHANNEL, parts)


class ReplayLog:
    """The newest frames sent to one client session, numbered from 1, within bounds.

    Args:
        max_frames: how many frames to keep at most.
        max_bytes: how many bytes of frames to keep at most (the newest frame is always
            kept, however big).
    """

    def __init__(self, max_frames: int, max_bytes: int) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        #: Frames numbered so far: the number of the newest.
        self.sent = 0
        #: Frames of the Jupyter channels received from the client so far.
        self.received = 0
        self._frames: collections.deque[tuple[int, Frame, int]] = collections.deque()
        self._bytes = 0

    def record(self, frame: Frame) -> int:
        """Number ``frame`` and keep it; returns its number."""
        self.sent += 1
        size = frame_size(frame)
        self._frames.append((self.sent, frame, size))
        self._bytes += size
        while len(self._frames) > 1 and (len(self._frames) > self.max_frames
                                         or self._bytes > self.max_bytes):
            self._bytes -= self._frames.popleft()[2]
        return self.sent

    def since(self, seen: int) -> tuple[int, list[Frame]]:
        """The frames after number ``seen`` still kept, and how many of them are not.

        Raises:
            ValueError: ``seen`` is more than was ever sent (the client is confused).
        """
        if seen > self.sent or seen < 0:
            raise ValueError(f"the client says it received {seen} frames; {self.sent} were sent")
        oldest = self._frames[0][0] if self._frames else self.sent + 1
        lost = max(oldest - (seen + 1), 0)
        return lost, [frame for number, frame, _ in self._frames if number > seen]


class Attachable(Protocol):
    """The websocket side of a replay session: something frames can be written to."""

    def write_frame(self, frame: Frame) -> None:
        """Write one frame to the client now."""

    def close_socket(self, code: int, reason: str) -> None:
        """Close the websocket with ``code``."""


class ReplaySession:
    """One client session's channels on one kernel, kept across its websocket connections.

    Args:
        key: Jupyter Server's session key (``kernel_id:session_id``).
        channels: the ZMQ streams to the kernel, by channel name, opened for this session.
        log: where its frames are numbered and kept.
        on_message: called with (channel, msg_list) before a kernel message is framed
            (the host watches activity this way).
    """

    def __init__(self, key: str, channels: dict[str, Any], log: ReplayLog,
                 on_message: Callable[[str, list[bytes]], None] | None = None) -> None:
        self.key = key
        self.channels = channels
        self.log = log
        self.attached: Attachable | None = None
        #: When the last websocket went away (``time.monotonic()``); None while attached.
        self.detached_since: float | None = time.monotonic()
        self._on_message = on_message

    def listen(self, feed_identities: Callable[[list[bytes]], tuple[Any, Any]]) -> None:
        """Start taking the kernel's messages on every channel, attached or not.

        ``feed_identities`` splits ZMQ routing identities off a message (the session's).
        """
        for channel, stream in self.channels.items():
            def on_recv(msg_list: list[bytes], channel: str = channel) -> None:
                _, fed = feed_identities(msg_list)
                self.take(channel, fed[1:])  # without the signature: v1 carries none
            stream.on_recv(on_recv)

    def take(self, channel: str, parts: list[Any]) -> None:
        """A kernel message for the client: number it, keep it, send it if attached."""
        if self._on_message is not None:
            self._on_message(channel, parts)
        self.send(v1_frame(channel, parts))

    def send(self, frame: Frame) -> None:
        """Number and keep a frame of a Jupyter channel; write it if a websocket is attached."""
        self.log.record(frame)
        if self.attached is not None:
            self.attached.write_frame(frame)

    def attach(self, connection: Attachable, seen: int) -> None:
        """Make ``connection`` the session's websocket; replay what it has not seen.

        The notice comes first, then the missed frames, then live ones, in order.
        """
        previous, self.attached = self.attached, None
        if previous is not None and previous is not connection:
            previous.close_socket(REPLACED, "replaced by a newer connection of the same session")
        try:
            lost, frames = self.log.since(seen)
        except ValueError as e:
            connection.close_socket(CONFUSED, str(e)[:120])
            return
        connection.write_frame(notice_frame({"replay": {
            "received": self.log.received, "from": seen + 1 + lost, "lost": lost,
            "sent": self.log.sent}}))
        for frame in frames:
            connection.write_frame(frame)
        self.attached, self.detached_since = connection, None

    def detach(self, connection: Attachable) -> None:
        """``connection`` went away; keep taking the kernel's messages for the next one."""
        if self.attached is connection:
            self.attached, self.detached_since = None, time.monotonic()

    def close(self) -> None:
        """Close the channels (the kernel is gone, or the session was given up)."""
        for stream in self.channels.values():
            if not stream.closed():
                stream.on_recv(None)
                stream.close()
        self.attached = None
