"""Pre-started kernels, so a new session's first cell does not wait for a kernel to boot.

The pool keeps ``targets[type]`` kernels of each hardware type ready (one GPU each, or
one CPU kernel). A warm GPU kernel still counts as free to the scheduler: a request that
needs its GPU gets the warm kernel itself when it fits (one GPU of that type on that
host), and otherwise warm kernels on that host are stopped to make room. Warm kernels
are not billed to anyone, and are not made while requests wait for their type.

Each warm kernel is started with the scoped token its future session will use, so
granting one costs no request to its host (a round trip, when the host is far away).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from cloudgpu.errors import CloudGPUError
from cloudgpu.hardware import CPU, Choice

from .backend import Backend, Placement
from .scheduler import Scheduler

__all__ = ["WarmKernels"]


class WarmKernels:
    """The warm kernels of one pool."""

    def __init__(self, backend: Backend, scheduler: Scheduler, targets: dict[str, int],
                 log: logging.Logger,
                 stop: Callable[[Placement], Awaitable[object]] | None = None) -> None:
        self.backend = backend
        self.scheduler = scheduler
        self.targets = {t: n for t, n in targets.items() if n > 0}
        self.log = log
        #: How a warm kernel is stopped: the pool's way, which stops one whose host cannot
        #: be reached once it answers again.
        self.stop = stop or backend.stop
        self.ready: dict[tuple[str, str], list[tuple[Placement, str]]] = {}
        self._starting: dict[tuple[str, str], int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def count(self, slot_id: str, gpu_type: str) -> int:
        """Warm kernels (ready or starting) of a type on a slot."""
        key = (slot_id, gpu_type)
        return len(self.ready.get(key, [])) + self._starting.get(key, 0)

    def take(self, slot_id: str, choice: Choice) -> tuple[Placement, str] | None:
        """A ready warm kernel that is exactly ``choice`` on ``slot_id``, with the scoped token
        that already opens it; removed from the pool."""
        if choice.count != 1:
            return None
        ready = self.ready.get((slot_id, choice.type))
        return ready.pop(0) if ready else None

    def ready_slot(self, gpu_type: str) -> str | None:
        """A slot (whose host is up) with a ready warm kernel of ``gpu_type``, if any."""
        for (slot_id, kind), ready in self.ready.items():
            slot = self.scheduler.slots.get(slot_id)
            if kind == gpu_type and ready and slot is not None and not slot.down:
                return slot_id
        return None

    def forget_slot(self, slot_id: str) -> list[Placement]:
        """Drop the warm kernels of a slot whose host was lost; they are returned, for the
        pool to stop should the host answer again (it may only have been cut off)."""
        forgotten = []
        for key in [k for k in self.ready if k[0] == slot_id]:
            forgotten += [placement for placement, _ in self.ready.pop(key)]
        return forgotten

    async def make_room(self, slot_id: str, gpu_type: str) -> None:
        """Stop warm kernels on a slot whose GPUs a granted request now needs."""
        slot = self.scheduler.slots.get(slot_id)
        if gpu_type == CPU or slot is None:
            return
        ready = self.ready.get((slot_id, gpu_type), [])
        excess = slot.used.get(gpu_type, 0) + len(ready) - slot.total.get(gpu_type, 0)
        while excess > 0 and ready:
            await self.stop(ready.pop()[0])
            excess -= 1

    def refill(self) -> None:
        """Start warm kernels where some are missing and the hardware is idle."""
        for gpu_type, target in self.targets.items():
            if self.scheduler.queue_length(gpu_type):
                continue
            for slot in [s for s in self.scheduler.slots.values() if not s.down]:
                if gpu_type != CPU and not slot.total.get(gpu_type):
                    continue
                while self.count(slot.id, gpu_type) < target and (
                    gpu_type == CPU or slot.free(gpu_type) > self.count(slot.id, gpu_type)
                ):
                    self._start(slot.id, gpu_type)
                if gpu_type == CPU:
                    break  # CPU kernels: `target` in all, on the first host

    def _start(self, slot_id: str, gpu_type: str) -> None:
        key = (slot_id, gpu_type)
        self._starting[key] = self._starting.get(key, 0) + 1
        task = asyncio.ensure_future(self._launch(slot_id, gpu_type))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _launch(self, slot_id: str, gpu_type: str) -> None:
        key = (slot_id, gpu_type)
        token = secrets.token_urlsafe(32)
        try:
            placement = await self.backend.launch(slot_id, Choice(gpu_type, 1), token)
        except CloudGPUError as e:
            self.log.warning("Could not start a warm %s kernel: %s", gpu_type, e)
            return
        finally:
            self._starting[key] -= 1
        self.ready.setdefault(key, []).append((placement, token))

    async def close(self) -> None:
        """Stop every warm kernel."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for ready in self.ready.values():
            while ready:
                await self.stop(ready.pop()[0])
