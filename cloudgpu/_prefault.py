"""Making fresh receive buffers' pages present ahead of the bytes that will fill them.

Memory mapped anew has no pages yet: the first write to each 4 KiB page faults, and the
kernel zeroes a page for it. Receiving 800 MB into such memory, the reader paid for
200,000 faults on the way, and populating all of it first (``MAP_POPULATE``) made it wait
330-450 ms before the first byte on the VM of ``bench/RESULTS.md``. Here a thread of its
own populates the pages (``madvise(MADV_POPULATE_WRITE)``, Linux 5.14) a few MiB at a time,
in the order the reader fills them, and skips what the reader has already written, so
that faulting in and receiving overlap. On that VM this took 80 and 800 MB receives over
loopback from 490-1,000 MB/s to 1,100-1,600.

Populating never changes what a page holds, so the thread needs no lock: where it falls
behind, the reader faults pages in itself, as it would without it.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
from collections.abc import Collection, Sequence

__all__ = ["Prefault", "populate"]

#: Bytes populated per call: small enough to stay just ahead of the reader.
CHUNK = 4 << 20

_MADV_POPULATE_WRITE = 23


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):  # not Linux
        return None
    return libc


_libc = _load_libc()


def populate(address: int, size: int) -> bool:
    """Make the ``size`` bytes of mapped memory at ``address`` present, as written; False
    when that cannot be done here (not Linux, a kernel before 5.14, no room, not mapped)."""
    return _libc is not None and _libc.madvise(address, size, _MADV_POPULATE_WRITE) == 0


class Prefault:
    """Populates the pages of ``buffers`` (those that are mappings, except the ones whose
    indexes are in ``present``) in order, ahead of a reader that fills them in that order
    and says how far it got with :meth:`reached`."""

    def __init__(self, buffers: Sequence[object], present: Collection[int] = ()) -> None:
        self._spans: list[tuple[int, int, int]] = []  # (start in the whole, address, size)
        start = 0
        for i, buffer in enumerate(buffers):
            size = len(buffer)  # type: ignore[arg-type]
            if isinstance(buffer, mmap.mmap) and size and i not in present:
                address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
                self._spans.append((start, address, size))
            start += size
        self._reached = 0
        #: The populating thread, while there is one.
        self.thread: threading.Thread | None = None
        if _libc is not None and self._spans:
            self.thread = threading.Thread(target=self._run, name="cloudgpu-prefault",
                                           daemon=True)
            self.thread.start()

    def reached(self, done: int) -> None:
        """The reader has filled the first ``done`` bytes (of all the buffers together)."""
        self._reached = done

    def _run(self) -> None:
        for start, address, size in self._spans:
            offset = 0
            while True:
                offset = max(offset, self._reached - start)  # what it wrote is present
                if offset >= size:
                    break
                n = min(CHUNK, size - offset)
                if not populate(address + offset, n):
                    return  # an older kernel, no room, or unmapped: the reader faults them
                offset += n
