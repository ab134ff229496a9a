"""How the UI sees a session: the pool's view of it, joined with its live readings.

Pure functions, no I/O: the handlers fetch, these shape what the browser gets.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from typing import Any

from cloudgpu._format import away

__all__ = ["UI_STATES", "notebook_path", "session_view", "status_view"]

UI_STATES = ("queued", "starting", "running", "idle")
"""What the sessions panel shows: ``running`` while a cell runs, ``idle`` while it waits."""

ENDED_MARGIN = 60.0
"""Seconds before ``ended_since`` that ended sessions are still listed from: the pool's
clock may be behind the lab's (the browser tells each session once)."""


def notebook_path(notebook: str | None, root_dir: str) -> str | None:
    """The notebook's path as JupyterLab names it (relative to the server root, ``/``-separated).

    Kernels report the absolute file path (Jupyter Server's ``JPY_SESSION_NAME``); one outside
    the root stays as it is, so it is still shown, if matched to no open notebook.
    """
    if not notebook:
        return None
    if not os.path.isabs(notebook):
        return notebook.replace(os.sep, "/")
    root = os.path.abspath(root_dir)
    full = os.path.abspath(notebook)
    if os.path.commonpath([root, full]) != root:
        return full
    return os.path.relpath(full, root).replace(os.sep, "/")


def _timestamp(text: object) -> float | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _display(session: Mapping[str, Any]) -> str:
    gpu, count = session.get("gpu_type"), session.get("count")
    if gpu in (None, "cpu"):
        what = "CPU" if gpu == "cpu" else str(session.get("hardware", "?"))
    else:
        what = f"{count}x {gpu}"
    return f"{what} (simulated)" if session.get("simulated") else what


def session_view(session: Mapping[str, Any], readings: Mapping[str, Any] | None,
                 root_dir: str, now: float) -> dict[str, Any]:
    """One session as the UI shows it.

    Args:
        session: the pool's view (``GET /api/sessions``).
        readings: its live readings (``GET /api/metrics``), None when there are none.
        root_dir: the server's root folder, to name the notebook as JupyterLab does.
        now: the current time (epoch seconds).
    """
    state = str(session["state"])
    idle_since = session.get("idle_since")
    if readings and readings.get("execution_state") in ("busy", "idle"):
        busy = readings["execution_state"] == "busy"
        idle_since = None if busy else (_timestamp(readings.get("last_activity")) or idle_since)
        if state == "running" and not busy:
            state = "idle"
    elif state == "running" and idle_since is not None:
        state = "idle"
    started = session.get("started")
    gpu_type = session.get("gpu_type")
    return {
        "id": session["id"],
        "hardware": session.get("hardware"),
        "gpu_type": gpu_type,
        "count": session.get("count"),
        "display": _display(session),
        "state": state,
        "queue_ahead": session.get("ahead", 0) if state == "queued" else None,
        "uptime": max(now - started, 0.0) if started else 0.0,
        "idle_for": max(now - idle_since, 0.0) if state == "idle" and idle_since else None,
        "cost": session.get("cost") or 0.0,
        "rate_per_hour": session.get("rate_per_hour") or 0.0,
        "max_cost": session.get("max_cost"),
        "warnings": list(session.get("warnings") or []),
        "away": away(session.get("disconnected"), now),
        "stop_reason": session.get("stop_reason"),
        "notebook": session.get("notebook"),
        "path": notebook_path(session.get("notebook"), root_dir),
        "simulated": bool(session.get("simulated")),
        "readings": dict(readings) if readings else None,
    }


def status_view(sessions: list[Mapping[str, Any]], metrics: Mapping[str, Mapping[str, Any]],
                cost: Mapping[str, Any], root_dir: str, now: float, pool: str,
                ended_since: float | None = None) -> dict[str, Any]:
    """Everything the status bar and the sessions panel show, in one answer.

    ``today`` is what the user spent since midnight (ended sessions included);
    ``daily_limit`` is their budget (None: none). ``ended`` lists the sessions that ended
    since ``ended_since`` (the ``now`` of the browser's last answer; none without it), with
    why, from today's spending, which lists them all: so the lab can say what the pool
    stopped, even a session that began and ended between two polls, or while the tab was
    hidden (it does not poll then).
    """
    views = [session_view(s, metrics.get(str(s["id"])), root_dir, now) for s in sessions]
    ended = [{"id": s["id"], "display": _display(s),
              "path": notebook_path(s.get("notebook"), root_dir),
              "stop_reason": s.get("stop_reason"), "ended": s["ended"]}
             for s in cost.get("sessions", []) if ended_since is not None
             and s.get("ended") is not None and s["ended"] >= ended_since - ENDED_MARGIN]
    return {
        "pool": pool,
        "now": now,
        "sessions": views,
        "ended": ended,
        "total_cost": sum(v["cost"] for v in views),
        "total_rate_per_hour": sum(v["rate_per_hour"] for v in views
                                   if v["state"] in ("running", "idle")),
        "today": cost.get("today", 0.0),
        "daily_limit": cost.get("daily_limit"),
    }
