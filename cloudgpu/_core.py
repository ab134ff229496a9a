"""The async core every front-end drives a remote session through, once.

The ``%%remote`` magic, the Cloud GPU kernel's ``%cloudgpu`` commands and the Python API
(``cloudgpu.session``, ``cloudgpu.function``) all go through :class:`SessionCore`. It gets
a session from the :class:`~cloudgpu.client.Client` with a live progress line, runs cells
(inputs, code and outputs pipelined, see :class:`~cloudgpu.session.RemoteSession`) and
calls functions there, enforces timeouts, turns a session its provider stopped into the
error that says why (:class:`~cloudgpu.errors.BudgetExceededError` for a spent budget),
moves a session to other hardware with its variables, and releases it.

It runs on the client's loop, the process's background loop: ``cloudgpu._bridge`` is how a
thread or another event loop waits for it. What it shows goes to ``emit`` as events (see
``cloudgpu._output.Renderer``), which the waiting side shows in its own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._bridge import Emit, LoopTask
from ._move import MoveReport
from ._output import in_ipython
from .client import Client
from .environment import same_environment
from .errors import (
    BudgetExceededError,
    CloudGPUError,
    HardwareUnavailableError,
    HostConnectionError,
    RemoteExecutionError,
    RemoteKernelDiedError,
    RemoteTimeoutError,
    SerializationError,
    UnknownHardwareError,
)
from .hardware import HardwareSpec, parse_spec
from .remote import Forward
from .serialize import Serialized, dumps, loads
from .session import CellResult, RemoteSession

__all__ = ["INTERRUPT_GRACE", "SessionCore", "SessionInfo", "resolve_spec", "stopped_error",
           "stopped_kind"]

INTERRUPT_GRACE = 10.0
"""Seconds remote code that ran past its timeout gets to stop once interrupted, before its
session is stopped instead."""

#: What the remote kernel calls a function call's parts (``_`` names never move on a switch).
_FN, _ARGS, _RESULT = "_cloudgpu_fn", "_cloudgpu_args", "_cloudgpu_result"
_CALL = f"{_RESULT} = {_FN}(*{_ARGS}[0], **{_ARGS}[1])"

#: Words in a provider's stop reason that mean a budget was spent (``service.Pool`` says
#: "the session's max_cost of $2.00 was reached", "your daily budget of $3.00 is spent").
_BUDGET_WORDS = ("max_cost", "daily budget")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def stopped_kind(reason: str) -> type[CloudGPUError]:
    """The error class for a session its provider stopped for ``reason``:
    :class:`BudgetExceededError` when a budget was spent, :class:`RemoteKernelDiedError` for
    any other reason (idleness, its owner, a lost machine)."""
    return BudgetExceededError if any(w in reason for w in _BUDGET_WORDS) else RemoteKernelDiedError


def stopped_error(hardware: str, reason: str, then: str = "") -> CloudGPUError:
    """The error for a session its provider stopped (see :func:`stopped_kind`). ``then``
    says what the user can do next."""
    return stopped_kind(reason)(
        f"The {hardware} session was stopped: {reason}.{f' {then}' if then else ''}")


async def resolve_spec(client: Client, text: str) -> HardwareSpec:
    """Parse a hardware spec with the shipped catalog; a name only the pool knows (its
    operator added it) is checked against the pool's own.

    Raises:
        UnknownHardwareError: neither knows it; the message lists what is known.
    """
    try:
        return parse_spec(text)
    except UnknownHardwareError as e:
        local_error = e
    try:
        catalog = await client.catalog()
    except CloudGPUError as e:
        raise UnknownHardwareError(
            f"{local_error} (The pool's own types could not be read: {e})") from None
    return parse_spec(text, catalog)


@dataclass(frozen=True)
class SessionInfo:
    """Where a session runs and what it has cost.

    Attributes:
        hardware: what runs it, as users read it: ``1x H100 (simulated)``, ``CPU``.
        kernel_id: the remote kernel.
        host_url: the host it runs on.
        session_id: the pool's id for it (None when no pool granted it).
        provider: who granted it: ``local pool``, ``pool at https://...``.
        uptime: seconds since it was connected (until it was closed).
        cost: dollars it has cost so far (until it was closed).
        rate_per_hour: dollars per hour its hardware costs.
        warnings: the provider's warnings about it (a budget nearly spent), as last heard.
    """

    hardware: str
    kernel_id: str
    host_url: str
    session_id: str | None
    provider: str
    uptime: float
    cost: float
    rate_per_hour: float
    warnings: tuple[str, ...] = ()


class SessionCore:
    """One remote session as a front-end drives it.

    Args:
        client: the owner of sessions.
        spec: the hardware.
        key: keep the session in the client under this key, for the next core with the
            same key to reuse (the magic: one per hardware spec); None for a session of
            this core's own, which :meth:`close` releases.
        options: ``max_cost``, ``idle_timeout``, ``notebook`` (see ``SessionProvider``).
        label: names the session in its progress lines (a function's name).
        then: what the user can do once the provider stopped the session.
    """

    def __init__(self, client: Client, spec: HardwareSpec, *, key: str | None = None,
                 options: Mapping[str, Any] | None = None, label: str = "",
                 then: str = "") -> None:
        self.client = client
        self.spec = spec
        self.key = key
        self.options = {k: v for k, v in (options or {}).items() if v is not None}
        self.label = label
        self.then = then
        #: How the last cell went (timing, bytes moved), also when it failed.
        self.last_result: CellResult | None = None
        self._line = uuid.uuid4().hex  # this session's status line
        self._session: RemoteSession | None = None
        self._staged: dict[str, Serialized] = {}
        self._running = False
        self._interrupted = False
        self._interrupts: set[LoopTask[None]] = set()
        self._emit: Emit | None = None  # the running call's, for what an interrupt says
        self._noticed: set[str] = set()
        self._closed_at: tuple[float, float] | None = None  # (time.time(), time.monotonic())

    # --- the session -----------------------------------------------------------------------

    @property
    def remote(self) -> RemoteSession:
        """The session, once open.

        Raises:
            RemoteKernelDiedError: it was closed.
        """
        if self._closed_at is not None or self._session is None:
            raise RemoteKernelDiedError(
                f"This {self.spec.display} session is closed"
                f"{'' if self._session is not None else ' (it never opened)'}. "
                f"{self.then or 'Open a new one.'}")
        return self._session

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` released the session."""
        return self._closed_at is not None

    @property
    def running(self) -> bool:
        """Whether remote code of this core runs now (a cell or a call)."""
        return self._running

    def status(self, emit: Emit, text: str) -> None:
        """Show ``text`` on this session's status line (it updates in place)."""
        emit("status", (self._line, f"{self.label}: {text}" if self.label else text))

    def adopt(self) -> bool:
        """Take the client's live session under ``key``, if there is one (from any thread)."""
        current = self.client.current(self.key) if self.key is not None else None
        if current is not None and not same_environment(current.grant.environment,
                                                        self.options.get("environment")):
            current = None  # another environment: client.session replaces it
        if current is not None:
            self._session = current
        return current is not None

    async def open(self, emit: Emit, *, new: bool = False, forward: Forward | None = None,
                   announce: bool = True, replaced: str | None = None) -> RemoteSession:
        """The session: the client's live one under ``key`` (unless ``new``), else a new one.

        While the provider finds hardware its progress (``waiting for H100: 2 ahead of
        you``) shows on the status line; with ``announce`` the line also says what is
        asked for and, at the end, what was granted, where and how fast, and why the
        session it replaces ended (``replaced``, when the client no longer holds that one).
        ``forward`` gets the connection's traffic that is not ours (the Cloud GPU kernel's
        frontends'). Cancelling withdraws the request.

        Raises:
            CloudGPUError: a subclass saying why no session can be had.
        """
        if not new and self.adopt():
            return self.remote
        if announce:
            self.status(emit, f"asking for {self.spec.display} ...")
        started = time.perf_counter()

        def on_status(text: str) -> None:
            self.status(emit, text)

        try:
            if self.key is None:
                session = await self.client.acquire(self.spec, on_status=on_status,
                                                    options=self.options, forward=forward)
            else:
                session = await self.client.session(self.spec, key=self.key, new=new,
                                                    on_status=on_status, options=self.options,
                                                    forward=forward)
        except asyncio.CancelledError:
            if announce:
                self.status(emit, f"gave up waiting for {self.spec.display}")
            raise
        except HardwareUnavailableError as e:
            raise HardwareUnavailableError(
                f"{e} (`gpu=cpu` always works locally; on a machine without GPUs, simulate some "
                f"with CLOUDGPU_SIMULATE=H100:1 before the first session starts.)"
            ) from None
        self._session = session
        if announce:
            why = session.replaced_reason or replaced
            note = f" (the previous one was stopped: {why})" if why else ""
            where = (await self.client.get_provider()).description
            self.status(emit, f"{session.grant.display} session ready on the {where} in "
                              f"{time.perf_counter() - started:.1f} s{note}")
        return session

    def info(self) -> SessionInfo:
        """Where the session runs and what it has cost (no round trip)."""
        session = self.remote if self._closed_at is None else self._session
        assert session is not None
        now, mono = self._closed_at or (time.time(), time.monotonic())
        grant = session.grant
        return SessionInfo(hardware=grant.display, kernel_id=grant.kernel_id,
                           host_url=grant.host_url, session_id=grant.session_id,
                           provider=self.client.provider.description,
                           uptime=mono - session.kernel.opened, cost=grant.cost(now),
                           rate_per_hour=grant.rate_per_hour,
                           warnings=tuple(self.client.known_warnings(session)))

    async def close(self) -> None:
        """Release a session of this core's own (a keyed one stays for the next core)."""
        self._staged.clear()
        if self._closed_at is not None or self._session is None:
            return
        if self.key is None:
            self._closed_at = (time.time(), time.monotonic())
            await self.client.release(self._session)

    # --- cells -----------------------------------------------------------------------------

    async def run_cell(self, emit: Emit, code: str, push: dict[str, Serialized],
                       pull: list[str], *, timeout: float | None = None) -> CellResult:
        """Push inputs, run ``code``, pull outputs (one round trip), showing its output.

        ``last_result`` holds how it went, also when it failed.

        Raises:
            RemoteExecutionError: the code raised; it carries the remote traceback.
            SerializationError: inputs could not be loaded remotely (the code did not run).
            RemoteTimeoutError: it ran past ``timeout`` seconds and was interrupted.
            BudgetExceededError: the provider stopped the session: its budget is spent.
            RemoteKernelDiedError: the kernel died or the provider stopped it otherwise.
            HostConnectionError: the connection was lost for good.

        A keyed session the provider had stopped before the cell reached its kernel (the
        client had not heard yet, or heard only once the connection that the cell waited
        for came back) is replaced, and the cell runs on the new one, as it would have a
        moment later; one the cell reached fails it with the reason. So does
        one whose kernel died, or whose host was lost, before a word of the cell came back:
        the cell may have run there, and must not run twice.
        """
        return await self._run_cell(emit, code, push, pull, timeout, may_replace=True)

    async def _run_cell(self, emit: Emit, code: str, push: dict[str, Serialized],
                        pull: list[str], timeout: float | None,
                        may_replace: bool) -> CellResult:
        session = self.remote
        news = asyncio.ensure_future(self.news(session))  # beside the cell
        try:
            result = await self._execute(session, emit, code, push, pull, timeout)
            stopped = await self._stopped(session) \
                if result.error is not None and not self._interrupted else None
        except (HostConnectionError, RemoteKernelDiedError) as e:
            await _drop(news)
            reason = await self._ended(session)
            if reason and may_replace and self.key is not None and \
                    _stopped_unreached(e, session):
                await self.open(emit, replaced=reason)
                return await self._run_cell(emit, code, push, pull, timeout, False)
            raise (stopped_error(session.grant.display, reason, self.then) if reason
                   else e) from None
        except BaseException:
            await _drop(news)
            raise
        if stopped is not None:
            # A provider stopping a session interrupts the cell first: say why, not just
            # "KeyboardInterrupt". Costs a round trip on failed cells only.
            await _drop(news)
            raise stopped
        result.warnings, ended = await news
        self.last_result = result
        if ended:
            emit("notice", {"text": f"{ended}, so the next cell starts on a new session, "
                                    f"without this one's variables"})
            with contextlib.suppress(CloudGPUError):
                await self.client.release(session)
        self._check(emit, session, result)
        return result

    async def news(self, session: RemoteSession) -> tuple[list[str], str | None]:
        """What the provider says of ``session``, asked beside a cell (at most every
        ``WARNINGS_EVERY`` seconds, see :meth:`Client.warnings`): its warnings (a budget
        nearly spent), and, when it ended the session while the kernel still runs our cells
        (a host it judged lost, which it reaches again only later), the sentence saying so.
        A front end lets such a session go: nobody pays for that kernel, which the provider
        stops once it reaches it."""
        warnings = await self.client.warnings(session)
        reason = self.client.ended_meanwhile(session)
        ended = (f"the pool ended this {session.grant.display} session while its kernel "
                 f"still ran cells ({reason}); the pool stops that kernel once it reaches it"
                 ) if reason else None
        return warnings, ended

    def unsaid(self, warnings: Sequence[str]) -> list[str]:
        """Those of the provider's ``warnings`` this core has not shown yet, now counted as
        shown: each is said once, under the cell that first heard it."""
        new = [text for text in warnings if text not in self._noticed]
        self._noticed.update(new)
        return new

    async def _execute(self, session: RemoteSession, emit: Emit, code: str,
                       push: dict[str, Serialized], pull: list[str],
                       timeout: float | None) -> CellResult:
        """The cell, interrupted (and raising RemoteTimeoutError) after ``timeout`` seconds,
        and interrupted when cancelled."""
        cell = asyncio.ensure_future(session.run_cell(code, push, pull, emit))
        self._running, self._interrupted, self._emit = True, False, emit
        try:
            await asyncio.wait([cell], timeout=timeout)
            if not cell.done():
                return await self._time_out(session, cell, timeout or 0)
            return cell.result()
        except asyncio.CancelledError:
            if not cell.done():
                cell.cancel()
                await self.interrupt()  # the remote code must not run on unwatched
            raise
        finally:
            self._running = False

    async def _time_out(self, session: RemoteSession, cell: asyncio.Future[CellResult],
                        timeout: float) -> CellResult:
        self._interrupted = True
        await self.interrupt()
        await asyncio.wait([cell], timeout=INTERRUPT_GRACE)
        if cell.done():
            result = cell.result()
            if result.error is None or result.error.ename != "KeyboardInterrupt":
                return result  # it ended by itself just as the time was up
            raise RemoteTimeoutError(
                f"The remote code ran past its timeout of {timeout:g} s and was interrupted "
                f"on {session.grant.display}.")
        cell.cancel()
        await asyncio.wait([cell])
        await self.client.release(session)
        raise RemoteTimeoutError(
            f"The remote code ran past its timeout of {timeout:g} s and did not stop when "
            f"interrupted, so its {session.grant.display} session was stopped.")

    async def _stopped(self, session: RemoteSession) -> CloudGPUError | None:
        """The error saying why the provider stopped ``session``, if it did (see
        :meth:`_ended`)."""
        reason = await self._ended(session)
        return stopped_error(session.grant.display, reason, self.then) if reason else None

    async def _ended(self, session: RemoteSession) -> str | None:
        """Why the provider stopped ``session``, if it did; a stopped session is let go
        here, so that the next cell starts a new one (as the error says) and does not reach
        its kernel while the provider shuts it down."""
        reason = await self.client.ended_reason(session)
        if reason:
            with contextlib.suppress(CloudGPUError):
                await self.client.release(session)
        return reason

    def _check(self, emit: Emit, session: RemoteSession, result: CellResult) -> None:
        if session.version_warnings and not session.version_warned:
            session.version_warned = True
            for text in session.version_warnings:  # before any unpickling error they explain
                emit("warning", text)
        if result.push_errors:
            raise SerializationError(
                "The cell did not run: these inputs could not be loaded remotely:\n"
                + "\n".join(f"  {n}: {why}" for n, why in result.push_errors.items()))
        if result.error is not None:
            result.error.host = session.grant.host_url
            _note_remote_traceback(result.error)
            raise result.error

    async def interrupt(self) -> None:
        """Interrupt the remote code running now; the session stays usable."""
        self._interrupted = True
        session = self._session
        if session is None or not session.alive:
            return
        try:
            await session.interrupt()
        except CloudGPUError as e:
            if self._emit is not None:
                self._emit("say", f"cloudgpu: could not interrupt the remote code: {e}\n")

    def interrupt_soon(self) -> str | None:
        """From any thread: interrupt the remote code if some runs; what to tell the user,
        or None when nothing runs remotely (the caller should stop waiting instead)."""
        if not self._running:
            return None
        task = LoopTask(self.interrupt())
        self._interrupts.add(task)
        task.add_done_callback(self._interrupts.discard)
        return "cloudgpu: interrupting the remote code (interrupt again to stop waiting)"

    # --- what the Python API does with a session -------------------------------------------

    async def push(self, emit: Emit, values: Mapping[str, Any]) -> None:
        """Pickle ``values`` now; they travel with the next cell, in its round trip.

        Raises:
            SerializationError: a value cannot be pickled.
        """
        self.remote  # noqa: B018 - a closed session says so now, not at the next cell
        self._staged.update({name: dumps(value, name) for name, value in values.items()})

    async def run(self, emit: Emit, code: str, *, timeout: float | None = None) -> None:
        """Run ``code`` remotely with what was pushed; its output shows as it happens."""
        await self._cell(emit, code, [], timeout)

    async def pull(self, emit: Emit, names: Sequence[str]) -> list[Any]:
        """The values of ``names`` in the remote kernel, in order.

        Raises:
            RemoteExecutionError: a name is not defined there (``NameError``).
            SerializationError: a value cannot be pickled there, or loaded here.
        """
        result = await self._cell(emit, "", list(names), None)
        for name in names:
            if name in result.pull_errors:
                raise SerializationError(f"`{name}` cannot come back: "
                                         f"{result.pull_errors[name]}.")
            if name not in result.pulled:
                raise RemoteExecutionError(
                    "NameError", f"name {name!r} is not defined in the remote kernel", [],
                    host=self.remote.grant.host_url)
        return [loads(result.pulled[n].codec, result.pulled[n].frames, n) for n in names]

    async def call(self, emit: Emit, fn: Callable[..., Any], args: Sequence[Any],
                   kwargs: Mapping[str, Any], *, timeout: float | None = None) -> Any:
        """``fn(*args, **kwargs)`` in the remote kernel (all cloudpickled); its value.

        Raises:
            RemoteExecutionError: it raised; the remote traceback and type name come along.
            SerializationError: the function, an argument or the result cannot move.
        """
        name = getattr(fn, "__qualname__", None) or repr(fn)
        frames = {_FN: dumps(fn, name), _ARGS: _dump_arguments(name, args, kwargs)}
        self._staged.update(frames)
        try:
            result = await self._cell(emit, _CALL, [_RESULT], timeout)
        except SerializationError as e:
            raise SerializationError(_readable(str(e), name)) from None
        if _RESULT not in result.pulled:
            why = result.pull_errors.get(_RESULT, "it did not arrive")
            raise SerializationError(f"The result of {name}() cannot come back: {why}.")
        value = result.pulled[_RESULT]
        return loads(value.codec, value.frames, f"the result of {name}()")

    async def switch(self, emit: Emit, spec: HardwareSpec, *, forward: Forward | None = None,
                     prepare: Callable[[RemoteSession], Coroutine[Any, Any, None]] | None = None,
                     announce: bool = True) -> MoveReport:
        """Move the session to ``spec`` with every variable that can move; returns what
        moved and what stayed behind. If anything fails, nothing changed (see
        ``Client.switch``).

        ``prepare(new)`` runs before the new session takes over; with ``announce`` the
        status line says where it goes and where it went.
        """
        # A keyed session may be gone (the client then has nothing to carry); one's own not.
        old = self._session if self.key is not None else self.remote
        if self._staged:  # pushed for this session: they move with the rest
            await self._cell(emit, "", [], None)
        if announce:
            self.status(emit, f"switching to {spec.display} ...")
        started = time.perf_counter()
        new, report = await self.client.switch(
            self.key if self.key is not None else self.remote, spec,
            on_status=lambda text: self.status(emit, text), say=lambda text: emit("say", text),
            forward=forward, prepare=prepare, options=self.options)
        self._session, self.spec = new, spec
        if announce:
            released = f"; released {old.grant.display}" if old is not None else ""
            self.status(emit, f"now on {new.grant.display} (ready in "
                              f"{time.perf_counter() - started:.1f} s){released}. "
                              f"{' '.join(report.summary())}")
            if report.failed:
                emit("say", report.failures() + "\n")
        return report

    async def _cell(self, emit: Emit, code: str, pull: list[str],
                    timeout: float | None) -> CellResult:
        """A cell with what was pushed; the provider's new warnings are shown once."""
        push, self._staged = self._staged, {}
        result = await self.run_cell(emit, code, push, pull, timeout=timeout)
        for text in self.unsaid(result.warnings):
            emit("notice", {"text": f"⚠ {text}"})
        return result


async def _drop(task: asyncio.Future[Any]) -> None:
    """Cancel a side request whose answer no longer matters, and let it finish."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, CloudGPUError):
        await task


def _stopped_unreached(error: CloudGPUError, session: RemoteSession) -> bool:
    """Whether the cell cannot have run: nothing of it left this process (the connection
    was down all along), or the host shut its kernel down (not: it died, or could not be
    reached) before anything of the cell came back.

    The host drops what reaches a kernel it is shutting down, so such a cell never ran. A
    kernel that dies by itself can take the cell's first messages with it.
    """
    if not session.last_cell_left:
        return True
    return isinstance(error, RemoteKernelDiedError) and error.shut_down and \
        not session.last_cell_reached


def _note_remote_traceback(error: RemoteExecutionError) -> None:
    """Put the remote traceback under the local one wherever it is printed (Python's own
    traceback and IPython's show an exception's notes); colours only where they render."""
    text = "\n".join(error.traceback) or f"{error.ename}: {error.evalue}"
    if not (in_ipython() or sys.stderr.isatty()):
        text = _ANSI.sub("", text)
    note = f"Remote traceback (on {error.host or 'the remote host'}):\n{text}"
    if sys.version_info >= (3, 11):
        error.add_note(note)
    else:  # no notes before 3.11: the message carries it
        error.args = (f"{error.args[0] if error.args else error.ename}\n\n{note}",)


def _dump_arguments(name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Serialized:
    """The arguments as one value; when they cannot be pickled, the error names the one."""
    try:
        return dumps((tuple(args), dict(kwargs)), f"the arguments of {name}()")
    except SerializationError:
        for i, arg in enumerate(args):
            dumps(arg, f"argument {i} of {name}()")
        for key, arg in kwargs.items():
            dumps(arg, f"argument {key}= of {name}()")
        raise


def _readable(message: str, name: str) -> str:
    """A function call's push error in the user's terms, with a hint for missing modules."""
    text = message.replace(_FN, f"the function {name}").replace(_ARGS, f"the arguments of "
                                                                      f"{name}()")
    if "No module named" in text:
        text += ("\nA function or class from an importable module travels by reference: "
                 "install that module remotely too, or send it by value with "
                 "`cloudpickle.register_pickle_by_value(module)`.")
    return text
