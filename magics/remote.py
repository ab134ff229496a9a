"""``%%remote`` and ``%remote``: run a cell on remote hardware, manage the sessions behind it."""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Any

from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from cloudgpu import _loop, api
from cloudgpu._bridge import run_blocking
from cloudgpu._changes import NotebookChanges
from cloudgpu._core import SessionCore, resolve_spec
from cloudgpu._format import money
from cloudgpu._output import Renderer, publish_status
from cloudgpu.client import get_client
from cloudgpu.environment import split_requirements
from cloudgpu.errors import (
    CloudGPUError,
    InvalidRequestError,
    UnknownHardwareError,
    VersionSkewWarning,
)
from cloudgpu.hardware import HardwareSpec, parse_spec
from cloudgpu.packages import type_versions, version_differences
from cloudgpu.serialize import FINGERPRINT_MIN, Serialized, dumps, loads
from cloudgpu.session import CellResult, RemoteSession

from . import _report
from ._display import render_error
from ._names import CellNames, analyze

__all__ = ["RemoteMagics", "install_error_display"]

_KEY_VALUE_OPTIONS = ("gpu", "max_cost", "idle_timeout")
#: What a user can do once the pool stopped a %%remote cell's session.
THEN = "Your local variables are unchanged; the next %%remote cell starts a new session."


def _split_names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def _key_values_to_flags(line: str) -> str:
    """Accept ``gpu=H100 max_cost=2.5`` as well as ``--gpu H100 --max-cost 2.5``."""
    words = []
    for word in line.split():
        key, sep, value = word.partition("=")
        if sep and key in _KEY_VALUE_OPTIONS:
            words += [f"--{key.replace('_', '-')}", value]
        else:
            words.append(word)
    return " ".join(words)


def _cell_names(shell: InteractiveShell, cell: str) -> CellNames | None:
    """What the cell reads and writes, as IPython would run it; None if it is not Python
    (the remote kernel reports the syntax error, as it would locally).

    A cell without IPython's escapes (``%``, ``!``, ``?``) that parses is read as it is:
    IPython's transforms only act on those, on prompts and on indentation (which do not
    parse), and the shell's transform took about 0.2 ms of every cell on the 2-core VM of
    ``bench/RESULTS.md``."""
    if not any(escape in cell for escape in "%!?"):
        with contextlib.suppress(SyntaxError):
            return analyze(cell)
    try:
        return analyze(shell.transform_cell(cell))
    except SyntaxError:
        return None


@magics_class
class RemoteMagics(Magics):
    """Run cells on remote GPUs (``%%remote``) and manage those sessions (``%remote``)."""

    #: How the last ``%%remote`` cell went (timing, bytes moved), for inspection and tests.
    last_result: CellResult | None = None

    def __init__(self, shell: InteractiveShell | None = None, **kwargs: Any) -> None:
        super().__init__(shell, **kwargs)
        #: What each hardware's session ran on (``metadata.cloudgpu.ran_on``), by spec,
        #: as its agent last said; kept after the session is stopped.
        self.ran_on: dict[str, dict[str, Any]] = {}
        self._version_warned: set[tuple[str, str]] = set()  # (kernel, warning) said once
        #: Which big inputs may have changed since they were fingerprinted.
        self.changes = NotebookChanges()
        if shell is not None:
            self.changes.install(shell)

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
    @argument("--max-cost", type=float, default=None,
              help="Stop the session once it has cost this many dollars (max_cost=2.50). "
                   "Applies when a new session starts.")
    @argument("--idle-timeout", type=float, default=None,
              help="Seconds the session may sit idle before the pool stops it "
                   "(idle_timeout=600; default: the pool's, 15 minutes).")
    @argument("--env", default="",
              help="pip requirements the remote kernel needs, comma separated: "
                   "--env tabulate==0.9.0,numpy>=1.26,<3. The host makes an environment with "
                   "them once and caches it; a cell asking for another environment gets a "
                   "new session.")
    @cell_magic
    def remote(self, line: str, cell: str) -> None:
        """Run this cell on remote hardware, moving its variables there and back.

        Usage::

            %%remote gpu=H100 [max_cost=2.50] [idle_timeout=600] [--push a,b] [--pull c,d]
                     [--no-pull] [--new] [--env pkg==1.0,other>=2]

        The names the cell reads that exist in your notebook are sent (modules are
        imported there, not copied); the names it assigns come back. Output shows up
        as it happens. A second ``%%remote`` cell with the same hardware reuses the same
        remote kernel, so imports and remote-only variables are still there. While the
        hardware is busy the cell waits in line and says so; interrupt to give up.

        After the cell, one line says where it ran, how long it took and what it cost.
        Interrupt the kernel to interrupt the remote cell. An exception there fails
        this cell with the remote traceback.
        """
        args = parse_argstring(self.remote, _key_values_to_flags(line))
        spec = _parse_hardware(args.gpu)
        names = _cell_names(self._shell, cell)
        push = self._serialize_inputs(names.reads if names else [], _split_names(args.push))
        pull: list[str] = []
        if not args.no_pull:
            writes = [n for n in names.writes if n not in names.imports] if names else []
            pull = list(dict.fromkeys(writes + _split_names(args.pull)))
        try:
            environment = split_requirements(args.env)
        except InvalidRequestError as e:
            raise UsageError(str(e)) from None
        options = {"max_cost": args.max_cost, "idle_timeout": args.idle_timeout,
                   "environment": environment}
        core = SessionCore(get_client(), spec, key=str(spec), options=options, then=THEN)
        self._open(core, args.new)
        try:
            result = run_blocking(lambda emit: core.run_cell(emit, cell, push, pull),
                                  Renderer(), core.interrupt_soon)
        finally:
            self.last_result = core.last_result or self.last_result
        session = core.remote  # not the one opened above if that one had just been stopped
        self._finish(session, result)
        self._remember_inputs(push, result)
        self._warn_versions(session, result, list(push))

    @property
    def _shell(self) -> InteractiveShell:
        assert self.shell is not None, "the magics are registered with a shell"
        return self.shell

    def _serialize_inputs(self, reads: list[str], extra: list[str]) -> dict[str, Serialized]:
        ns = self._shell.user_ns
        hidden = self._shell.user_ns_hidden
        for name in extra:
            if name not in ns:
                raise UsageError(f"--push names `{name}`, which is not defined in this notebook.")
        values: dict[str, Serialized] = {}
        trust = not get_client().verify_unchanged
        for name in dict.fromkeys(reads + extra):
            if name not in ns or (name in hidden and ns[name] is hidden[name]):
                continue
            # An unpicklable input fails here, before anything runs.
            values[name] = dumps(ns[name], name)
            if trust and values[name].nbytes >= FINGERPRINT_MIN:
                values[name].digest = self.changes.fingerprint(name, ns[name])
        return values

    def _remember_inputs(self, push: dict[str, Serialized], result: CellResult) -> None:
        """What the cell sent is what those names hold here, until code runs."""
        ns = self._shell.user_ns
        for name, value in push.items():
            if name in result.pulled or name in result.push_errors or name not in ns:
                continue
            big = value.nbytes >= FINGERPRINT_MIN
            self.changes.remember(name, ns[name], value.digest if big else None)

    def _open(self, core: SessionCore, new: bool) -> None:
        if new or not core.adopt():
            run_blocking(lambda emit: core.open(emit, new=new), Renderer())

    def _finish(self, session: RemoteSession, result: CellResult) -> None:
        ns = self._shell.user_ns
        for name, value in result.pulled.items():
            ns[name] = loads(value.codec, value.frames, name)
            # As the agent fingerprinted it on its way out (None: too small to be).
            self.changes.remember(name, ns[name], value.digest)
        for name, why in result.pull_errors.items():
            print(f"cloudgpu: `{name}` stayed remote: {why}", file=sys.stderr)
        grant = session.grant
        line = f"cloudgpu · {grant.display} · {result.seconds:.2f} s"
        if grant.rate_per_hour:
            line += (f" · {money(grant.rate_per_hour * result.seconds / 3600)} this cell"
                     f" · {money(grant.cost())} session")
        for warning in result.warnings:
            line += f" · ⚠ {warning}"
        publish_status(line)

    def _warn_versions(self, session: RemoteSession, result: CellResult,
                       pushed: list[str]) -> None:
        """Name each value that moved between two versions of the package of its type."""
        ns = self._shell.user_ns
        moved = {n: ns[n] for n in [*pushed, *result.pulled] if n in ns}
        for text in version_differences(type_versions(moved), result.versions):
            if (session.kernel_id, text) not in self._version_warned:
                self._version_warned.add((session.kernel_id, text))
                warnings.warn(text, VersionSkewWarning, stacklevel=1)

    def ran_on_report(self) -> dict[str, dict[str, Any]]:
        """What each hardware's session ran on, by spec, asking the live sessions' agents
        now (``cloudgpu run`` records this in ``metadata.cloudgpu.ran_on``)."""
        client = get_client()
        for key in list(client.sessions):
            session = client.current(key)
            if session is not None:
                self._record_ran_on(key, session)
        return dict(self.ran_on)

    def _record_ran_on(self, key: str, session: RemoteSession) -> None:
        try:
            record = _loop.run_sync(session.kernel.ran_on())
        except CloudGPUError as e:
            print(f"cloudgpu: could not ask the {session.grant.display} session what it runs "
                  f"on: {e}", file=sys.stderr)
            return
        self.ran_on[key] = {"hardware": str(parse_spec(session.grant.hardware)),
                            "environment": session.grant.environment, **record}

    @magic_arguments()
    @argument("action", choices=["status", "hardware", "cost", "shutdown"], help="What to do.")
    @argument("--all", action="store_true", help="With shutdown: stop every session.")
    @argument("--gpu", "-g", default=None,
              help="With shutdown: the hardware whose session to stop.")
    @line_magic("remote")  # type: ignore[arg-type]
    def remote_line(self, line: str) -> None:
        """Manage remote sessions.

        Usage::

            %remote status              # your sessions: hardware, state, idle time, cost
            %remote hardware            # the catalog: prices, free/total, queue length
            %remote cost                # today's spending: total, this notebook, per session
            %remote shutdown --all      # stop every session of this notebook, free the GPUs
            %remote shutdown gpu=H100   # stop one
        """
        args = parse_argstring(self.remote_line, _key_values_to_flags(line))
        if args.action == "shutdown":
            if not args.all and args.gpu is None:
                raise UsageError(
                    "Say which session to stop: `%remote shutdown gpu=H100`, or `--all`."
                )
            spec = None if args.all else _parse_hardware(args.gpu)
            client = get_client()
            for key in [str(spec)] if spec is not None else list(client.sessions):
                session = client.current(key)
                if session is not None:  # what it ran on, before it goes
                    self._record_ran_on(key, session)
            stopped = api.shutdown(None if spec is None else str(spec))
            print(f"Stopped: {', '.join(stopped)}" if stopped else "No such session was running.")
            return
        mine = get_client().session_ids()
        if args.action == "status":
            print(_report.status(api.sessions(), mine))
        elif args.action == "hardware":
            print(_report.hardware(api.hardware()))
        else:
            print(_report.cost(api.cost(), mine))


def _parse_hardware(text: str) -> HardwareSpec:
    """The spec, as the API reads it; a mistake in it is the user's (no traceback)."""
    with contextlib.suppress(UnknownHardwareError):  # a name only the pool knows: ask it
        return parse_spec(text)  # the shipped catalog knows almost every name: no round trip
    try:
        return _loop.run_sync(resolve_spec(get_client(), text))
    except UnknownHardwareError as e:
        raise UsageError(str(e)) from None


def install_error_display(shell: Any) -> None:
    """Render cloudgpu errors without a local traceback through our own code."""
    shell.set_custom_exc((CloudGPUError,), render_error)
