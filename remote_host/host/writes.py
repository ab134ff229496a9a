"""Whether memory was written since a moment: Linux's write-protect tracking, read back cheaply.

A held value the agent found unchanged has to be fingerprinted again after every execution,
because the code that ran may have written it (25-35 ms for 800 MB, during which the next
``keep`` waits). Linux can instead say which pages were written:

- a ``userfaultfd`` in asynchronous write-protect mode (``UFFD_FEATURE_WP_ASYNC``, Linux 6.7)
  marks a range's pages write-protected (``UFFDIO_WRITEPROTECT``). A write to one is let
  through by the kernel at once, which only clears the page's mark: no thread of ours
  handles it;
- the ``PAGEMAP_SCAN`` ioctl on ``/proc/self/pagemap`` (also 6.7) finds the pages whose
  mark is gone, in well under a millisecond for 800 MB.

Any write counts, by any thread of this process and by the kernel on its behalf (``recv``
into the buffer, say). Pages that are not in a registered range read as written, so memory
unmapped or mapped anew is never taken for unchanged. Not seen: a device writing host memory
by DMA (pinned buffers a GPU copies into), and a written page then dropped with
``madvise(MADV_DONTNEED)`` (it reads back as zeros; allocators do that to freed memory only,
and a watched buffer is alive).

The price is a page fault the first time each protected page is written: on the VM of
``bench/RESULTS.md``, a cell that overwrote all of a protected 800 MB array took 7-12x as
long as on unprotected memory, 0.2-0.4 s more (that once). So ``held.py`` protects only values that
were seen unchanged, and stops protecting a value once it is written.

Where the kernel lacks any of this, or forbids ``userfaultfd`` to this process,
:func:`open_watch` returns ``None`` and the agent fingerprints as before.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from collections.abc import Iterable

__all__ = ["WriteWatch", "edges", "open_watch", "page_ranges"]

log = logging.getLogger("cloudgpu.agent")

PAGE = mmap.PAGESIZE

_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}.get(os.uname().machine)
_UFFD_USER_MODE_ONLY = 1  # faults from user space only: allowed without privileges
_UFFD_API = 0xAA
_UFFD_FEATURE_WP_UNPOPULATED = 1 << 13  # pages not yet present are protected too
_UFFD_FEATURE_WP_ASYNC = 1 << 15
_UFFDIO_REGISTER_MODE_WP = 1 << 1
_UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
_PAGE_IS_WPALLOWED = 1 << 0  # in memory registered for asynchronous write-protect
_PAGE_IS_WRITTEN = 1 << 1


def _ioc(direction: int, kind: int, number: int, size: int) -> int:
    """An ioctl request number, as ``<asm-generic/ioctl.h>`` builds it."""
    return (direction << 30) | (size << 16) | (kind << 8) | number


_READ, _READ_WRITE = 2, 3


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _WriteProtect(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64)]


class _Region(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64),
                ("categories", ctypes.c_uint64)]


class _Scan(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint64), ("flags", ctypes.c_uint64),
                ("start", ctypes.c_uint64), ("end", ctypes.c_uint64),
                ("walk_end", ctypes.c_uint64), ("vec", ctypes.c_uint64),
                ("vec_len", ctypes.c_uint64), ("max_pages", ctypes.c_uint64),
                ("category_inverted", ctypes.c_uint64), ("category_mask", ctypes.c_uint64),
                ("category_anyof_mask", ctypes.c_uint64), ("return_mask", ctypes.c_uint64)]


_UFFDIO_API = _ioc(_READ_WRITE, 0xAA, 0x3F, ctypes.sizeof(_Api))
_UFFDIO_REGISTER = _ioc(_READ_WRITE, 0xAA, 0x00, ctypes.sizeof(_Register))
_UFFDIO_UNREGISTER = _ioc(_READ, 0xAA, 0x01, ctypes.sizeof(_Range))
_UFFDIO_WRITEPROTECT = _ioc(_READ_WRITE, 0xAA, 0x06, ctypes.sizeof(_WriteProtect))
_PAGEMAP_SCAN = _ioc(_READ_WRITE, ord("f"), 16, ctypes.sizeof(_Scan))


def page_ranges(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The whole pages inside ``(address, size)`` spans, as ``(start, end)``, sorted and
    merged. A page a span shares with other memory is left out (the other memory's writes
    would read as writes to it): :func:`edges` are the bytes the caller compares itself."""
    pages = sorted((-(-start // PAGE) * PAGE, (start + size) // PAGE * PAGE)
                   for start, size in spans)
    merged: list[tuple[int, int]] = []
    for start, end in pages:
        if start >= end:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def edges(start: int, size: int) -> tuple[int, int]:
    """How many bytes of the span ``(start, size)`` lie before its first whole page, and
    after its last (all of it, as the first, where it holds no whole page)."""
    head = min(-start % PAGE, size)
    inner = (start + size) // PAGE * PAGE - (start + head)
    return (head, size - head - inner) if inner > 0 else (size, 0)


class WriteWatch:
    """Protects ranges of this process's memory and tells whether any page was written since.

    Raises:
        OSError: where the kernel offers no asynchronous write-protect tracking.
    """

    def __init__(self) -> None:
        if _SYS_USERFAULTFD is None:
            raise OSError(f"no userfaultfd system call known for {os.uname().machine}")
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        self._libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
        self._libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fd = self._libc.syscall(_SYS_USERFAULTFD, os.O_CLOEXEC | _UFFD_USER_MODE_ONLY)
        if fd < 0:
            raise self._error("userfaultfd")
        self._uffd = fd
        self._pagemap = -1
        try:
            api = _Api(_UFFD_API, _UFFD_FEATURE_WP_ASYNC | _UFFD_FEATURE_WP_UNPOPULATED, 0)
            self._ioctl(self._uffd, _UFFDIO_API, api, "UFFDIO_API (asynchronous write-protect)")
            self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            probe = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            try:
                at = ctypes.addressof(ctypes.c_char.from_buffer(probe))
                if not self.arm([(at, at + PAGE)]) or self.written([(at, at + PAGE)]):
                    raise OSError("a protected page reads as written")
                probe[0] = 1
                if not self.written([(at, at + PAGE)]):
                    raise OSError("a write to a protected page was not seen")
                self.disarm([(at, at + PAGE)])
            finally:
                probe.close()
        except BaseException:
            self.close()
            raise

    def arm(self, ranges: list[tuple[int, int]]) -> bool:
        """Protect ``ranges`` (from :func:`page_ranges`): from now on, a write to them shows.

        False where some range is not this process's own memory (private and anonymous):
        a file, or memory shared with another process, can change without a write here.
        """
        if not _private_anonymous(ranges):
            return False
        try:
            for start, end in ranges:
                register = _Register(_Range(start, end - start), _UFFDIO_REGISTER_MODE_WP, 0)
                self._ioctl(self._uffd, _UFFDIO_REGISTER, register, "UFFDIO_REGISTER")
                protect = _WriteProtect(_Range(start, end - start), _UFFDIO_WRITEPROTECT_MODE_WP)
                self._ioctl(self._uffd, _UFFDIO_WRITEPROTECT, protect, "UFFDIO_WRITEPROTECT")
        except OSError as e:
            log.debug("Cannot watch %d ranges for writes: %s", len(ranges), e)
            self.disarm(ranges)
            return False
        return True

    def written(self, ranges: list[tuple[int, int]]) -> bool:
        """Whether any page of ``ranges`` was written since it was armed, is not armed, or
        is not mapped at all."""
        found = _Region()
        for start, end in ranges:
            # msync without a flag to sync only checks that every page is mapped.
            if self._libc.msync(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 0):
                return True
            # Two scans: for a written page, then for one outside memory registered for
            # asynchronous write-protect (it may show no write at all). Each asks for pages
            # of one category, which the kernel walks past quickly.
            for inverted, mask in ((0, _PAGE_IS_WRITTEN), (_PAGE_IS_WPALLOWED, _PAGE_IS_WPALLOWED)):
                scan = _Scan(ctypes.sizeof(_Scan), 0, start, end, 0, ctypes.addressof(found),
                             1, 0, inverted, mask, 0, mask)
                try:
                    if self._ioctl(self._pagemap, _PAGEMAP_SCAN, scan, "PAGEMAP_SCAN"):
                        return True
                except OSError as e:
                    log.debug("Cannot scan for writes: %s", e)
                    return True
        return False

    def disarm(self, ranges: list[tuple[int, int]]) -> None:
        """Stop protecting ``ranges``: writes there cost nothing extra, and read as written."""
        for start, end in ranges:
            try:
                self._ioctl(self._uffd, _UFFDIO_UNREGISTER, _Range(start, end - start),
                            "UFFDIO_UNREGISTER")
            except OSError:
                pass  # unmapped already: nothing is protected there any more

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Let go of the kernel objects; armed ranges stop being protected."""
        for fd in (getattr(self, "_uffd", -1), getattr(self, "_pagemap", -1)):
            if fd >= 0:  # (either may be unset, where the constructor failed early)
                os.close(fd)
        self._uffd = self._pagemap = -1

    def _ioctl(self, fd: int, request: int, arg: ctypes.Structure, what: str) -> int:
        result = self._libc.ioctl(fd, request, ctypes.byref(arg))
        if result < 0:
            raise self._error(what)
        return int(result)

    def _error(self, what: str) -> OSError:
        number = ctypes.get_errno()
        return OSError(number, f"{what}: {os.strerror(number)}")


def _private_anonymous(ranges: list[tuple[int, int]]) -> bool:
    """Whether every range lies in private anonymous mappings (``/proc/self/maps``)."""
    own: list[tuple[int, int]] = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            path = fields[5].strip() if len(fields) > 5 else ""
            if fields[1][3] != "p" or fields[4] != "0" or path.startswith(("/", "[v")):
                continue
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if own and own[-1][1] == low:
                own[-1] = (own[-1][0], high)
            else:
                own.append((low, high))
    return all(any(low <= start and end <= high for low, high in own)
               for start, end in ranges)


def open_watch() -> WriteWatch | None:
    """A :class:`WriteWatch`, or None (and why, in the log) where this kernel has none."""
    try:
        return WriteWatch()
    except OSError as e:
        log.info("No write tracking for held values (%s): they are fingerprinted after "
                 "every execution instead.", e)
        return None
