"""Replies the proxy writes itself: kernel_info, errors, and stand-ins while no remote answers."""

from __future__ import annotations

import platform
from typing import Any

from cloudgpu import __version__

__all__ = ["error_content", "kernel_info", "unavailable_reply"]

PROTOCOL_VERSION = "5.3"

_LOCAL_LANGUAGE = {
    "name": "python",
    "version": platform.python_version(),
    "mimetype": "text/x-python",
    "codemirror_mode": {"name": "ipython", "version": 3},
    "pygments_lexer": "ipython3",
    "nbconvert_exporter": "python",
    "file_extension": ".py",
}


def kernel_info(remote_info: dict[str, Any], hardware: str) -> dict[str, Any]:
    """A ``kernel_info_reply``: the remote kernel's language, our implementation.

    Before the remote kernel is up, the language is this Python's: the remote side runs
    the same cloudgpu, so the same major language, and frontends need an answer now.
    """
    remote_banner = remote_info.get("banner", "")
    return {
        "status": "ok",
        "protocol_version": remote_info.get("protocol_version", PROTOCOL_VERSION),
        "implementation": "cloudgpu",
        "implementation_version": __version__,
        "language_info": remote_info.get("language_info") or dict(_LOCAL_LANGUAGE),
        "banner": f"Cloud GPU kernel on {hardware} (cloudgpu {__version__})\n{remote_banner}",
        "help_links": remote_info.get("help_links", []),
        # The remote side is always ipykernel, which debugs through debugpy.
        "debugger": bool(remote_info.get("debugger", True)),
    }


def error_content(ename: str, evalue: str) -> dict[str, Any]:
    """The fields an ``error`` output and an error reply share, rendered as a one-line error."""
    lines = evalue.splitlines() or [""]
    return {"ename": ename, "evalue": evalue,
            "traceback": [f"\x1b[0;31m{ename}\x1b[0m: {lines[0]}", *lines[1:]]}


def unavailable_reply(msg_type: str, content: dict[str, Any], ename: str,
                      evalue: str) -> tuple[str, dict[str, Any]]:
    """The reply to a request no remote kernel can answer: valid for its type, and saying why."""
    reply_type = msg_type.replace("_request", "_reply")
    error = {"status": "error", **error_content(ename, evalue)}
    if msg_type == "complete_request":
        pos = content.get("cursor_pos", 0)
        return reply_type, {**error, "matches": [], "cursor_start": pos, "cursor_end": pos,
                            "metadata": {}}
    if msg_type == "inspect_request":
        return reply_type, {**error, "found": False, "data": {}, "metadata": {}}
    if msg_type == "is_complete_request":
        return reply_type, {"status": "unknown"}
    if msg_type == "history_request":
        return reply_type, {"status": "ok", "history": []}
    if msg_type == "comm_info_request":
        return reply_type, {"status": "ok", "comms": {}}
    if msg_type == "debug_request":
        return reply_type, {"type": "response", "seq": 0, "request_seq": content.get("seq", 0),
                            "success": False, "command": content.get("command", ""),
                            "message": evalue, "body": {}}
    return reply_type, error
