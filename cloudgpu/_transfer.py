"""Moving many frames in bounded messages: chunking on one side, reassembly on the other.

A value whose ``codec`` is ``keep`` has no frames: it tells the other side to keep the
value it already holds under that name (see the agent's fingerprint check).

A batch of named values is sent as one or more comm messages. The first carries the
headers (name, codec, frame sizes); each message carries at most ``CHUNK`` bytes of
frame data as binary buffers. Small frames pass through as zero-copy views; a frame
split across messages is reassembled into one preallocated buffer.

Frames named in ``side`` (see ``cloudgpu._side``) are left out of the messages: each
value's header lists them under ``side``, and the receiver fills them in with
:meth:`Assembler.fill_side`, in order, from what came by the side channel.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Any

from .serialize import Serialized, flat

CHUNK = 4 * 2**20


def pack(values: dict[str, Serialized], chunk: int = CHUNK,
         extra: dict[str, Any] | None = None, side: Collection[tuple[int, int]] = (),
         ) -> Iterator[tuple[dict[str, Any], list[memoryview]]]:
    """Split ``values`` into ``(data, buffers)`` comm messages of at most ``chunk`` bytes each.

    The first message's data holds ``vars``, every message ``pieces``, the last ``final: True``.
    The frames in ``side`` ((value index, frame index) pairs) are named, not sent.
    """
    skip = set(side)
    headers = [{"name": n, "codec": s.codec, "sizes": [f.nbytes for f in s.frames],
                **({"digest": s.digest} if s.digest else {}),
                **({"side": sides} if (sides := [fi for fi in range(len(s.frames))
                                                  if (vi, fi) in skip]) else {})}
               for vi, (n, s) in enumerate(values.items())]
    data: dict[str, Any] = {**(extra or {}), "vars": headers, "pieces": []}
    buffers: list[memoryview] = []
    room = chunk
    for vi, s in enumerate(values.values()):
        for fi, frame in enumerate(s.frames):
            if (vi, fi) in skip:
                continue
            raw = flat(frame)
            offset = 0
            while offset < raw.nbytes or (offset == 0 and raw.nbytes == 0):
                if room == 0:
                    yield data, buffers
                    data, buffers, room = {**(extra or {}), "pieces": []}, [], chunk
                take = min(room, raw.nbytes - offset)
                data["pieces"].append([vi, fi, offset])
                buffers.append(raw[offset: offset + take])
                offset += take
                room -= take
                if raw.nbytes == 0:
                    break
    data["final"] = True
    yield data, buffers


class Assembler:
    """Collects the messages of one batch and rebuilds each value's frames."""

    def __init__(self) -> None:
        self.headers: list[dict[str, Any]] = []
        self._frames: list[list[Any]] = []
        self.received = 0
        self.total = 0
        self.done = False

    def feed(self, data: dict[str, Any], buffers: list[Any]) -> None:
        """Take one message of the batch."""
        if "vars" in data:
            self.headers = data["vars"]
            self._frames = [[None] * len(h["sizes"]) for h in self.headers]
            self.total = sum(sum(h["sizes"]) for h in self.headers)
        for (vi, fi, offset), buf in zip(data["pieces"], buffers, strict=True):
            view = memoryview(buf).cast("B")
            size = self.headers[vi]["sizes"][fi]
            if offset == 0 and view.nbytes == size:
                self._frames[vi][fi] = view
            else:
                if self._frames[vi][fi] is None:
                    self._frames[vi][fi] = bytearray(size)
                self._frames[vi][fi][offset: offset + view.nbytes] = view
            self.received += view.nbytes
        self.done = bool(data.get("final"))

    def side(self) -> list[tuple[int, int]]:
        """The (value index, frame index) of the frames that come by the side channel."""
        return [(vi, fi) for vi, h in enumerate(self.headers) for fi in h.get("side", [])]

    def side_names(self) -> list[str]:
        """The names of the values with frames that come by the side channel."""
        return [h["name"] for h in self.headers if h.get("side")]

    def fill_side(self, frames: list[Any]) -> None:
        """Put in the frames that came by the side channel, in :meth:`side` order.

        Raises:
            ValueError: they are not the frames the headers announced (count or sizes).
        """
        wanted = self.side()
        if len(frames) != len(wanted):
            raise ValueError(f"{len(wanted)} frames were to come by the side channel, "
                             f"{len(frames)} came")
        for (vi, fi), frame in zip(wanted, frames, strict=True):
            size = self.headers[vi]["sizes"][fi]
            if memoryview(frame).nbytes != size:
                raise ValueError(f"frame {fi} of {self.headers[vi]['name']} is {size} bytes; "
                                 f"{memoryview(frame).nbytes} came by the side channel")
            self._frames[vi][fi] = frame
            self.received += size

    def values(self, skip: Collection[str] = ()) -> dict[str, Serialized]:
        """The reassembled values, by name (but those named in ``skip``)."""
        return {h["name"]: Serialized(h["codec"], [memoryview(f) for f in frames], h.get("digest"))
                for h, frames in zip(self.headers, self._frames, strict=True)
                if h["name"] not in skip}
