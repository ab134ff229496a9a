"""Plain-text tables for ``%remote status``, ``%remote hardware`` and ``%remote cost``."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from cloudgpu._format import away, duration, money

__all__ = ["cost", "hardware", "status"]


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _what(s: Mapping[str, Any]) -> str:
    if s.get("gpu_type") in (None, "cpu"):
        text = "CPU" if s.get("gpu_type") else s["hardware"]
    else:
        text = f"{s['count']}x {s['gpu_type']}"
    text = f"{text} (simulated)" if s.get("simulated") else text
    return f"{text} (not isolated)" if s.get("isolation_warning") else text


def _ago(seconds: float | None) -> str:
    return "-" if seconds is None else duration(seconds)


def status(sessions: list[dict[str, Any]], mine: set[str | None]) -> str:
    """Your sessions at the pool; ``*`` marks this notebook's."""
    if not sessions:
        return "No remote sessions. A %%remote cell starts one."
    now = time.time()
    rows = [["", "session", "hardware", "state", "idle", "cost", "notebook"]]
    for s in sessions:
        state = s["state"]
        if state == "queued":
            state += f" ({s['ahead']} ahead)"
        idle = None if s.get("idle_since") is None else now - s["idle_since"]
        rows.append(["*" if s["id"] in mine else "", s["id"], _what(s), state, _ago(idle),
                     money(s["cost"]), s.get("notebook") or ""])
    warnings = dict.fromkeys(s["isolation_warning"] for s in sessions
                             if s.get("isolation_warning"))
    aways = [f"{s['id']}: {text}" for s in sessions
             if (text := away(s.get("disconnected"), now))]
    return "\n".join([_table(rows), "(* this notebook)", *(f"! {w}" for w in warnings),
                      *aways])


def hardware(types: Sequence[Mapping[str, Any]]) -> str:
    """The catalog with prices and what is free now."""
    rows = [["hardware", "memory", "$/hour", "free/total", "queued"]]
    for t in types:
        if t["total"] is None:
            avail = "always"
        elif not t["total"]:
            avail = "-"
        else:
            avail = f"{t['free']}/{t['total']}" + (" (simulated)" if t["simulated"] else "")
        if t.get("not_isolated"):
            avail += " (not isolated)"
        unit = "/core" if t["type"] == "cpu" else ""
        rows.append([t["type"], f"{t['memory_gb']:g} GB" if t["memory_gb"] else "-",
                     f"{t['price_per_hour']:.2f}{unit}", avail, str(t["queued"] or "")])
    return _table(rows)


def cost(report: Mapping[str, Any], mine: set[str | None]) -> str:
    """Today's spending: total and limit, this notebook, and each session."""
    limit = report.get("daily_limit")
    lines = [f"Today: {money(report['today'])}" + (f" of {money(limit)} daily limit" if limit
                                                      else "")]
    this = sum(s["cost"] for s in report["sessions"] if s["id"] in mine)
    lines.append(f"This notebook's sessions: {money(this)}")
    if report["sessions"]:
        rows = [["session", "hardware", "state", "cost", "notebook"]]
        rows += [[s["id"], _what(s), s["state"], money(s["cost"]), s.get("notebook") or ""]
                 for s in report["sessions"]]
        lines += ["", _table(rows)]
    return "\n".join(lines)
