"""Slowing down whoever keeps presenting wrong tokens, for the host and the pool alike.

After ``allowed`` wrong tokens from one address within ``window`` seconds, that address's
wrong tokens are answered 429 until the window has passed, so guessing goes at most
``allowed`` tries per window. A right token is always accepted: every local client shares
127.0.0.1, and one misbehaving program must not lock the others out. Nothing about the
tokens themselves is kept.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

__all__ = ["BadTokenThrottle"]


class BadTokenThrottle:
    """Counts wrong tokens per address in a sliding window.

    Args:
        allowed: wrong tokens an address may present within ``window`` before it waits.
        window: seconds.
        clock: a monotonic clock (injectable for tests).
    """

    def __init__(self, allowed: int = 10, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.allowed = allowed
        self.window = window
        self._clock = clock
        self._failures: dict[str, collections.deque[float]] = {}

    def _recent(self, address: str) -> collections.deque[float]:
        now = self._clock()
        failures = self._failures.setdefault(address, collections.deque())
        while failures and now - failures[0] > self.window:
            failures.popleft()
        if not failures:
            del self._failures[address]
        return failures

    def retry_after(self, address: str) -> float:
        """Seconds until ``address`` may present another wrong token (0: now)."""
        failures = self._recent(address)
        if len(failures) < self.allowed:
            return 0.0
        return max(failures[-self.allowed] + self.window - self._clock(), 0.0)

    def failed(self, address: str) -> None:
        """``address`` presented a wrong (or no) token."""
        self._recent(address)
        self._failures.setdefault(address, collections.deque()).append(self._clock())

    def refusal(self, address: str) -> str | None:
        """The 429 message for ``address`` if it must wait, else None."""
        wait = self.retry_after(address)
        if not wait:
            return None
        return (f"Too many wrong tokens from {address}: try again in {wait:.0f} s. "
                f"(Use the token you were given; `Authorization: token <TOKEN>`.)")
