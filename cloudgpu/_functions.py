"""Remote functions: ``@cloudgpu.function(gpu="H100")`` runs a Python function in a remote
kernel and brings its value back.

::

    @cloudgpu.function(gpu="A100-80GB|H100", timeout=600)
    def train(cfg):
        ...
        return metrics

    metrics = train(cfg)                        # blocks; a remote exception re-raises here
    futures = [train.spawn(c) for c in cfgs]   # concurrent.futures-style futures
    results = train.map(cfgs)                   # many at once, results in order
    metrics = await train.aio(cfg)              # from asyncio code

**Sessions.** Every call gets a session of its own: a fresh remote kernel, released
(its hardware freed) as soon as the call returns, fails or is cancelled. Calls made
together (``.map``, several ``.spawn``) ask the pool at once and it queues them fairly,
first come first served per GPU type, so eight calls on two GPUs run two at a time and the
pool's ledger shows eight sessions. To run many calls in one kernel (to keep a model
loaded, say) use ``cloudgpu.session(...).call(fn, ...)`` instead.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Generic, ParamSpec, TypeVar, overload

from ._bridge import Emit, LoopTask, run_awaiting, run_blocking
from ._core import SessionCore, resolve_spec
from ._format import money
from ._output import Renderer
from .client import get_client

__all__ = ["RemoteFunction", "RemoteFuture", "function"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class RemoteFuture(LoopTask[T]):
    """One remote call running in the background: a ``concurrent.futures.Future``.

    ``result()`` waits for its value (or raises its error); ``cancel()`` stops it at any
    point, even while it runs, releasing its hardware. It works with
    ``concurrent.futures.wait`` and ``as_completed``. Its output shows as it arrives.
    """


class RemoteFunction(Generic[P, R]):
    """A function that runs in a remote kernel; made by :func:`function`.

    Calling it blocks until the remote call returns. The function, its arguments and
    its value are cloudpickled: closures over classes and functions defined in a
    notebook or in ``__main__`` travel by value; what comes from an installed module
    travels by name, so that module must be installed remotely too.
    """

    def __init__(self, fn: Callable[P, R], *, gpu: str = "cpu", timeout: float | None = None,
                 max_cost: float | None = None, quiet: bool = False) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.gpu = gpu
        self.timeout = timeout
        self.max_cost = max_cost
        self.quiet = quiet

    @property
    def name(self) -> str:
        """The function's name, as progress lines say it."""
        return getattr(self.fn, "__name__", None) or repr(self.fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function remotely and return its value.

        Waits in line while the hardware is busy, saying so. Ctrl-C stops the remote
        call, frees its hardware and raises KeyboardInterrupt.

        Raises:
            RemoteExecutionError: the function raised remotely; ``ename`` is the remote
                exception's type name, ``traceback`` the remote traceback.
            RemoteTimeoutError: it ran past ``timeout`` seconds and was stopped.
            BudgetExceededError: the pool stopped it at its ``max_cost`` or your daily limit.
            SerializationError: the function, an argument or the value cannot move.
        """
        return run_blocking(lambda emit: self._call(emit, args, kwargs), Renderer(self.quiet))

    def spawn(self, *args: P.args, **kwargs: P.kwargs) -> RemoteFuture[R]:
        """Start the call and return at once with its future (see :class:`RemoteFuture`)."""
        return RemoteFuture(self._call(Renderer(self.quiet), args, kwargs))

    def map(self, *iterables: Iterable[Any]) -> list[R]:
        """Call the function on each item (several iterables: zipped, like ``map``), all at
        once, each in its own session; the pool queues what it cannot run yet.

        Returns:
            The values, in the order of the inputs.

        Raises:
            The first error of any call (the others are stopped and their hardware freed).
        """
        calls = list(zip(*iterables, strict=False))
        return run_blocking(lambda emit: self._map(emit, calls), Renderer(self.quiet))

    async def aio(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """The call for asyncio code: ``await train.aio(cfg)``; cancelling it stops it."""
        return await run_awaiting(lambda emit: self._call(emit, args, kwargs),
                                  Renderer(self.quiet))

    def __repr__(self) -> str:
        return f"<cloudgpu.function {self.name} gpu={self.gpu!r}>"

    async def _call(self, emit: Emit, args: Sequence[Any], kwargs: Mapping[str, Any],
                    label: str | None = None) -> R:
        """One call in a session of its own, released whatever happens."""
        client = get_client()
        core = SessionCore(client, await resolve_spec(client, self.gpu),
                           options={"max_cost": self.max_cost}, label=label or self.name)
        try:
            await core.open(emit)
            started = time.perf_counter()
            value: R = await core.call(emit, self.fn, args, kwargs, timeout=self.timeout)
            info = core.info()
            core.status(emit, f"done on {info.hardware} in {time.perf_counter() - started:.2f} s"
                              f" · {money(info.cost)}")
            return value
        finally:
            await asyncio.shield(core.close())

    async def _map(self, emit: Emit, calls: list[tuple[Any, ...]]) -> list[R]:
        tasks = [asyncio.ensure_future(self._call(emit, args, {}, f"{self.name}[{i}]"))
                 for i, args in enumerate(calls)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)  # each releases its hardware on the way out
            raise


@overload
def function(fn: Callable[P, R], /) -> RemoteFunction[P, R]: ...


@overload
def function(*, gpu: str = "cpu", timeout: float | None = None, max_cost: float | None = None,
             quiet: bool = False) -> Callable[[Callable[P, R]], RemoteFunction[P, R]]: ...


def function(fn: Callable[P, R] | None = None, /, *, gpu: str = "cpu",
             timeout: float | None = None, max_cost: float | None = None,
             quiet: bool = False) -> Any:
    """Make a function run in a remote kernel: ``@cloudgpu.function(gpu="H100")``.

    The result is a :class:`RemoteFunction`: call it to run remotely (blocking), or use
    ``.spawn`` (a future), ``.map`` (many calls at once) or ``.aio`` (awaitable). Each
    call runs in a session of its own, released when it returns.

    Args:
        fn: the function (when used as ``@cloudgpu.function`` without arguments).
        gpu: the hardware, as ``%%remote`` takes it (``H100``, ``A100-80GB|H100``,
            ``any``, ``cpu``, the default).
        timeout: seconds a call may run once its hardware is granted (waiting in line does
            not count); then it is interrupted, its session stopped, and
            RemoteTimeoutError raised.
        max_cost: dollars after which the pool stops a call (BudgetExceededError).
        quiet: show only what the function prints and displays, not cloudgpu's lines.
    """
    def wrap(f: Callable[P, R]) -> RemoteFunction[P, R]:
        return RemoteFunction(f, gpu=gpu, timeout=timeout, max_cost=max_cost, quiet=quiet)

    return wrap(fn) if fn is not None else wrap
