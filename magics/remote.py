"""``%%remote`` and ``%remote``: run a cell on remote hardware, manage the sessions behind it."""

from __future__ import annotations

import queue
import sys
import time
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import clear_output, publish_display_data

from cloudgpu import _loop
from cloudgpu.client import get_client
from cloudgpu.errors import (
    CloudGPUError,
    HardwareUnavailableError,
    RemoteExecutionError,
    SerializationError,
    UnknownHardwareError,
)
from cloudgpu.hardware import HardwareSpec, parse_spec
from cloudgpu.serialize import Serialized, dumps, loads
from cloudgpu.session import CellResult, RemoteSession

from ._names import analyze

__all__ = ["RemoteMagics", "install_error_display"]

_KEY_VALUE_OPTIONS = ("gpu",)


def _split_names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def _key_values_to_flags(line: str) -> str:
    """Accept ``gpu=H100`` as well as ``--gpu H100``."""
    words = []
    for word in line.split():
        key, sep, value = word.partition("=")
        if sep and key in _KEY_VALUE_OPTIONS:
            words += [f"--{key}", value]
        else:
            words.append(word)
    return " ".join(words)


@magics_class
class RemoteMagics(Magics):
    """Run cells on remote GPUs (``%%remote``) and manage those sessions (``%remote``)."""

    #: How the last ``%%remote`` cell went (timing, bytes moved), for inspection and tests.
    last_result: CellResult | None = None

    @magic_arguments()
    @argument("--gpu", "-g", default="cpu",
              help="Hardware to run on: H100, H100:2, A100-80GB, H100|A100-80GB "
                   "(fallbacks in order), cpu, any. Also written gpu=H100. Default: cpu.")
    @argument("--push", default="",
              help="Extra names to send (comma separated), beside those the cell reads.")
    @argument("--pull", default="",
              help="Extra names to bring back (comma separated), beside those the cell assigns.")
    @argument("--no-pull", action="store_true",
              help="Bring nothing back; the cell's results stay in the remote kernel.")
    @argument("--new", action="store_true",
              help="Start a fresh remote kernel for this hardware instead of reusing the last.")
    @cell_magic
    def remote(self, line: str, cell: str) -> None:
        """Run this cell on remote hardware, moving its variables there and back.

        Usage::

            %%remote gpu=H100 [--push a,b] [--pull c,d] [--no-pull] [--new]

        The names the cell reads that exist in your notebook are sent (modules are
        imported there, not copied); the names it assigns come back. Output shows up
        as it happens. A second ``%%remote`` cell with the same hardware reuses the same
        remote kernel, so imports and remote-only variables are still there.

        Interrupt the kernel to interrupt the remote cell. An exception there fails
        this cell with the remote traceback.
        """
        args = parse_argstring(self.remote, _key_values_to_flags(line))
        spec = _parse_hardware(args.gpu)
        code = self.shell.transform_cell(cell)
        try:
            names = analyze(code)
        except SyntaxError:
            names = None  # let the remote kernel report the syntax error, as it would locally
        push = self._serialize_inputs(names.reads if names else [], _split_names(args.push))
        pull: list[str] = []
        if not args.no_pull:
            writes = [n for n in names.writes if n not in names.imports] if names else []
            pull = list(dict.fromkeys(writes + _split_names(args.pull)))
        session = self._session(spec, new=args.new)
        result = self._run(session, cell, push, pull)
        self.last_result = result
        self._finish(session, result)

    def _serialize_inputs(self, reads: list[str], extra: list[str]) -> dict[str, Serialized]:
        ns = self.shell.user_ns
        hidden = self.shell.user_ns_hidden
        for name in extra:
            if name not in ns:
                raise UsageError(f"--push names `{name}`, which is not defined in this notebook.")
        values: dict[str, Serialized] = {}
        for name in dict.fromkeys(reads + extra):
            if name not in ns or (name in hidden and ns[name] is hidden[name]):
                continue
            values[name] = dumps(ns[name], name)  # an unpicklable input fails here, before anything runs
        return values

    def _session(self, spec: HardwareSpec, new: bool) -> RemoteSession:
        client = get_client()
        fresh = new or str(spec) not in client.sessions or not client.sessions[str(spec)].alive
        handle = None
        if fresh:
            handle = publish_status(f"cloudgpu: starting a {spec.display} session on the "
                                    f"{client.provider.description} ...")
        started = time.perf_counter()
        try:
            session = _loop.run_sync(client.session(spec, new=new))
        except HardwareUnavailableError as e:
            raise HardwareUnavailableError(
                f"{e} Ask for other hardware (`gpu=cpu` always works locally), or, on a machine "
                f"without GPUs, simulate some with CLOUDGPU_SIMULATE=H100:1 before starting Jupyter."
            ) from None
        if handle is not None:
            note = f" (the previous one stopped: {session.replaced_reason})" \
                if session.replaced_reason else ""
            publish_status(f"cloudgpu: {session.grant.display} session ready in "
                           f"{time.perf_counter() - started:.1f} s{note}", handle)
            for text in session.version_warnings:
                print(f"cloudgpu warning: {text}", file=sys.stderr)
        return session

    def _run(self, session: RemoteSession, code: str, push: dict[str, Serialized],
             pull: list[str]) -> CellResult:
        events: queue.SimpleQueue[tuple[str, dict[str, Any]]] = queue.SimpleQueue()
        future = _loop.submit(session.run_cell(code, push, pull, lambda *e: events.put(e)))
        progress = _Progress()
        interrupted = False
        while True:
            try:
                try:
                    kind, payload = events.get(timeout=0.05)
                except queue.Empty:
                    if future.done():
                        while not events.empty():
                            _show(*events.get(), progress)
                        break
                    continue
                _show(kind, payload, progress)
            except KeyboardInterrupt:
                if interrupted:
                    future.cancel()
                    raise
                interrupted = True
                print("cloudgpu: interrupting the remote cell (interrupt again to stop waiting)",
                      file=sys.stderr)
                _loop.submit(session.interrupt())
        return future.result()

    def _finish(self, session: RemoteSession, result: CellResult) -> None:
        if result.push_errors:
            raise SerializationError(
                "The cell did not run: these inputs could not be loaded remotely:\n"
                + "\n".join(f"  {n}: {why}" for n, why in result.push_errors.items())
            )
        if result.error is not None:
            result.error.host = session.grant.host_url  # type: ignore[attr-defined]
            raise result.error
        ns = self.shell.user_ns
        for name, value in result.pulled.items():
            ns[name] = loads(value.codec, value.frames, name)
        for name, why in result.pull_errors.items():
            print(f"cloudgpu: `{name}` stayed remote: {why}", file=sys.stderr)
        publish_status(f"cloudgpu · {session.grant.display} · {result.seconds:.2f} s")

    @magic_arguments()
    @argument("action", choices=["status", "shutdown"], help="What to do.")
    @argument("--all", action="store_true", help="With shutdown: stop every session.")
    @argument("--gpu", "-g", default=None, help="With shutdown: the hardware whose session to stop.")
    @line_magic("remote")
    def remote_line(self, line: str) -> None:
        """Manage remote sessions.

        Usage::

            %remote status                 # sessions, hardware, state
            %remote shutdown --all         # stop every session and free its hardware
            %remote shutdown gpu=H100      # stop one
        """
        args = parse_argstring(self.remote_line, _key_values_to_flags(line))
        client = get_client()
        if args.action == "status":
            if not client.sessions:
                print("No remote sessions. Run a `%%remote` cell to start one.")
            for key, s in client.sessions.items():
                state = "alive" if s.alive else f"stopped ({s.stopped_reason})"
                print(f"{key:<16} {s.grant.display:<24} {state:<10} kernel {s.kernel_id} "
                      f"on {s.grant.host_url}")
            return
        if not args.all and args.gpu is None:
            raise UsageError("Say which session to stop: `%remote shutdown gpu=H100`, or `--all`.")
        spec = None if args.all else _parse_hardware(args.gpu)
        stopped = _loop.run_sync(client.shutdown(spec))
        print(f"Stopped: {', '.join(stopped)}" if stopped else "No such session was running.")


def _parse_hardware(text: str) -> HardwareSpec:
    try:
        return parse_spec(text)
    except UnknownHardwareError as e:
        raise UsageError(str(e)) from None


class _Progress:
    """A single updating line for transfers big enough to take a while."""

    def __init__(self) -> None:
        self.handle: str | None = None
        self.last = 0.0

    def update(self, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        finished = info["done"] >= info["total"]
        if not finished and now - self.last < 0.25:
            return
        self.last = now
        verb = "sending" if info["direction"] == "push" else "receiving"
        text = (f"cloudgpu: {verb} {info['done'] / 2**20:,.0f} / "
                f"{info['total'] / 2**20:,.0f} MiB")
        self.handle = publish_status(text, self.handle)


def publish_status(text: str, handle: str | None = None) -> str:
    """Show (or update in place) one quiet status line; returns its display id."""
    import uuid

    display_id = handle or uuid.uuid4().hex
    publish_display_data(
        {"text/plain": text,
         "text/html": f'<span style="color: var(--jp-ui-font-color2, gray); '
                      f'font-size: smaller">{_escape(text)}</span>'},
        metadata={"cloudgpu": {"status": True}},
        transient={"display_id": display_id},
        update=handle is not None,
    )
    return display_id


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _show(kind: str, payload: dict[str, Any], progress: _Progress) -> None:
    """Show one remote output under the running cell, from the main thread."""
    if kind == "progress":
        progress.update(payload)
        return
    msg_type = payload["msg_type"]
    content = payload["content"]
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


def _render_error(shell: Any, etype: type, value: BaseException, tb: Any,
                  tb_offset: int | None = None) -> list[str]:
    """Show a remote exception as its remote traceback, any other cloudgpu error as one line."""
    if isinstance(value, RemoteExecutionError):
        header = f"\x1b[1mRemote traceback\x1b[0m (on {getattr(value, 'host', 'the remote host')}):"
        stb = [header, *value.traceback] if value.traceback else \
            [header, f"{value.ename}: {value.evalue}"]
    else:
        stb = [f"\x1b[31m{etype.__name__}\x1b[0m: {value}"]
    show = getattr(shell, "_showtraceback", None)
    if show is not None:
        show(etype, value, stb)
    else:  # plain IPython
        print("\n".join(stb), file=sys.stderr)
    return stb


def install_error_display(shell: Any) -> None:
    """Render cloudgpu errors without a local traceback through our own code."""
    shell.set_custom_exc((CloudGPUError,), _render_error)
