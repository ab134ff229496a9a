"""The Python API: remote sessions, and what the pool offers and charges, as plain calls.

Everything the ``%%remote`` magic does is a call here, usable from a script, a test, a CI
job or another library, with or without IPython::

    import cloudgpu

    with cloudgpu.session("H100", max_cost=5.0) as s:   # waits in line, saying so
        s.push(x=x, model=model)
        s.run("y = model(x)")                            # output streams here as it happens
        y = s.pull("y")
        print(s.hardware, s.cost)

``async with cloudgpu.asession(...)`` is the same session for asyncio code. Remote
functions (``@cloudgpu.function``) are in ``cloudgpu._functions``.

Both forms are facades over one async core (``cloudgpu._core.SessionCore``) on the
process's background loop. A blocking call shows the remote output in the calling
thread: under the running cell in IPython, on ``sys.stdout``/``sys.stderr`` elsewhere.
Ctrl-C in a blocking call interrupts the remote code and raises KeyboardInterrupt; the
session stays usable.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, ParamSpec, TypedDict, TypeVar, cast

from ._bridge import Emit, run_awaiting, run_blocking
from ._core import SessionCore, SessionInfo, resolve_spec
from ._output import Renderer
from .client import get_client
from .errors import CloudGPUError, RemoteExecutionError

__all__ = [
    "AsyncSession",
    "CostReport",
    "HardwareOffer",
    "Session",
    "SessionCost",
    "asession",
    "cost",
    "hardware",
    "session",
    "sessions",
    "shutdown",
]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

#: What a user can do once the pool stopped a session of theirs.
_THEN = "Open a new session to go on (values you pulled are still here)."


# --- what the pool offers and charges -------------------------------------------------------


class HardwareOffer(TypedDict):
    """One hardware type the pool offers (``cloudgpu.hardware()``)."""

    type: str
    aliases: list[str]
    memory_gb: float
    price_per_hour: float
    #: GPUs of this type in the pool and free now; None for ``cpu`` (always available).
    total: int | None
    free: int | None
    #: Requests waiting for this type.
    queued: int
    simulated: bool
    available: bool


class SessionCost(TypedDict):
    """One of today's sessions in a :class:`CostReport`."""

    id: str
    hardware: str
    gpu_type: str | None
    count: int | None
    state: str
    notebook: str | None
    cost: float
    simulated: bool
    ended: float | None  # epoch seconds, None while it is active
    stop_reason: str | None


class CostReport(TypedDict):
    """Today's spending (``cloudgpu.cost()``), in dollars."""

    user: str
    today: float
    daily_limit: float | None
    by_notebook: dict[str, float]
    sessions: list[SessionCost]


def hardware() -> list[HardwareOffer]:
    """The hardware the pool offers now: prices, free/total GPUs, queue lengths.

    The pool is the configured one (``CLOUDGPU_POOL``), else this user's local pool,
    started on first use, as for ``%%remote``.
    """
    return cast(list[HardwareOffer],
                run_blocking(lambda emit: get_client().hardware(), Renderer()))


def cost() -> CostReport:
    """Today's spending at the pool: the total, the daily limit, per notebook, per session."""
    return cast(CostReport, run_blocking(lambda emit: get_client().cost(), Renderer()))


def sessions() -> list[dict[str, Any]]:
    """Your active sessions at the pool (this process's and any other's), as its REST API
    shows them: ``id``, ``hardware``, ``state``, ``cost``, ``idle_since``, ``notebook``, ..."""
    return run_blocking(lambda emit: get_client().user_sessions(), Renderer())


def shutdown(gpu: str | None = None) -> list[str]:
    """Stop this process's sessions and free their hardware; returns what was stopped.

    Args:
        gpu: only the ``%%remote`` session for this hardware; None: every session of this
            process (``%%remote``'s, and those opened here and not yet closed).
    """
    async def stop(emit: Emit) -> list[str]:
        client = get_client()
        return await client.shutdown(None if gpu is None else await resolve_spec(client, gpu))

    return run_blocking(stop, Renderer())


# --- sessions ------------------------------------------------------------------------------


async def _open(emit: Emit, gpu: str, options: dict[str, Any]) -> SessionCore:
    client = get_client()
    core = SessionCore(client, await resolve_spec(client, gpu), options=options, then=_THEN)
    await core.open(emit)
    return core


async def _switch(core: SessionCore, emit: Emit, gpu: str) -> dict[str, str]:
    report = await core.switch(emit, await resolve_spec(core.client, gpu))
    return dict(report.failed)


def _one_or_many(values: list[Any]) -> Any:
    return values[0] if len(values) == 1 else tuple(values)


class _SessionBase:
    """What both forms of a session read without a round trip."""

    def __init__(self, core: SessionCore, quiet: bool) -> None:
        self._core = core
        self._quiet = quiet

    @property
    def hardware(self) -> str:
        """What runs the session, as you would say it: ``1x H100 (simulated)``, ``CPU``."""
        return self._core.info().hardware

    @property
    def cost(self) -> float:
        """Dollars the session has cost so far (computed here, at the pool's rate)."""
        return self._core.info().cost

    @property
    def closed(self) -> bool:
        """Whether the session was closed (its hardware released)."""
        return self._core.closed

    @property
    def info(self) -> SessionInfo:
        """Where the session runs (host, kernel, pool session id), its uptime and cost."""
        return self._core.info()

    def __repr__(self) -> str:
        try:
            info = self._core.info()
        except CloudGPUError as e:  # a repr must not fail; say why instead
            return f"<{type(self).__name__} {self._core.spec.display}: {e}>"
        return (f"<{type(self).__name__} {info.hardware}, kernel {info.kernel_id}, "
                f"${info.cost:.4f} so far>")


class Session(_SessionBase):
    """A remote session of your own: one kernel on the hardware you asked for.

    Made by :func:`session`; the remote kernel keeps its state from call to call (imports,
    variables). Use it as a context manager, or :meth:`close` it; whatever is still open
    when the process exits is released then.
    """

    def push(self, **values: Any) -> None:
        """Send values to the remote kernel under these names: ``s.push(x=x, model=model)``.

        They are pickled now (cloudpickle: functions and classes defined here travel too,
        numpy arrays without a copy), so an unpicklable value raises here, and travel with
        the next :meth:`run`, :meth:`pull` or :meth:`call`, in its single round trip.

        Raises:
            SerializationError: a value cannot be pickled.
        """
        self._wait(lambda emit: self._core.push(emit, values))

    def run(self, code: str, *, timeout: float | None = None) -> None:
        """Run ``code`` in the remote kernel; its output shows here as it happens.

        Args:
            code: Python (IPython syntax) to run there.
            timeout: seconds it may run; then it is interrupted and RemoteTimeoutError
                raised (None: no limit).

        Raises:
            RemoteExecutionError: the code raised; ``ename`` is the remote type's name,
                ``traceback`` the remote traceback.
            SerializationError: pushed values could not be loaded remotely (nothing ran).
            RemoteTimeoutError: it ran past ``timeout``.
            BudgetExceededError: the pool stopped the session: its max_cost or your daily
                budget is spent.
            RemoteKernelDiedError: the remote kernel died, or the pool stopped it otherwise.
        """
        self._wait(lambda emit: self._core.run(emit, code, timeout=timeout))

    def pull(self, *names: str) -> Any:
        """Bring values back: ``y = s.pull("y")``; several names give a tuple.

        Raises:
            RemoteExecutionError: a name is not defined remotely (``ename`` ``NameError``).
            SerializationError: a value cannot be pickled there, or loaded here.
        """
        return _one_or_many(self._wait(lambda emit: self._core.pull(emit, names)))

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """``fn(*args, **kwargs)`` in this session's kernel; its return value.

        ``fn``, its arguments and its result are cloudpickled: closures and classes
        defined in your notebook or script travel by value. Functions from installed
        modules travel by reference (the module must be installed remotely too).

        Raises:
            RemoteExecutionError: it raised remotely.
            SerializationError: the function, an argument or the result cannot move.
        """
        return cast(R, self._wait(lambda emit: self._core.call(emit, fn, args, kwargs)))

    def switch(self, gpu: str) -> dict[str, str]:
        """Move the session to other hardware, with every variable that can move.

        The new hardware is acquired (waiting in line if it is busy), the variables are
        copied over and the old session is released; if anything fails, nothing changed.

        Returns:
            The variables that stayed behind, and why (open files, sockets, generators).
        """
        return self._wait(lambda emit: _switch(self._core, emit, gpu))

    def close(self) -> None:
        """Stop the remote kernel and free its hardware. Closing twice is harmless."""
        self._wait(lambda emit: self._core.close())

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _wait(self, start: Callable[[Emit], Coroutine[Any, Any, T]]) -> T:
        """Block on a core call; Ctrl-C interrupts the remote code, then raises."""
        interrupted: list[bool] = []

        def on_interrupt() -> str | None:
            message = self._core.interrupt_soon()
            if message is not None:
                interrupted.append(True)
            return message

        try:
            value = run_blocking(start, Renderer(self._quiet), on_interrupt)
        except RemoteExecutionError as e:
            if interrupted and e.ename == "KeyboardInterrupt":
                raise KeyboardInterrupt("the remote code was interrupted") from None
            raise
        if interrupted:  # it finished before the interrupt reached it; Ctrl-C still means stop
            raise KeyboardInterrupt("interrupted")
        return value


def session(gpu: str = "cpu", *, max_cost: float | None = None,
            idle_timeout: float | None = None, name: str | None = None,
            quiet: bool = False) -> Session:
    """Open a remote session: a kernel of your own on ``gpu``, until you close it.

    Blocks until the pool grants the hardware; while it is busy a live line says where
    you are in line (``waiting for H100: 2 ahead of you``). Ctrl-C gives up your place.

    Args:
        gpu: the hardware, as ``%%remote`` takes it: ``H100``, ``H100:2``, ``A100-80GB``,
            fallbacks ``H100|A100-80GB`` (tried in order), ``any`` (the cheapest free
            GPU), ``cpu`` (the default).
        max_cost: dollars after which the pool stops the session (a warning shows at 80%;
            then calls raise BudgetExceededError).
        idle_timeout: seconds without remote work before the pool stops the session
            (default: the pool's, 15 minutes).
        name: what the pool files the session's cost under (default: the notebook's name).
        quiet: show only what the remote code prints and displays, not cloudgpu's lines.

    Raises:
        UnknownHardwareError: ``gpu`` names hardware the pool does not know.
        HardwareUnavailableError: the pool can never give that hardware.
        BudgetExceededError: your daily budget is spent.
    """
    options = {"max_cost": max_cost, "idle_timeout": idle_timeout, "notebook": name}
    core = run_blocking(lambda emit: _open(emit, gpu, options), Renderer(quiet))
    return Session(core, quiet)


class AsyncSession(_SessionBase):
    """The asyncio form of :class:`Session`: the same session, methods to ``await``.

    Made by ``await asession(...)`` or ``async with asession(...) as s``. Cancelling an
    awaited call interrupts the remote code.
    """

    async def push(self, **values: Any) -> None:
        """See :meth:`Session.push`."""
        await self._wait(lambda emit: self._core.push(emit, values))

    async def run(self, code: str, *, timeout: float | None = None) -> None:
        """See :meth:`Session.run`."""
        await self._wait(lambda emit: self._core.run(emit, code, timeout=timeout))

    async def pull(self, *names: str) -> Any:
        """See :meth:`Session.pull`."""
        return _one_or_many(await self._wait(lambda emit: self._core.pull(emit, names)))

    async def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """See :meth:`Session.call`."""
        return cast(R, await self._wait(lambda emit: self._core.call(emit, fn, args, kwargs)))

    async def switch(self, gpu: str) -> dict[str, str]:
        """See :meth:`Session.switch`."""
        return await self._wait(lambda emit: _switch(self._core, emit, gpu))

    async def close(self) -> None:
        """See :meth:`Session.close`."""
        await self._wait(lambda emit: self._core.close())

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def _wait(self, start: Callable[[Emit], Coroutine[Any, Any, T]]) -> T:
        return await run_awaiting(start, Renderer(self._quiet))


class _OpeningSession:
    """What :func:`asession` returns: ``await`` it, or ``async with`` it."""

    def __init__(self, gpu: str, options: dict[str, Any], quiet: bool) -> None:
        self._args = (gpu, options)
        self._quiet = quiet
        self._session: AsyncSession | None = None

    async def _open(self) -> AsyncSession:
        gpu, options = self._args
        core = await run_awaiting(lambda emit: _open(emit, gpu, options), Renderer(self._quiet))
        return AsyncSession(core, self._quiet)

    def __await__(self) -> Generator[Any, None, AsyncSession]:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncSession:
        self._session = await self._open()
        return self._session

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()


def asession(gpu: str = "cpu", *, max_cost: float | None = None,
             idle_timeout: float | None = None, name: str | None = None,
             quiet: bool = False) -> _OpeningSession:
    """The asyncio form of :func:`session`: ``async with cloudgpu.asession("H100") as s:``
    (closed at the end of the block), or ``s = await cloudgpu.asession("H100")``.

    Takes the same arguments as :func:`session`. Cancelling the wait gives up the place
    in line.
    """
    options = {"max_cost": max_cost, "idle_timeout": idle_timeout, "notebook": name}
    return _OpeningSession(gpu, options, quiet)
