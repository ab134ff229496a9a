"""Whether the pool's hosts and kernels are still there, and when they stopped being.

Two sources of truth, both read from the hosts themselves:

- **Heartbeats**: the pool asks every host for its info every ``interval`` seconds. A host
  that misses ``misses`` beats in a row is lost, and so are its kernels: their sessions
  end at the last beat it answered. (A host that restarted answers again, but knows
  nothing of its old kernels: the pool's cull finds that out kernel by kernel.)
- **Ended kernels**: a host remembers how and when each of its kernels ended (shut down, or
  died with an exit code or signal; ``GET /api/cloudgpu/kernels/{id}``). A session whose
  kernel ended ends at that moment, however late the pool hears of it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

__all__ = ["Beat", "HostWatch", "kernel_end"]


@dataclass
class Beat:
    """What the pool knows of one host's liveness."""

    last_ok: float
    misses: int = 0
    lost: bool = False


class HostWatch:
    """Heartbeat bookkeeping for the slots of one pool (no I/O: the backend asks the hosts).

    Args:
        misses: missed beats in a row after which a host is lost.
    """

    def __init__(self, misses: int = 2) -> None:
        self.misses = misses
        self.beats: dict[str, Beat] = {}

    def answered(self, slot_id: str, now: float) -> bool:
        """A host answered; returns True when it had been lost (it is back)."""
        beat = self.beats.get(slot_id)
        self.beats[slot_id] = Beat(now)
        return beat is not None and beat.lost

    def missed(self, slot_id: str, now: float) -> float | None:
        """A host did not answer; returns when it last did, once it counts as lost (once)."""
        beat = self.beats.setdefault(slot_id, Beat(now))
        beat.misses += 1
        if beat.misses >= self.misses and not beat.lost:
            beat.lost = True
            return beat.last_ok
        return None

    def healthy(self, slot_id: str) -> bool:
        """Whether the host answered its last beat (or was never asked)."""
        beat = self.beats.get(slot_id)
        return beat is None or beat.misses == 0


def kernel_end(model: dict[str, Any] | None) -> tuple[float, str] | None:
    """When and why a kernel ended, from a host's answer for it; None while it runs.

    Raises nothing: a model without the host's end record (an older host, a plain Jupyter
    model) counts as running.
    """
    if model is None:
        return None
    info = model.get("cloudgpu") or {}
    state = info.get("state")
    if state == "died":
        return float(info.get("ended") or time.time()), \
            f"its remote kernel died: {info.get('reason', 'it stopped')}"
    if state == "stopped":
        return float(info.get("ended") or time.time()), \
            str(info.get("stopped_for") or "its remote kernel was shut down")
    return None
