"""Jupyter messages on the kernel websocket, in the ``v1.kernel.websocket.jupyter.org`` framing."""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

SUBPROTOCOL = "v1.kernel.websocket.jupyter.org"
PROTOCOL_VERSION = "5.3"
#: The pseudo-channel of a host's notices to a replaying client (see remote_host/host/replay.py).
NOTICE_CHANNEL = "cloudgpu"

# Websocket close codes a host ends a kernel's connection with.
KERNEL_STOPPED = 1001  # the kernel was shut down (by its owner, the pool, the host going down)
KERNEL_DIED = 4001  # it died by itself; a notice just before says how
REPLACED = 4000  # a newer connection of the same session took over
CONFUSED = 4002  # the client's count of frames cannot be right

Message = dict[str, Any]


def new_message(msg_type: str, content: dict[str, Any], session: str, *,
                metadata: dict[str, Any] | None = None,
                buffers: list[Any] | None = None) -> Message:
    """A Jupyter message ready to send (the host signs it on the ZMQ side)."""
    return {
        "header": {
            "msg_id": uuid.uuid4().hex,
            "msg_type": msg_type,
            "username": "cloudgpu",
            "session": session,
            "date": datetime.now(timezone.utc).isoformat(),
            "version": PROTOCOL_VERSION,
        },
        "parent_header": {},
        "metadata": metadata or {},
        "content": content,
        "buffers": buffers or [],
    }


def _dump(part: Any) -> bytes:
    return json.dumps(part, separators=(",", ":"), default=str).encode()


def v1_header(channel: bytes, parts: Sequence[Any]) -> bytes:
    """The offset table that starts a v1 websocket message of ``channel`` and ``parts``.

    The message is this header, then ``channel``, then each part as it is: the parts are
    only measured, never joined, so a caller can send big ones without copying them.

    Args:
        channel: the channel name, encoded (``b"iopub"``).
        parts: the Jupyter message's parts (header, parent header, metadata, content, then
            the buffers), as bytes-like objects.
    """
    offsets = [8 * (len(parts) + 3)]  # the count, and one offset per part, the channel and the end
    for part in (channel, *parts):
        offsets.append(offsets[-1] + memoryview(part).nbytes)
    return b"".join(x.to_bytes(8, "little") for x in (len(offsets), *offsets))


def encode(channel: str, msg: Message) -> bytes:
    """Frame a message for the websocket: offsets, channel, JSON parts, raw buffers."""
    name = channel.encode()
    parts: list[Any] = [_dump(msg["header"]), _dump(msg["parent_header"]),
                        _dump(msg["metadata"]), _dump(msg["content"]), *msg.get("buffers", ())]
    return b"".join([v1_header(name, parts), name, *parts])


def v1_offsets(data: bytes | memoryview) -> list[int]:
    """The offset table of a v1 websocket message, checked before anything trusts it.

    Jupyter Server reads the count in the first 8 bytes and loops that many times: a
    message claiming 2**60 offsets would hold its event loop, and every session on the
    host, forever. A valid message has at least a channel and the four JSON parts, at most
    one offset per 8 bytes, and offsets that grow within the message.

    Raises:
        ValueError: the message is not a well-formed v1 message.
    """
    view = memoryview(data)
    size = view.nbytes
    if size < 8:
        raise ValueError(f"a v1 message has at least 8 bytes; this one has {size}")
    count = int.from_bytes(view[:8], "little")
    if not 6 <= count <= size // 8 - 1:
        raise ValueError(f"a v1 message of {size} bytes cannot have {count} offsets")
    offsets = [int.from_bytes(view[8 * (i + 1): 8 * (i + 2)], "little") for i in range(count)]
    if offsets[0] != 8 * (count + 1) or offsets[-1] != size or any(
            b < a for a, b in itertools.pairwise(offsets)):
        raise ValueError("the v1 message's offsets do not describe its parts")
    return offsets


def decode(data: bytes) -> tuple[str, Message]:
    """Unframe a websocket message; buffers stay zero-copy views into ``data``.

    Raises:
        ValueError: the message is malformed (its offsets, its JSON parts).
    """
    view = memoryview(data)
    offsets = v1_offsets(view)
    parts = [view[offsets[i]: offsets[i + 1]] for i in range(len(offsets) - 1)]
    channel = bytes(parts[0]).decode()
    header, parent, metadata, content = (json.loads(bytes(p)) for p in parts[1:5])
    return channel, {"header": header, "parent_header": parent, "metadata": metadata,
                     "content": content, "buffers": parts[5:], "msg_type": header.get("msg_type")}
