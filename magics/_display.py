"""Showing remote things under the running cell: outputs, status lines, progress, errors."""

from __future__ import annotations

import sys
import uuid
from typing import Any

from IPython.display import clear_output, publish_display_data

from cloudgpu.errors import RemoteExecutionError

__all__ = ["Progress", "publish_status", "render_error", "show"]


def publish_status(text: str, handle: str | None = None) -> str:
    """Show (or update in place) one quiet status line; returns its display id."""
    display_id = handle or uuid.uuid4().hex
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    publish_display_data(
        {"text/plain": text,
         "text/html": f'<span style="color: var(--jp-ui-font-color2, gray); '
                      f'font-size: smaller">{escaped}</span>'},
        metadata={"cloudgpu": {"status": True}},
        transient={"display_id": display_id},
        update=handle is not None,
    )
    return display_id


class Progress:
    """A single updating line for transfers big enough to take a while."""

    def __init__(self) -> None:
        self.handle: str | None = None
        self.last = 0.0

    def update(self, info: dict[str, Any], now: float) -> None:
        """Redraw at most four times a second, and always at the end."""
        finished = info["done"] >= info["total"]
        if not finished and now - self.last < 0.25:
            return
        self.last = now
        verb = "sending" if info["direction"] == "push" else "receiving"
        text = f"cloudgpu: {verb} {info['done'] / 2**20:,.0f} / {info['total'] / 2**20:,.0f} MiB"
        self.handle = publish_status(text, self.handle)


def show(msg: dict[str, Any]) -> None:
    """Show one remote output message under the running cell (main thread only)."""
    msg_type = msg["msg_type"]
    content = msg["content"]
    if msg_type == "stream":
        stream = sys.stderr if content.get("name") == "stderr" else sys.stdout
        stream.write(content.get("text", ""))
        stream.flush()
    elif msg_type == "clear_output":
        clear_output(wait=content.get("wait", False))
    elif msg_type in ("display_data", "execute_result", "update_display_data"):
        publish_display_data(
            content.get("data", {}), content.get("metadata", {}),
            transient=content.get("transient") or None,
            **({"update": True} if msg_type == "update_display_data" else {}),
        )


def render_error(shell: Any, etype: type, value: BaseException, tb: Any,
                 tb_offset: int | None = None) -> list[str]:
    """Show a remote exception as its remote traceback, any other cloudgpu error as one line.

    Installed with ``shell.set_custom_exc`` so that cloudgpu's own frames never show.
    """
    if isinstance(value, RemoteExecutionError):
        where = value.host or "the remote host"
        header = f"\x1b[1mRemote traceback\x1b[0m (on {where}):"
        stb = [header, *value.traceback] if value.traceback else \
            [header, f"{value.ename}: {value.evalue}"]
    else:
        stb = [f"\x1b[31m{etype.__name__}\x1b[0m: {value}"]
    showtraceback = getattr(shell, "_showtraceback", None)
    if showtraceback is not None:
        showtraceback(etype, value, stb)
    else:  # plain IPython
        print("\n".join(stb), file=sys.stderr)
    return stb
