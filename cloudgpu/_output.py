"""Showing what remote work produces where the user looks, for every front-end.

Inside IPython (a notebook, the terminal) remote outputs are published as the running
cell's own (``display_data`` stays rich, ``update_display_data`` updates in place) and
cloudgpu's status lines are quiet displays that update in place. Anywhere else (``python
script.py``, a test, a CI job) remote stdout and stderr go to this process's
``sys.stdout`` and ``sys.stderr`` as they arrive, rich outputs print as their
``text/plain``, and status lines go to stderr, one per change.

A :class:`Renderer` shows the events one call of the async core emits (see
``cloudgpu._core``); it runs in the thread that waits for the call.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

from .errors import VersionSkewWarning

__all__ = ["Progress", "Renderer", "holds_unsent", "in_ipython", "publish_status", "show"]


def _shell() -> Any:
    """The running IPython shell, or None; IPython is never imported just to ask."""
    ipython = sys.modules.get("IPython")
    return ipython.get_ipython() if ipython is not None else None


def in_ipython() -> bool:
    """Whether this code runs inside IPython (a Jupyter kernel or the terminal)."""
    return _shell() is not None


def publish_status(text: str, handle: str | None = None) -> str:
    """Show (or update in place) one quiet status line; returns its handle."""
    if not in_ipython():
        print(text, file=sys.stderr, flush=True)
        return handle or uuid.uuid4().hex
    from IPython.display import publish_display_data

    display_id = handle or uuid.uuid4().hex
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    with _no_needless_flush():
        publish_display_data(
            {"text/plain": text,
             "text/html": f'<span style="color: var(--jp-ui-font-color2, gray); '
                          f'font-size: smaller">{escaped}</span>'},
            metadata={"cloudgpu": {"status": True}},
            transient={"display_id": display_id},
            update=handle is not None,
        )
    return display_id


_skipping = threading.local()


class _FlushUnlessSkipping:
    """A kernel display publisher's ``_flush_streams``, skipped while this thread says so."""

    def __init__(self, flush: Any) -> None:
        self.flush = flush

    def __call__(self) -> None:
        if not getattr(_skipping, "on", False):
            self.flush()


@contextlib.contextmanager
def _no_needless_flush() -> Iterator[None]:
    """Displays made in here skip ipykernel's flush of stdout and stderr when neither
    holds output yet to be sent.

    Each display flushes both first, so that what was printed before it shows before it,
    and each flush waits for the kernel's IOPub thread even when there is nothing to send:
    a status line took 1.4-1.7 ms with the two flushes and 0.4-0.9 ms without, on the 2-core
    VM of ``bench/RESULTS.md``. Where the streams are not ipykernel's, or it cannot tell,
    everything flushes as usual. Only this thread's displays skip; another thread that
    prints while it happens may see its text arrive just after the status line."""
    pub: Any = getattr(_shell(), "display_pub", None)
    flush = vars(pub).get("_flush_streams") if hasattr(pub, "__dict__") else None
    if flush is None and pub is not None and callable(getattr(pub, "_flush_streams", None)):
        flush = pub._flush_streams = _FlushUnlessSkipping(pub._flush_streams)
    if not isinstance(flush, _FlushUnlessSkipping) or _unsent_output():
        yield
        return
    _skipping.on = True
    try:
        yield
    finally:
        _skipping.on = False


def _unsent_output() -> bool:
    """Whether this kernel's stdout or stderr may hold output not yet sent."""
    return holds_unsent(sys.stdout) or holds_unsent(sys.stderr)


def holds_unsent(stream: Any) -> bool:
    """Whether ``stream`` may hold output not yet sent (True unless it is ipykernel's
    stream, which says what it buffers, and writes nowhere else)."""
    lock = getattr(stream, "_buffer_lock", None)
    if lock is None or getattr(stream, "echo", None) is not None:
        return True
    with lock:
        buffers = getattr(stream, "_buffers", None)
        return not isinstance(buffers, dict) or any(b.tell() for b in buffers.values())


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


def _plain(data: Mapping[str, Any]) -> str:
    """A rich output as text: its ``text/plain``, or which kinds it had."""
    if "text/plain" in data:
        return str(data["text/plain"])
    return f"[{', '.join(data) or 'empty output'}: shown in a notebook]"


def show(msg: dict[str, Any]) -> None:
    """Show one remote output message (call it from the thread the user waits in)."""
    msg_type = msg["msg_type"]
    content = msg["content"]
    if msg_type == "stream":
        stream = sys.stderr if content.get("name") == "stderr" else sys.stdout
        stream.write(content.get("text", ""))
        stream.flush()
        return
    if msg_type not in ("clear_output", "display_data", "execute_result",
                        "update_display_data"):
        return
    if not in_ipython():
        if msg_type != "clear_output":  # there is nothing on a terminal to take back
            print(_plain(content.get("data", {})), flush=True)
        return
    from IPython.display import clear_output, publish_display_data

    if msg_type == "clear_output":
        clear_output(wait=content.get("wait", False))
    else:
        publish_display_data(
            content.get("data", {}), content.get("metadata", {}),
            transient=content.get("transient") or None,
            **({"update": True} if msg_type == "update_display_data" else {}),
        )


class Renderer:
    """Shows the events of one call of the async core, as they come.

    Events are ``(kind, payload)``: ``output`` (a remote iopub message), ``progress``
    (a transfer), ``status`` (``(line, text)``: that line updates in place), ``notice``
    (``{"text": ...}``, the connection dropped or came back), ``say`` (text for stderr),
    ``warning`` (a version-skew warning).

    Args:
        quiet: show only what the remote code printed and displayed, none of cloudgpu's
            own lines.
    """

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.progress = Progress()
        self._lines: dict[str, str] = {}

    def __call__(self, kind: str, payload: Any) -> None:
        if kind == "output":
            show(payload)
        elif kind == "warning":
            warnings.warn(str(payload), VersionSkewWarning, stacklevel=2)
        elif self.quiet:
            return
        elif kind == "status":
            line, text = payload
            self._lines[line] = publish_status(f"cloudgpu: {text}", self._lines.get(line))
        elif kind == "progress":
            self.progress.update(payload, time.perf_counter())
        elif kind == "notice":
            print(f"cloudgpu: {payload['text']}", file=sys.stderr, flush=True)
        elif kind == "say":
            sys.stderr.write(str(payload))
            sys.stderr.flush()
