"""Waiting on the async core from a thread (the sync API, the magics) or another event loop
(the async API).

The core runs on the process's background loop (``cloudgpu._loop``), where the client and
its connections live. :func:`run_blocking` is the sync facade's one way to wait for it,
:func:`run_awaiting` the async facade's, and :class:`LoopTask` is a core coroutine as a
``concurrent.futures.Future``. Either way the caller gets the core's events (outputs,
progress, status lines) in its own thread, so what it shows belongs to the running cell.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ._loop import get_loop
from .errors import CloudGPUError

__all__ = ["CANCEL_GRACE", "Emit", "LoopTask", "run_awaiting", "run_blocking"]

T = TypeVar("T")

#: Receives what a call of the core shows while it runs: ``(kind, payload)``, see
#: ``cloudgpu._output.Renderer``. The core may call it from its loop's thread.
Emit = Callable[[str, Any], None]

CANCEL_GRACE = 10.0
"""Seconds a cancelled call gets to withdraw from a queue or release its hardware before the
caller stops waiting for it."""


class LoopTask(concurrent.futures.Future[T]):
    """A coroutine of the core running on the background loop, as a concurrent future.

    ``cancel()`` cancels the coroutine whether or not it started, so it withdraws from a
    queue, interrupts what runs remotely or releases its hardware; :attr:`ended`
    resolves once it is over, clean-up included. The coroutine runs in a copy of the
    caller's context (contextvars), as ``asyncio.run_coroutine_threadsafe`` would.
    """

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        super().__init__()
        #: Resolves once the coroutine is over (finished, failed or cancelled and cleaned up).
        self.ended: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._loop = get_loop()
        self._task: asyncio.Task[T] | None = None
        self._loop.call_soon_threadsafe(self._start, coro)

    def _start(self, coro: Coroutine[Any, Any, T]) -> None:
        if self.cancelled():
            coro.close()
            self.ended.set_result(None)
            return
        self._task = self._loop.create_task(coro)
        self._task.add_done_callback(self._finish)

    def _finish(self, task: asyncio.Task[T]) -> None:
        try:
            if task.cancelled():
                super().cancel()
            elif task.exception() is not None:
                self.set_exception(task.exception())
            else:
                self.set_result(task.result())
        except concurrent.futures.InvalidStateError:
            pass  # cancelled by its owner meanwhile, who no longer wants the outcome
        finally:
            self.ended.set_result(None)

    def cancel(self) -> bool:
        """Cancel the call: it stops waiting, interrupts or releases what it holds."""
        if not super().cancel():
            return False
        self._loop.call_soon_threadsafe(self._cancel_task)
        return True

    def _cancel_task(self) -> None:
        if self._task is not None:
            self._task.cancel()


_DONE = ("done", None)


def run_blocking(start: Callable[[Emit], Coroutine[Any, Any, T]], render: Emit,
                 on_interrupt: Callable[[], str | None] | None = None) -> T:
    """Run ``start(emit)`` on the background loop; show its events from this thread.

    Ctrl-C calls ``on_interrupt``; when it returns a message (it interrupted the remote
    code), the message is shown and the wait goes on, for the interrupted code to end.
    Otherwise, or on a second Ctrl-C, the call is cancelled (given ``CANCEL_GRACE``
    seconds to clean up) and KeyboardInterrupt propagates.

    A cloudgpu error is raised with this thread's traceback only: the core's frames on
    the loop are no help to the user.
    """
    events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    task = LoopTask(start(lambda kind, payload: events.put((kind, payload))))
    # Wakes the wait below once the call is over, clean-up included: what a cancelled
    # call says on its way out (gave up waiting, released) is still shown.
    task.ended.add_done_callback(lambda _: events.put(_DONE))
    interrupted = False
    deadline: float | None = None  # once cancelled: how long its clean-up is waited for
    while True:
        try:
            try:
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                event = events.get(timeout=left)
            except queue.Empty:
                break
            if event is _DONE:
                break
            render(*event)
        except KeyboardInterrupt:
            if deadline is not None:
                break  # Ctrl-C again while it cleans up: stop waiting for that too
            message = None if interrupted or on_interrupt is None else on_interrupt()
            if message is None:
                task.cancel()
                deadline = time.monotonic() + CANCEL_GRACE
                continue
            interrupted = True
            print(message, file=sys.stderr, flush=True)
        except BaseException:  # showing an event failed: the call must not go on unwatched
            task.cancel()
            raise
    if deadline is not None:
        raise KeyboardInterrupt
    try:
        return task.result()
    except CloudGPUError as e:
        raise e.with_traceback(None) from e.__cause__


async def run_awaiting(start: Callable[[Emit], Coroutine[Any, Any, T]], render: Emit) -> T:
    """Await ``start(emit)`` from any event loop; its events are shown on this loop.

    Cancelling the awaiting task cancels the call (which interrupts or releases what it
    holds), and waits up to ``CANCEL_GRACE`` seconds for it to clean up.
    """
    loop = asyncio.get_running_loop()
    if loop is get_loop():  # already where the core runs
        return await start(render)

    def emit(kind: str, payload: Any) -> None:
        loop.call_soon_threadsafe(render, kind, payload)

    task = LoopTask(start(emit))
    try:
        return await asyncio.wrap_future(task)
    except asyncio.CancelledError:
        task.cancel()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(task.ended)), CANCEL_GRACE)
        raise
    except CloudGPUError as e:
        raise e.with_traceback(None) from e.__cause__
