"""The big values a remote kernel holds for its client, and whether each is still as sent.

A big input is sent once; while the notebook's copy does not change, later cells only say
``keep``, and the agent must answer whether its own copy is still the value it received
(or last sent back). Fingerprinting 800 MB takes about 25 ms, so that answer is prepared
ahead, when the agent knows code may have changed something:

- When a value arrives, it is recorded with its fingerprint as this side pickles it. When
  pickling it again gives the very frames that arrived (the same small pickle stream, the
  big buffers the same memory: a numpy array loaded from its frames), the sender's
  fingerprint is that fingerprint, and nothing is hashed.
- Code runs only in executions (IPython's ``pre_execute``/``post_execute``, which the comm
  package fires around every comm message too). Until the next one starts, a value
  checked or recorded since the last one is unchanged. The agent's own comm messages run
  no code of the user's and do not count (``not_code``).
- After every execution, once its reply has gone out, a thread fingerprints each held value
  whose pickling is cheap (its bytes out of band: numpy arrays, CPU tensors, ``bytes``),
  without the GIL and on one core, so that a ``keep`` for the next cell finds the answer
  ready, or nearly (a ``keep`` that comes first does the check itself, on every core).
- A value such a check found unchanged has its memory watched for writes from then on
  (``writes.py``: Linux's write-protect tracking, where the kernel has it). While no page
  of it was written, and its pickling gives the same small stream over the same live
  buffers, the next checks need no fingerprint: a scan of its pages takes well under a
  millisecond. A value found written is fingerprinted, and no longer watched until a
  check finds it unchanged again (the first write to each watched page costs a page fault).
- A value found changed stays changed (the client sends it again), so it is not checked
  again; a name bound to another object than the one recorded has changed, without hashing.
  Anything else is fingerprinted when the ``keep`` comes, as it is asked with ``verify``.

Not seen: a write by a thread of the user's own (or by a device still running queued
work) after the check that followed the last execution, unless the value is watched (the
``keep`` then looks at its pages again). ``c.ClientConfig.verify_unchanged`` on the client
makes every ``keep`` fingerprint the value there and then.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

from cloudgpu.errors import SerializationError
from cloudgpu.serialize import FINGERPRINT_MIN, Serialized, dumps, flat

from .writes import WriteWatch, edges, open_watch, page_ranges

__all__ = ["HeldValues"]

#: Values whose pickle stream (what is not out of band) is smaller are checked in the
#: background after each execution; the others only when a ``keep`` asks.
CHEAP_STREAM = 1 << 20


class _Watched:
    """A value's memory as it was when write protection began: its pickle stream, and the
    buffers it pickled out of band (which objects exported them, where they lie, and the
    bytes of any page a buffer shares with other memory, which is compared, not watched)."""

    def __init__(self, value: Serialized) -> None:
        """Raises ValueError where the value has no buffer to watch, or one that cannot be
        told apart from memory freed and reused (its exporter takes no weak reference)."""
        if len(value.frames) < 2:
            raise ValueError("nothing out of band")
        self.stream = bytes(value.frames[0])
        try:
            self.exporters = [weakref.ref(frame.obj) for frame in value.frames[1:]]
        except TypeError as e:
            raise ValueError(str(e)) from None
        self.spans: list[tuple[int | None, int]] = [
            (_address(frame), frame.nbytes) for frame in value.frames[1:]]
        if any(at is None for at, _ in self.spans):
            raise ValueError("a buffer without an address")
        self.ranges = page_ranges((at or 0, n) for at, n in self.spans)
        self.edges = [_edges(frame, at or 0) for frame, (at, _) in
                      zip(value.frames[1:], self.spans, strict=True)]
        #: Whether the value was as recorded when protection began (None until its
        #: fingerprint, taken after, says; good while no page was written since).
        self.baseline: bool | None = None
        if not self.still_there():
            raise ValueError("an exporter whose own buffer is not the one pickled")

    def same_memory(self, value: Serialized) -> bool:
        """Whether ``value`` pickles to this stream over these very buffers, still alive,
        with the same bytes in the pages they share."""
        frames = value.frames[1:]
        return (len(frames) == len(self.exporters) and bytes(value.frames[0]) == self.stream
                and all(frame.obj is ref() and (_address(frame), frame.nbytes) == span
                        for frame, ref, span in zip(frames, self.exporters, self.spans,
                                                    strict=True))
                and self.still_there())

    def still_there(self) -> bool:
        """Whether each buffer's exporter is alive and still exports the same memory, with
        the same bytes in the pages it shares (without pickling the value again)."""
        for ref, span, edge in zip(self.exporters, self.spans, self.edges, strict=True):
            exporter = ref()
            if exporter is None:
                return False
            try:
                view = flat(memoryview(exporter))
            except (TypeError, ValueError):  # exports no contiguous buffer now
                return False
            if (_address(view), view.nbytes) != span or _edges(view, span[0] or 0) != edge:
                return False
        return True


def _edges(frame: memoryview, at: int) -> tuple[bytes, bytes]:
    data = flat(frame)
    head, tail = edges(at, data.nbytes)
    return bytes(data[:head]), bytes(data[data.nbytes - tail:]) if tail else b""


class _Held:
    """One recorded value: what it fingerprinted to, and which object it was."""

    def __init__(self, obj: Any, digest: str, cheap: bool) -> None:
        self.id = id(obj)
        self.digest = digest
        self.cheap = cheap
        #: ``(epoch, still as recorded)`` of the last check.
        self.checked: tuple[int, bool] | None = None
        #: Found changed: it stays so until the client sends it again.
        self.changed = False
        #: Checks in a row that fingerprinted it and found it as recorded.
        self.quiet = 0
        #: Its memory, while watched for writes.
        self.watched: _Watched | None = None


class HeldValues:
    """Fingerprints of the big values in ``namespace``, kept current across executions."""

    def __init__(self, namespace: dict[str, Any],
                 later: Callable[[Callable[[], None]], object] | None = None,
                 writes: WriteWatch | bool = True) -> None:
        """``later`` runs a function once the kernel has answered the execution that
        ended (the kernel's event loop's ``add_callback``); by default, at once.
        ``writes``: what watches held memory for writes; True opens one where the kernel
        can (:func:`writes.open_watch`), False fingerprints after every execution."""
        self.namespace = namespace
        self._later = later or (lambda fn: fn())
        self.writes = open_watch() if writes is True else writes or None
        #: Executions started so far; a check is good until the next one starts.
        self.epoch = 0
        self._before = 0
        #: How many values were fingerprinted by a ``keep`` (not ahead of it), for tests.
        self.hashed_on_keep = 0
        #: How many were fingerprinted at all, and how many checks a write scan answered.
        self.hashed = 0
        self.scanned = 0
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._checker: threading.Thread | None = None
        self._checker_epoch = -1

    def digest(self, name: str) -> str | None:
        """The fingerprint recorded for ``name``, if it is held."""
        held = self._held.get(name)
        return held.digest if held is not None else None

    # --- recording ---------------------------------------------------------------------

    def received(self, name: str, value: Serialized) -> None:
        """``value`` arrived and is now bound to ``name``: record it, or forget a small one."""
        if value.nbytes < FINGERPRINT_MIN:
            self.forget(name)
            return
        obj = self.namespace[name]
        try:
            mine = dumps(obj, name)
        except SerializationError:
            self.forget(name)
            return
        if value.digest and _same_frames(value, mine):
            mine.digest = value.digest  # the frames that arrived: their sender hashed them
        self._record(name, obj, mine)

    def sent(self, name: str, value: Serialized) -> None:
        """``value`` (the pickle of ``name``'s object) is on its way to the client."""
        if value.nbytes < FINGERPRINT_MIN:
            self.forget(name)
            return
        self._record(name, self.namespace[name], value)

    def forget(self, name: str) -> None:
        """``name`` is no longer held for the client."""
        with self._lock:
            held = self._held.pop(name, None)
        if held is not None:
            self._unwatch(held)

    def _record(self, name: str, obj: Any, value: Serialized) -> None:
        held = _Held(obj, value.fingerprint, value.frames[0].nbytes < CHEAP_STREAM
                     if value.frames else True)
        held.checked = (self.epoch, True)
        with self._lock:
            old, self._held[name] = self._held.get(name), held
        if old is not None:
            self._unwatch(old)

    # --- executions ----------------------------------------------------------------------

    def execution_starts(self) -> None:
        """Code is about to run: whatever was checked may change from now on."""
        with self._lock:
            self._before, self.epoch = self.epoch, self.epoch + 1

    def not_code(self) -> None:
        """The execution that just started is the agent's own comm message: it changes
        nothing of what is held (what it binds, it records)."""
        with self._lock:
            self.epoch = self._before

    def execution_ended(self) -> None:
        """Code stopped running: check the cheap values in the background, once the
        execution's reply is on its way."""
        epoch = self.epoch
        self._later(lambda: self._start_check(epoch))

    def _start_check(self, epoch: int) -> None:
        if self.epoch != epoch:
            return  # code runs again already: the check after it will do
        names = [name for name, held in self._held.items()
                 if held.cheap and (held.checked is None or held.checked[0] != epoch)]
        if not names:
            return
        checker = threading.Thread(target=self._check_all, args=(epoch, names),
                                   name="cloudgpu-check", daemon=True)
        self._checker, self._checker_epoch = checker, epoch
        checker.start()

    def _check_all(self, epoch: int, names: list[str]) -> None:
        for name in names:
            if self.epoch != epoch:
                return  # code runs again: these answers would be stale at once
            self._check(name, epoch, parallel=False)  # one core: the other is the reply's

    def _check(self, name: str, epoch: int, parallel: bool = True) -> bool:
        held = self._held.get(name)
        if held is None:
            return False
        obj = self.namespace.get(name, _MISSING)
        if obj is _MISSING or id(obj) != held.id:
            same = False  # another object now: sent again rather than hashed
        elif held.changed:
            same = False
        else:
            try:
                same = self._compare(name, held, dumps(obj, name), parallel)
            except Exception:  # a value changing under a background pickle, say
                same = False
        with self._lock:
            if self.epoch == epoch and self._held.get(name) is held:
                held.checked = (epoch, same)
        return same

    def _compare(self, name: str, held: _Held, value: Serialized, parallel: bool) -> bool:
        """Whether ``value`` (the held object pickled now) is as recorded: by a scan of its
        memory where that is watched and unwritten, else by its fingerprint."""
        watched = held.watched
        if watched is not None and watched.baseline is not None and self.writes is not None:
            if watched.same_memory(value) and not self.writes.written(watched.ranges):
                self.scanned += 1
                return watched.baseline
            held.quiet = 0  # written: watching it would cost page faults for nothing
        self._unwatch(held)  # from here it is fingerprinted
        start = None
        if self.writes is not None and not parallel and held.quiet > 0:
            start = self._watch(name, held, value)  # first: it sees what follows
        self.hashed += 1
        same = value.take_fingerprint(parallel) == held.digest
        held.quiet = held.quiet + 1 if same else 0
        held.changed = not same
        if start is not None:
            # Even if code ran meanwhile: a scan that finds no write since the arming also
            # says that this fingerprint read memory nothing was writing.
            start.baseline = same
        return same

    def _watch(self, name: str, held: _Held, value: Serialized) -> _Watched | None:
        assert self.writes is not None
        try:
            watched = _Watched(value)
        except ValueError:
            return None
        if not self.writes.arm(watched.ranges):
            return None
        with self._lock:
            if self._held.get(name) is held:  # not replaced or forgotten meanwhile
                held.watched = watched
                return watched
        self.writes.disarm(watched.ranges)
        return None

    def _unwatch(self, held: _Held) -> None:
        watched, held.watched = held.watched, None
        if watched is not None and self.writes is not None:
            self.writes.disarm(watched.ranges)

    def _still_unwritten(self, held: _Held) -> bool:
        """For a ``keep``: whether a watched value's memory is still unwritten since the
        check after the last execution (which sees what a thread of the user's wrote)."""
        watched = held.watched
        if watched is None or watched.baseline is None or self.writes is None:
            return True  # not watched: the check after the last execution is the answer
        return watched.still_there() and not self.writes.written(watched.ranges)

    # --- answering a keep ----------------------------------------------------------------

    def unchanged(self, name: str, verify: bool = False) -> bool:
        """Whether ``name`` still holds the value recorded for it; with ``verify``, by
        fingerprinting it now whatever was checked before."""
        held = self._held.get(name)
        if held is None:
            return False
        if not verify:
            checker = self._checker
            if checker is not None and self._checker_epoch == self.epoch and checker.is_alive():
                checker.join()  # started after the last execution: its answer is current
            checked = held.checked
            if checked is not None and checked[0] == self.epoch:
                if not checked[1] or self._still_unwritten(held):
                    return checked[1]
        self.hashed_on_keep += 1
        return self._check(name, self.epoch)


_MISSING = object()


def _same_frames(arrived: Serialized, mine: Serialized) -> bool:
    """Whether ``mine`` has the very frames that arrived: equal small ones, and big ones in
    the same memory (a value loaded without copying its buffers)."""
    if arrived.codec != mine.codec or len(arrived.frames) != len(mine.frames):
        return False
    for a, b in zip(arrived.frames, mine.frames, strict=True):
        if a.nbytes != b.nbytes:
            return False
        if a.nbytes < FINGERPRINT_MIN:
            if a != b:
                return False
        else:
            where = _address(a)
            if where is None or where != _address(b):
                return False
    return True


def _address(frame: memoryview) -> int | None:
    # Imported here: a kernel that holds no big value never needs numpy, and importing it
    # at boot cost every kernel 40 ms and more CPU (its BLAS threads start).
    import numpy as np

    try:
        return int(np.frombuffer(flat(frame), np.uint8).ctypes.data)
    except (TypeError, ValueError):
        return None
