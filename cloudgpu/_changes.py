"""Which notebook values may have changed since they were fingerprinted, on the notebook side.

Deciding that a big input need not be sent again takes its fingerprint (about 25 ms for
800 MB). A value cannot change while no code of the notebook runs, and code runs in the
notebook kernel in executions and in comm messages (widget callbacks), and IPython's
``pre_execute`` event announces both (the comm package fires it around every comm
message). So each recorded fingerprint is good until the next of these starts, with two
exceptions:

- a ``%%remote`` cell runs nothing here (its body runs remotely; what it brings back is
  recorded with the fingerprint the agent sent along);
- a read-only numpy array over immutable memory (``np.frombuffer(some_bytes)``) cannot
  change at all, and stays trusted while it is the same object.

Anything else, a numpy array written in place included, is fingerprinted again after
code ran. Not seen: a write by a thread of the user's own, an asyncio task or a C
extension's callback between two cells, or by the user expressions of a silent request.
Where those write inputs, set ``c.ClientConfig.verify_unchanged = True`` (or
``CLOUDGPU_VERIFY_UNCHANGED=1``): every input is then fingerprinted on both sides before
each cell.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

__all__ = ["NotebookChanges"]


class _Known:
    def __init__(self, obj: Any, generation: int, digest: str) -> None:
        self.id = id(obj)
        self.generation = generation
        self.digest = digest
        self.frozen: weakref.ref[Any] | None = weakref.ref(obj) if _immutable(obj) else None


class NotebookChanges:
    """Fingerprints of the notebook's big inputs, and whether code ran since each was taken."""

    def __init__(self) -> None:
        #: Executions and comm messages started so far (``%%remote`` cells aside).
        self.generation = 0
        self._before = 0
        self._known: dict[str, _Known] = {}
        #: How many fingerprints were trusted instead of taken again, for tests.
        self.trusted = 0

    def install(self, shell: Any) -> None:
        """Count what runs in ``shell`` (an IPython shell, in a kernel or not)."""
        shell.events.register("pre_execute", self._execution_starts)
        shell.events.register("pre_run_cell", self._cell_starts)

    def _execution_starts(self) -> None:
        self._before = self.generation
        self.generation += 1

    def _cell_starts(self, info: Any) -> None:
        if _remote_only(getattr(info, "raw_cell", "") or ""):
            self.generation = self._before

    def remember(self, name: str, obj: Any, digest: str | None) -> None:
        """``obj``, bound to ``name``, fingerprints to ``digest`` now (None: unknown, so
        the next cell takes it)."""
        if digest is None:
            self._known.pop(name, None)
        else:
            self._known[name] = _Known(obj, self.generation, digest)

    def fingerprint(self, name: str, obj: Any) -> str | None:
        """The fingerprint of ``obj`` (bound to ``name``) if nothing can have changed it
        since it was taken; None: take it again."""
        known = self._known.get(name)
        if known is None or known.id != id(obj):
            return None
        if (known.frozen is not None and known.frozen() is obj) or \
                known.generation == self.generation:
            self.trusted += 1
            return known.digest
        return None


def _remote_only(cell: str) -> bool:
    return cell.lstrip().startswith("%%remote")


def _immutable(obj: Any) -> bool:
    """A read-only numpy array whose memory belongs to a ``bytes`` object."""
    if not isinstance(obj, np.ndarray) or obj.flags.writeable:
        return False
    base: Any = obj
    while isinstance(base, np.ndarray):
        if base.flags.writeable:
            return False
        base = base.base
    return isinstance(base, bytes)
