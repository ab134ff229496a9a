"""``%%remote`` and ``%remote``: run a cell on remote hardware, manage the sessions behind it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import sys
import time
import warnings
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from cloudgpu import _loop
from cloudgpu._format import money
from cloudgpu.client import get_client
from cloudgpu.environment import same_environment, split_requirements
from cloudgpu.errors import (
    CloudGPUError,
    HardwareUnavailableError,
    HostConnectionError,
    InvalidRequestError,
    RemoteKernelDiedError,
    SerializationError,
    UnknownHardwareError,
    VersionSkewWarning,
)
from cloudgpu.hardware import HardwareSpec, parse_spec
from cloudgpu.packages import type_versions, version_differences
from cloudgpu.serialize import Serialized, dumps, loads
from cloudgpu.session import CellResult, RemoteSession

from . import _report
from ._display import Progress, publish_status, render_error, show
from ._names import analyze

__all__ = ["RemoteMagics", "install_error_display"]

T = TypeVar("T")
_KEY_VALUE_OPTIONS = ("gpu", "max_cost", "idle_timeout")


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


Event = tuple[str, Any]


def _wait(coro_factory: Callable[[Callable[[str, Any], None]], Coroutine[Any, Any, T]],
          handle: Callable[[str, Any], None],
          on_interrupt: Callable[[], str] | None = None) -> T:
    """Run a coroutine on the background loop; show its events from this (main) thread.

    The coroutine gets a thread-safe ``emit(kind, payload)``. A first Ctrl-C calls
    ``on_interrupt`` (when given) and keeps waiting; without one, or on a second Ctrl-C,
    the coroutine is cancelled and KeyboardInterrupt propagates.
    """
    events: queue.SimpleQueue[Event] = queue.SimpleQueue()
    future: concurrent.futures.Future[T] = _loop.submit(
        coro_factory(lambda kind, payload: events.put((kind, payload)))
    )
    done = ("done", None)
    future.add_done_callback(lambda _: events.put(done))  # wake the wait below at once
    interrupted = False
    while True:
        try:
            event = events.get()
            if event is done:
                return future.result()
            handle(*event)
        except KeyboardInterrupt:
            if interrupted or on_interrupt is None:
                future.cancel()
                raise
            interrupted = True
            print(on_interrupt(), file=sys.stderr)


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
        code = self._shell.transform_cell(cell)
        try:
            names = analyze(code)
        except SyntaxError:
            names = None  # let the remote kernel report the syntax error, as it would locally
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
        session = self._session(spec, args.new, options)
        result = self._run(session, cell, push, pull)
        self.last_result = result
        self._finish(session, result)
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
        for name in dict.fromkeys(reads + extra):
            if name not in ns or (name in hidden and ns[name] is hidden[name]):
                continue
            # An unpicklable input fails here, before anything runs.
            values[name] = dumps(ns[name], name)
        return values

    def _session(self, spec: HardwareSpec, new: bool, options: dict[str, Any]) -> RemoteSession:
        client = get_client()
        existing = client.current(str(spec))
        if existing is not None and not new and \
                same_environment(existing.grant.environment, options.get("environment")):
            return existing
        handle = publish_status(f"cloudgpu: asking for {spec.display} ...")
        started = time.perf_counter()

        def on_event(kind: str, text: str) -> None:
            publish_status(f"cloudgpu: {text}", handle)

        try:
            session = _wait(lambda emit: client.session(
                spec, new=new, on_status=lambda text: emit("status", text), options=options,
            ), on_event)
        except KeyboardInterrupt:
            publish_status(f"cloudgpu: gave up waiting for {spec.display}", handle)
            raise
        except HardwareUnavailableError as e:
            raise HardwareUnavailableError(
                f"{e} (`gpu=cpu` always works locally; on a machine without GPUs, simulate some "
                f"with CLOUDGPU_SIMULATE=H100:1 before the first session starts.)"
            ) from None
        note = f" (the previous one was stopped: {session.replaced_reason})" \
            if session.replaced_reason else ""
        where = client.provider.description
        publish_status(f"cloudgpu: {session.grant.display} session ready on the {where} in "
                       f"{time.perf_counter() - started:.1f} s{note}", handle)
        return session

    def _run(self, session: RemoteSession, code: str, push: dict[str, Serialized],
             pull: list[str]) -> CellResult:
        progress = Progress()
        client = get_client()
        interrupted: list[bool] = []

        async def stopped_by_pool() -> RemoteKernelDiedError | None:
            reason = await client.ended_reason(session)
            if not reason:
                return None
            return RemoteKernelDiedError(
                f"The {session.grant.display} session was stopped: {reason}. Your local "
                f"variables are unchanged; the next %%remote cell starts a new session."
            )

        async def run(emit: Callable[[str, Any], None]) -> CellResult:
            # Budget warnings travel beside the cell, not after it: no extra round trip.
            budget = asyncio.ensure_future(client.warnings(session))
            try:
                result = await session.run_cell(code, push, pull, emit)
            except (HostConnectionError, RemoteKernelDiedError) as e:
                budget.cancel()
                raise (await stopped_by_pool() or e) from None
            if result.error is not None and not interrupted:
                # A pool stopping a session interrupts the cell first: say why, not just
                # "KeyboardInterrupt". Costs a round trip on failed cells only.
                stopped = await stopped_by_pool()
                if stopped is not None:
                    budget.cancel()
                    raise stopped
            result.warnings = await budget
            return result

        def on_event(kind: str, payload: Any) -> None:
            if kind == "progress":
                progress.update(payload, time.perf_counter())
            else:
                show(payload)

        def interrupt() -> str:
            interrupted.append(True)
            _loop.submit(session.interrupt())
            return "cloudgpu: interrupting the remote cell (interrupt again to stop waiting)"

        return _wait(run, on_event, interrupt)

    def _finish(self, session: RemoteSession, result: CellResult) -> None:
        if session.version_warnings and not session.version_warned:
            session.version_warned = True
            for text in session.version_warnings:  # before any unpickling error they explain
                warnings.warn(text, VersionSkewWarning, stacklevel=1)
        if result.push_errors:
            raise SerializationError(
                "The cell did not run: these inputs could not be loaded remotely:\n"
                + "\n".join(f"  {n}: {why}" for n, why in result.push_errors.items())
            )
        if result.error is not None:
            result.error.host = session.grant.host_url
            raise result.error
        ns = self._shell.user_ns
        for name, value in result.pulled.items():
            ns[name] = loads(value.codec, value.frames, name)
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
        client = get_client()
        if args.action == "shutdown":
            if not args.all and args.gpu is None:
                raise UsageError(
                    "Say which session to stop: `%remote shutdown gpu=H100`, or `--all`."
                )
            spec = None if args.all else _parse_hardware(args.gpu)
            for key in [str(spec)] if spec is not None else list(client.sessions):
                session = client.current(key)
                if session is not None:  # what it ran on, before it goes
                    self._record_ran_on(key, session)
            stopped = _loop.run_sync(client.shutdown(spec))
            print(f"Stopped: {', '.join(stopped)}" if stopped else "No such session was running.")
            return
        mine = client.session_ids()
        if args.action == "status":
            print(_report.status(_loop.run_sync(client.user_sessions()), mine))
        elif args.action == "hardware":
            print(_report.hardware(_loop.run_sync(client.hardware())))
        else:
            print(_report.cost(_loop.run_sync(client.cost()), mine))


def _parse_hardware(text: str) -> HardwareSpec:
    """Parse with the shipped catalog; a name only the pool knows is checked with the pool's."""
    try:
        return parse_spec(text)
    except UnknownHardwareError as e:
        local_error = e
    try:
        catalog = _loop.run_sync(get_client().catalog())
    except CloudGPUError as e:
        raise UsageError(f"{local_error} (The pool's own types could not be read: {e})") from None
    try:
        return parse_spec(text, catalog)
    except UnknownHardwareError as e:
        raise UsageError(str(e)) from None


def install_error_display(shell: Any) -> None:
    """Render cloudgpu errors without a local traceback through our own code."""
    shell.set_custom_exc((CloudGPUError,), render_error)
