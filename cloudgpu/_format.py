"""How amounts read to users: money, durations and sizes, the same in every front-end."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["away", "duration", "money", "size", "uptime"]


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


def away(disconnected: Mapping[str, Any] | None, now: float) -> str | None:
    """What a session's ``disconnected`` view (the pool's) means for its owner: ``no
    notebook connected for 3 min; it is stopped in 2 min unless one connects again``, or
    ``...; kept while its cell runs``; None while a notebook is connected."""
    if not disconnected:
        return None
    text = f"no notebook connected for {duration(max(now - disconnected['since'], 0.0))}"
    stop_at = disconnected.get("stop_at")
    if disconnected.get("cell_running"):
        text += "; kept while its cell runs"
        if stop_at is not None:
            text += f", for {duration(max(stop_at - now, 0.0))} more at most"
    elif stop_at is not None:
        text += (f"; it is stopped in {duration(max(stop_at - now, 0.0))} unless one "
                 f"connects again")
    return text
