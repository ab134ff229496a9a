"""How amounts read to users: money, durations and sizes, the same in every front-end."""

from __future__ import annotations

__all__ = ["duration", "money", "size", "uptime"]


def money(dollars: float) -> str:
    """``$2.50``; ``$0.0012`` for fractions of a cent; ``<$0.0001`` below that."""
    if dollars >= 0.01 or dollars == 0:
        return f"${dollars:.2f}"
    return f"${dollars:.4f}" if dollars >= 0.0001 else "<$0.0001"


def duration(seconds: float) -> str:
    """A rounded duration for messages: ``45 s``, ``15 min``, ``24 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"


def uptime(seconds: float) -> str:
    """An exact uptime: ``42 s``, ``3 min 07 s``, ``2 h 05 min``."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def size(nbytes: float) -> str:
    """``512 bytes``, ``3.4 MiB``, ``1.2 GiB``."""
    if nbytes < 1024:
        return f"{nbytes:.0f} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        nbytes /= 1024
        if nbytes < 1024 or unit == "GiB":
            break
    return f"{nbytes:.1f} {unit}"
