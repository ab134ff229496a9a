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
- A name bound to another object than the one recorded has changed, without hashing.
  Anything else is fingerprinted when the ``keep`` comes, as it is asked with ``verify``.

Not seen: a write by a thread of the user's own (or by a device still running queued
work) after the check that followed the last execution. ``c.ClientConfig.verify_unchanged``
on the client makes every ``keep`` fingerprint the value there and then.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from cloudgpu.errors import SerializationError
from cloudgpu.serialize import FINGERPRINT_MIN, Serialized, dumps, flat

__all__ = ["HeldValues"]

#: Values whose pickle stream (what is not out of band) is smaller are checked in the
#: background after each execution; the others only when a ``keep`` asks.
CHEAP_STREAM = 1 << 20


class _Held:
    """One recorded value: what it fingerprinted to, and which object it was."""

    def __init__(self, obj: Any, digest: str, cheap: bool) -> None:
        self.id = id(obj)
        self.digest = digest
        self.cheap = cheap
        #: ``(epoch, still as recorded)`` of the last check.
        self.checked: tuple[int, bool] | None = None


class HeldValues:
    """Fingerprints of the big values in ``namespace``, kept current across executions."""

    def __init__(self, namespace: dict[str, Any],
                 later: Callable[[Callable[[], None]], object] | None = None) -> None:
        """``later`` runs a function once the kernel has answered the execution that
        ended (the kernel's event loop's ``add_callback``); by default, at once."""
        self.namespace = namespace
        self._later = later or (lambda fn: fn())
        #: Executions started so far; a check is good until the next one starts.
        self.epoch = 0
        self._before = 0
        #: How many values were fingerprinted by a ``keep`` (not ahead of it), for tests.
        self.hashed_on_keep = 0
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
            self._held.pop(name, None)

    def _record(self, name: str, obj: Any, value: Serialized) -> None:
        held = _Held(obj, value.fingerprint, value.frames[0].nbytes < CHEAP_STREAM
                     if value.frames else True)
        held.checked = (self.epoch, True)
        with self._lock:
            self._held[name] = held

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
        else:
            try:
                same = dumps(obj, name).take_fingerprint(parallel) == held.digest
            except Exception:  # a value changing under a background pickle, say
                same = False
        with self._lock:
            if self.epoch == epoch and self._held.get(name) is held:
                held.checked = (epoch, same)
        return same

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
    try:
        return int(np.frombuffer(flat(frame), np.uint8).ctypes.data)
    except (TypeError, ValueError):
        return None
