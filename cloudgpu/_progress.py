"""A progress bar over a notebook's cells, for ``cloudgpu run``: one redrawn line on a
terminal, one plain line per cell elsewhere (CI logs, files)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["CellProgress"]

_WIDTH = 24


class CellProgress:
    """Shows which cell of how many runs, and for how long the run has gone.

    Args:
        total: the code cells to run.
        stream: where it draws (stderr by default).
        enabled: False draws nothing (``--quiet``).
    """

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.done = 0
        self.started = time.monotonic()
        self._line = ""

    def start(self, number: int, source: str) -> None:
        """Cell ``number`` (1-based among code cells) starts running."""
        first = next((line.strip() for line in source.splitlines() if line.strip()), "")
        if len(first) > 48:
            first = first[:47] + "…"
        elapsed = time.monotonic() - self.started
        if self.tty:
            filled = _WIDTH * self.done // max(self.total, 1)
            bar = "█" * filled + "░" * (_WIDTH - filled)
            self._draw(f"{bar} {self.done}/{self.total} cells · {elapsed:4.0f} s · "
                       f"cell {number}: {first}")
        else:
            self._say(f"cloudgpu run: cell {number}/{self.total} ({elapsed:.0f} s): {first}")

    def finish(self) -> None:
        """The running cell finished."""
        self.done += 1

    def clear(self) -> None:
        """Take the bar off the terminal line (before other output is printed there)."""
        if self.enabled and self.tty and self._line:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._line = ""

    def end(self, text: str) -> None:
        """The run is over: replace the bar by ``text``."""
        self.clear()
        self._say(f"{text} ({time.monotonic() - self.started:.1f} s)")

    def _draw(self, line: str) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K" + line)
            self.stream.flush()
            self._line = line

    def _say(self, line: str) -> None:
        if self.enabled:
            self.stream.write(line + "\n")
            self.stream.flush()
