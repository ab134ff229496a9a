"""Receive buffers made ready ahead: populated mappings for frames of a size seen again.

A big frame lands in a fresh mapping, whose pages the kernel must fault in and zero as the
bytes arrive (:class:`~._prefault.Prefault` overlaps the two, but the receive still goes
at the speed of faulting in). Values of one size tend to come again: a loop that sends a
batch of one shape, a function called over and over. So once a size has arrived twice, a
thread of its own maps and populates another buffer of that size a moment later (while
nothing waits for it), and the next frame of that size is written into memory that is
already there.

What is kept is bounded: frames from ``MAPPED_MIN`` up to ``SPARE_MAX`` bytes, at most
``CLOUDGPU_SPARE_MB`` (default 64; 0 turns this off) in all, each for ``SPARE_IDLE``
seconds unless taken, and none in a process that nears its memory limit (``room``). A spare
is a mapping nothing has written: it reads as zeros, as a new one does, and it is handed out
once (the value received into it keeps it).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
import time
from collections import deque
from collections.abc import Callable

from ._prefault import populate

__all__ = ["SPARES", "Spares"]

log = logging.getLogger(__name__)

DEFAULT_MB = 64.0
MAPPED_MIN = 1 << 20  # receive buffers this big are mappings (``_side.receive_buffer``)
SPARE_MAX = 32 << 20  # bigger frames are not worth holding a copy's worth of memory idle
#: Seconds after a frame arrives before its spare is made: the process first rebuilds the
#: value and runs the code that waits for it, and populating pages beside that work on a
#: 2-core VM made the next 8 MB receive no faster (``bench/RESULTS.md``).
SPARE_DELAY = 0.05
SPARE_IDLE = 30.0  # seconds a spare waits to be taken before it is unmapped


def _budget() -> int:
    """Bytes of spares allowed: ``CLOUDGPU_SPARE_MB`` MiB (default 64; 0: none)."""
    text = os.environ.get("CLOUDGPU_SPARE_MB", "").strip()
    try:
        megabytes = float(text) if text else DEFAULT_MB
    except ValueError:
        log.warning("CLOUDGPU_SPARE_MB=%r is not a number of MiB (0 turns spare receive "
                    "buffers off); using %g", text, DEFAULT_MB)
        megabytes = DEFAULT_MB
    return max(int(megabytes * 2**20), 0)


def _populated(size: int) -> mmap.mmap | None:
    """A fresh mapping of ``size`` bytes with every page present; None when it cannot be had
    (no room, or a kernel without ``MADV_POPULATE_WRITE``)."""
    try:
        buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:
        return None
    if not populate(ctypes.addressof(ctypes.c_char.from_buffer(buffer)), size):
        buffer.close()
        return None
    return buffer


class Spares:
    """Populated buffers waiting for the next frame of their size (see the module)."""

    def __init__(self, budget: int | None = None, *, delay: float = SPARE_DELAY,
                 idle: float = SPARE_IDLE, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = _budget() if budget is None else budget
        self.delay, self.idle = delay, idle
        self._clock = clock
        self._lock = threading.Condition()
        self._ready: dict[int, deque[tuple[float, mmap.mmap]]] = {}
        self._wanted: deque[tuple[float, int]] = deque()  # (when to make it, size)
        self._held = 0  # bytes ready, wanted or being made
        self._seen: dict[int, float] = {}  # size -> when a frame of it last arrived
        self._worker: threading.Thread | None = None
        #: Bytes this process may still take before it nears its memory limit, where it
        #: has one (set by the agent in a sandboxed kernel); None: no limit known.
        self.room: Callable[[], int | None] | None = None
        #: Frames received into a spare so far.
        self.taken = 0
        #: Spares not made for lack of room (see ``room``).
        self.declined = 0

    def take(self, size: int) -> mmap.mmap | None:
        """A ready buffer of exactly ``size`` bytes, or None.

        A miss also drops a spare of that size still waiting to be made: this frame is
        received into fresh memory anyway, and making one now would compete with it.
        """
        with self._lock:
            self._expire()
            ready = self._ready.get(size)
            if ready:
                _, buffer = ready.popleft()
                self._held -= size
                self.taken += 1
                return buffer
            waiting = next((w for w in self._wanted if w[1] == size), None)
            if waiting is not None:
                self._wanted.remove(waiting)
                self._held -= size
            return None

    def arrived(self, sizes: list[int]) -> None:
        """Frames of these sizes were just received: make spares for the sizes seen before
        (within ``idle`` seconds), as the budget allows, ``delay`` seconds from now (the
        process has the value to rebuild and the code to run first)."""
        now = self._clock()
        with self._lock:
            self._expire()
            for size in sizes:
                if not MAPPED_MIN <= size <= SPARE_MAX:
                    continue
                seen, self._seen[size] = self._seen.get(size), now
                if seen is None or now - seen > self.idle or self._held + size > self.budget:
                    continue
                self._held += size
                self._wanted.append((now + self.delay, size))
            if self._wanted and self._worker is None:
                self._worker = threading.Thread(target=self._work, name="cloudgpu-spares",
                                                daemon=True)
                self._worker.start()
            self._lock.notify_all()

    def ready(self) -> dict[int, int]:
        """How many buffers are ready, by size."""
        with self._lock:
            return {size: len(ready) for size, ready in self._ready.items() if ready}

    def _work(self) -> None:
        """Make what is wanted when it is due; unmap what waited too long; stop once
        nothing is kept."""
        while True:
            with self._lock:
                self._expire()
                if not self._wanted:
                    if not self._held:
                        self._worker = None
                        return
                    self._lock.wait(self.idle / 4)
                    continue
                due, size = self._wanted[0]
                if due > self._clock():
                    self._lock.wait(due - self._clock())
                    continue
                self._wanted.popleft()
            room = self.room() if self.room is not None else None
            buffer = _populated(size) if room is None or room >= size else None
            with self._lock:
                if buffer is None:
                    self._held -= size
                    if room is not None and room < size:
                        self.declined += 1
                else:
                    self._ready.setdefault(size, deque()).append((self._clock(), buffer))

    def _expire(self) -> None:
        now = self._clock()
        for size, ready in self._ready.items():
            while ready and now - ready[0][0] > self.idle:
                _, buffer = ready.popleft()
                self._held -= size
                buffer.close()
        for size in [s for s, when in self._seen.items() if now - when > self.idle]:
            del self._seen[size]


#: This process's spares.
SPARES = Spares()
