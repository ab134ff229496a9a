"""The pool's core: sessions from request to release, metering, budgets and idle culling.

All state changes go through here, are written to the ledger before anyone is told,
and wake whoever waits on that session (``wait``), so clients see queue positions and
stops as they happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import logging
import math
import secrets
import time
from collections.abc import Callable
from typing import Any

from cloudgpu._format import duration
from cloudgpu.environment import check_requirements
from cloudgpu.errors import (
    BudgetExceededError,
    CloudGPUError,
    HardwareUnavailableError,
    HostConnectionError,
    InvalidRequestError,
    SessionNotFoundError,
    UnisolatedHostError,
)
from cloudgpu.hardware import CPU, Catalog, Choice, parse_spec

from .backend import Backend, Placement, progress_to
from .health import HostWatch, kernel_end
from .ledger import Ledger, SessionRecord
from .scheduler import Scheduler, Slot
from .warm import WarmKernels

__all__ = ["Pool"]

WARN_AT = 0.8


def start_of_day(now: float) -> float:
    """Local midnight before ``now``: budgets are per calendar day where the pool runs."""
    day = dt.datetime.fromtimestamp(now).replace(hour=0, minute=0, second=0, microsecond=0)
    return day.timestamp()


@dataclasses.dataclass
class _Away:
    """A running session with no client connected, as the cull last saw it."""

    since: float  # when a cull first found no client connected
    cell_running: bool = False
    stop_at: float | None = None  # when it is stopped unless one connects again
    said_kept: bool = False  # the log said it stays for its running cell


class Pool:
    """Sessions on a backend's hardware, metered into a ledger.

    Args:
        backend: where kernels run.
        ledger: where sessions are recorded.
        catalog: hardware types and prices.
        idle_timeout: seconds of inactivity before a session is stopped (0: never).
        daily_limit: dollars per user per day (0: no limit); ``user_limits`` overrides per user.
        meter_interval: how often costs and budgets are checked, seconds.
        cull_interval: how often kernels are probed for idleness, seconds.
        disconnected_timeout: seconds a running session may have no client connected
            before it is stopped (its notebook went away without releasing it; 0: never),
            counted from its last activity: a cell still running keeps it...
        busy_disconnected_timeout: ...for up to this many seconds without a client
            (0: for as long as the cell runs).
        warm: pre-started kernels to keep per hardware type, ``{"cpu": 1}``.
        heartbeat_interval: how often every host is asked whether it is there, seconds.
        heartbeat_misses: missed beats in a row after which a host's sessions are lost.
        shared: more than one person uses this pool's hosts (several users, or hosts
            others started): a host that does not isolate kernels is refused...
        allow_unisolated: ...unless this says its operator accepts that.
        max_hold: the longest a client may hold a warm kernel for a first cell, seconds
            (see :meth:`hold`).
    """

    def __init__(self, backend: Backend, ledger: Ledger, catalog: Catalog, *,
                 idle_timeout: float = 900.0, daily_limit: float = 0.0,
                 user_limits: dict[str, float] | None = None, meter_interval: float = 1.0,
                 cull_interval: float = 30.0, disconnected_timeout: float = 0.0,
                 busy_disconnected_timeout: float = 0.0,
                 warm: dict[str, int] | None = None, log: logging.Logger | None = None,
                 heartbeat_interval: float = 2.0, heartbeat_misses: int = 2,
                 shared: bool = False, allow_unisolated: bool = False,
                 max_hold: float = 300.0) -> None:
        self.backend = backend
        self.ledger = ledger
        self.catalog = catalog
        self.idle_timeout = idle_timeout
        self.daily_limit = daily_limit
        self.user_limits = user_limits or {}
        self.meter_interval = meter_interval
        self.cull_interval = cull_interval
        self.disconnected_timeout = disconnected_timeout
        self.busy_disconnected_timeout = busy_disconnected_timeout
        self.heartbeat_interval = heartbeat_interval
        self.shared = shared
        self.allow_unisolated = allow_unisolated
        self.max_hold = max_hold
        self.health = HostWatch(heartbeat_misses)
        # Heartbeats and culling take turns: a cull between a host's restart and the beat
        # that notices it would blame its sessions' kernels instead of the lost machine.
        self._watching = asyncio.Lock()
        self._away: dict[str, _Away] = {}  # running sessions no client is connected to
        self._idle_since: dict[str, float] = {}
        self.log = log or logging.getLogger("cloudgpu.pool")
        self.scheduler = Scheduler(catalog)
        #: Kernels the pool stopped (an ended session's, a warm one) whose host did not hear
        #: it (it could not be reached, or it was judged lost), by kernel id: stopped once
        #: it answers again.
        self._unstopped: dict[str, Placement] = {}
        self.warm = WarmKernels(backend, self.scheduler, warm or {}, self.log,
                                stop=self._stop_kernel)
        self.sessions: dict[str, SessionRecord] = {}  # active ones; ended ones live in the ledger
        self._versions: dict[str, int] = {}
        self._changed = asyncio.Event()  # replaced by a fresh one at every change
        self._tasks: list[asyncio.Task[Any]] = []
        self._launching: dict[str, asyncio.Task[Any]] = {}
        self._progress: dict[str, list[str]] = {}  # what backends said while launching
        self._background: set[asyncio.Task[Any]] = set()
        self._waiting: list[str] = []  # what the backend was last told waits
        backend.connect(catalog, self)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bring the backend up, reconcile the ledger with it, start metering and culling.

        Raises:
            UnisolatedHostError: the pool is shared and a host does not isolate its kernels.
        """
        for slot in await self.backend.start():
            refused = self._refusal(slot)
            if refused:
                await self.backend.close()
                raise UnisolatedHostError(
                    f"{refused}. Start the host with --isolation=bubblewrap (or podman, "
                    f"docker), or pass --allow-unisolated to accept that.")
            self.scheduler.add_slot(slot)
        await self.reconcile()
        self._tasks = [asyncio.create_task(self._every(self.meter_interval, self.meter)),
                       asyncio.create_task(self._every(self.cull_interval, self.cull)),
                       asyncio.create_task(self._every(self.heartbeat_interval,
                                                       self.heartbeat))]
        self._dispatch()
        self.warm.refill()

    async def close(self, stop_sessions: bool = True) -> None:
        """Stop background work; with ``stop_sessions`` also every running session."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if stop_sessions:
            for rec in list(self.sessions.values()):
                await self.stop(rec.id, "the pool shut down")
        await self.warm.close()
        await self.backend.close()

    async def reconcile(self) -> None:
        """Match the ledger's active sessions with what the hosts really run.

        Queued sessions queue again in their old order; a running session whose kernel is
        still there keeps running (and its GPUs stay taken); one whose kernel ended while
        the pool was down ends when its host says it did; one whose kernel nobody knows of
        any more ends at the last moment it was seen alive. Nothing is billed twice or lost.
        """
        for rec in self.ledger.active():
            if rec.state == "running" and rec.kernel_id:
                if self._unheard(rec.host_id or ""):
                    # Its host did not answer the pool's start: the session stays, and the
                    # heartbeat judges the host (lost after its misses, as any host).
                    self.log.warning("Session %s stays until its host %s answers, or is "
                                     "judged lost", rec.id, rec.host_id)
                    self._keep_running(rec)
                    continue
                model = await self._ask_host(rec)
                end = kernel_end(model)
                if end is not None:
                    rec.ended = end[0]
                    self._finish(rec, "stopped", f"{end[1]} (while the pool was down)")
                    continue
                if model is not None:
                    self._keep_running(rec)
                    continue
                rec.ended = rec.last_seen or rec.started or rec.created
                self._finish(rec, "stopped", "its kernel was lost while the pool was down")
                continue
            # queued, or starting with no kernel recorded: ask for the hardware again.
            rec.state = "queued"
            self.ledger.save(rec)
            self.sessions[rec.id] = rec
            self.scheduler.enqueue(rec.id, parse_spec(rec.hardware, self.catalog))
        # Kernels a crashed pool left behind (warm ones, or ones started for a session
        # it never recorded as running) hold hardware nobody is billed for: stop them.
        swept = await self.backend.sweep(self.kernels())
        if swept:
            self.log.info("Stopped %d kernel(s) no session owns", swept)

    def _keep_running(self, rec: SessionRecord) -> None:
        """A running session from the ledger goes on running (its GPUs stay taken)."""
        self.sessions[rec.id] = rec
        self.scheduler.allocate(rec.host_id or "", rec.gpu_type or CPU, rec.count or 0)
        self._arm_budget(rec)

    async def _every(self, seconds: float, job: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception:  # a failed round must not end metering or culling for good
                self.log.exception("%s failed; retrying in %.1f s", job.__name__, seconds)

    # -- sessions ----------------------------------------------------------------------------

    async def create(self, user: str, hardware: str, *, max_cost: float | None = None,
                     idle_timeout: float | None = None, notebook: str | None = None,
                     environment: list[str] | None = None) -> SessionRecord:
        """Ask for a session; it is queued and granted as soon as the hardware is free.

        ``environment`` (pip requirement strings) has the kernel run in an environment with
        those packages, which the host prepares while the session is ``starting``.

        Raises:
            InvalidRequestError: a budget, timeout or requirement is malformed.
            UnknownHardwareError: the spec is malformed or names unknown hardware.
            HardwareUnavailableError: no host here could ever give it.
            BudgetExceededError: the user's daily budget is spent.
        """
        spec = parse_spec(hardware, self.catalog)
        self.scheduler.check_feasible(spec)
        self._check_budget(user)
        _check_limits(max_cost, idle_timeout)
        requirements = check_requirements(environment)
        rec = SessionRecord(
            id=secrets.token_hex(8), user=user, hardware=str(spec), state="queued",
            created=time.time(), max_cost=max_cost,
            idle_timeout=self.idle_timeout if idle_timeout is None else idle_timeout,
            notebook=notebook, environment=requirements,
        )
        self.ledger.save(rec)
        self.sessions[rec.id] = rec
        self.scheduler.enqueue(rec.id, spec)
        self._notify(rec.id)
        if rec.id in self._dispatch():
            # It got a warm kernel: answer with the running session, saving a round trip.
            await asyncio.shield(self._launching[rec.id])
        return rec

    def _check_budget(self, user: str) -> None:
        limit = self.limit_for(user)
        spent = self.spent_today(user) if limit else 0.0
        if limit and spent >= limit:
            raise BudgetExceededError(
                f"Your daily budget of ${limit:.2f} is spent (${spent:.2f} "
                f"today). New sessions start again tomorrow, or ask the pool's operator to raise "
                f"PoolApp.daily_limit."
            )

    async def hold(self, user: str, hardware: str, seconds: float, *,
                   notebook: str | None = None) -> SessionRecord:
        """Hold a ready warm kernel for a first cell that may come (``%load_ext`` asks).

        The session runs, and its client may connect, but it is not billed, listed or
        counted until :meth:`claim`; unclaimed after ``seconds`` (at most ``max_hold``) it
        is stopped, having cost nothing. Nothing is started or queued for a hold, and no
        GPU is ever held: only CPU kernels the pool already keeps warm.

        Raises:
            InvalidRequestError: GPU hardware, or ``seconds`` not a positive number.
            UnknownHardwareError: the spec is malformed or names unknown hardware.
            HardwareUnavailableError: no warm kernel of that type is ready now.
            BudgetExceededError: the user's daily budget is spent.
        """
        spec = parse_spec(hardware, self.catalog)
        if not spec.is_cpu or len(spec.choices) != 1:
            raise InvalidRequestError(
                f"Only a CPU kernel can be held for a first cell, not `{spec}`: GPUs are "
                f"granted to the cell that asks for them.")
        if not (math.isfinite(seconds) and seconds > 0):
            raise InvalidRequestError(f"A hold lasts a positive number of seconds, not {seconds}.")
        self._check_budget(user)
        choice = spec.primary
        slot_id = None if self.scheduler.queue_length(choice.type) else \
            self.warm.ready_slot(choice.type)
        warm = self.warm.take(slot_id, choice) if slot_id is not None else None
        if slot_id is None or warm is None:
            raise HardwareUnavailableError(f"No warm {choice.type} kernel is ready to hold.")
        now = time.time()
        rec = SessionRecord(
            id=secrets.token_hex(8), user=user, hardware=str(spec), state="queued",
            created=now, idle_timeout=self.idle_timeout, notebook=notebook,
            hold_until=now + min(seconds, self.max_hold),
        )
        self.sessions[rec.id] = rec
        self.scheduler.allocate(slot_id, choice.type, choice.count)
        self._starting(rec, slot_id, choice)
        await self._launch(rec, slot_id, choice, warm)  # warm: nothing to ask the host
        self.warm.refill()
        return rec

    async def claim(self, user: str, session_id: str, *, max_cost: float | None = None,
                    idle_timeout: float | None = None) -> SessionRecord:
        """A cell takes its held session: billing starts now, with the cell's limits.

        Claiming a session that is no hold (or no longer) changes nothing.

        Raises:
            SessionNotFoundError: no such session of this user, or the hold ended.
            InvalidRequestError: a budget or timeout is malformed.
            BudgetExceededError: the user's daily budget is spent (the hold is stopped).
        """
        rec = self.get(user, session_id)
        if rec.hold_until is None:
            return rec
        if rec.state != "running":
            raise SessionNotFoundError(
                f"The held session `{session_id}` ended before a cell took it: "
                f"{rec.stop_reason}.")
        _check_limits(max_cost, idle_timeout)
        try:
            self._check_budget(user)
        except BudgetExceededError:
            await self.stop(rec.id, "your daily budget is spent")
            raise
        rec.hold_until = None
        rec.started = rec.last_seen = time.time()
        rec.max_cost = max_cost
        if idle_timeout is not None:
            rec.idle_timeout = idle_timeout
        self.ledger.save(rec)
        self._arm_budget(rec)
        self._notify(rec.id)
        return rec

    async def _end_holds(self, now: float) -> None:
        """Stop the holds no cell claimed in time (they cost nothing)."""
        for rec in [r for r in self.sessions.values() if r.hold_until is not None
                    and r.state == "running" and now >= r.hold_until]:
            await self.stop(rec.id, "held for a first cell that did not come")

    def _dispatch(self) -> set[str]:
        """Start what the scheduler grants; returns the sessions that got a warm kernel."""
        warmed = set()
        for decision in self.scheduler.schedule():
            rec = self.sessions[decision.request_id]
            # Warm kernels run in the host's own environment: not one a session asked for.
            warm = None if rec.environment else self.warm.take(decision.slot_id, decision.choice)
            if warm is not None:
                warmed.add(rec.id)
            self._starting(rec, decision.slot_id, decision.choice)
            task = asyncio.create_task(self._launch(rec, decision.slot_id, decision.choice, warm))
            self._launching[rec.id] = task
            task.add_done_callback(functools.partial(self._launched, rec.id))
        self.warm.refill()
        waiting = self.scheduler.waiting()
        if [str(w) for w in waiting] != self._waiting:
            self._waiting = [str(w) for w in waiting]
            self.backend.waiting(waiting)
        return warmed

    # -- what the backend tells us -----------------------------------------------------------

    def _unheard(self, slot_id: str) -> bool:
        """Whether the pool has not heard from the slot's host since it started."""
        slot = self.scheduler.slots.get(slot_id)
        return slot is not None and not slot.heard_from

    def _refusal(self, slot: Slot) -> str | None:
        """Why this pool takes no kernels on ``slot``, if it does not: the pool is shared
        and its host does not isolate kernels (a host not heard from yet is judged when it
        answers)."""
        if not slot.heard_from:
            return None
        if self.shared and not slot.isolated and not self.allow_unisolated:
            return (f"Host {slot.id} runs kernels without isolation ({slot.isolation}), and "
                    f"this pool is shared: one user's code could read another's files and "
                    f"variables there")
        return None

    def slots_changed(self, slots: list[Slot]) -> None:
        """The backend's hardware changed (a node joined or left, others took GPUs): show
        it, and grant what now fits. A host a shared pool must refuse is left out."""
        taken = []
        for slot in slots:
            refused = self._refusal(slot)
            if refused:
                self.log.error("%s: it is left out. Restart it with --isolation=bubblewrap "
                               "(or podman, docker), or the pool with --allow-unisolated.",
                               refused)
            else:
                taken.append(slot)
        gone = self.scheduler.update_slots(taken)
        if gone:
            self.log.info("Slots gone from the backend: %s", ", ".join(gone))
        self._notify()
        self._dispatch()

    def kernels(self) -> set[str]:
        """The kernels this pool's sessions and warm kernels hold now."""
        held = {r.kernel_id for r in self.sessions.values() if r.kernel_id}
        return held | {placement.kernel_id for ready in self.warm.ready.values()
                       for placement, _ in ready}

    def placement_lost(self, placement: Placement, reason: str) -> None:
        """A kernel the backend started is gone: end its session with the backend's reason."""
        for rec in list(self.sessions.values()):
            if rec.host_url == placement.host_url and rec.kernel_id and \
                    placement.kernel_id in ("", rec.kernel_id):
                self._spawn(self.stop(rec.id, reason))

    def _launched(self, session_id: str, _task: asyncio.Task[None]) -> None:
        self._launching.pop(session_id, None)

    def _report(self, rec: SessionRecord, text: str) -> None:
        """A backend's progress line for a starting session; waiting clients see each one
        (the lines stay in the view until the session ends, so none is missed)."""
        lines = self._progress.setdefault(rec.id, [])
        if rec.state == "starting" and lines[-1:] != [text]:
            lines.append(text)
            self._notify(rec.id)

    def _starting(self, rec: SessionRecord, slot_id: str, choice: Choice) -> None:
        """Granted: record what and where before anyone asks (a POST answers `starting`)."""
        price = self.catalog.get(choice.type).price_per_hour
        rec.state, rec.gpu_type, rec.count = "starting", choice.type, choice.count
        rec.host_id = slot_id
        rec.rate_per_hour = price * choice.count
        rec.token = secrets.token_urlsafe(32)
        self.ledger.save(rec)
        self._notify(rec.id)

    async def _launch(self, rec: SessionRecord, slot_id: str, choice: Choice,
                      warm: tuple[Placement, str] | None) -> None:
        assert rec.token is not None
        try:
            if warm is not None:  # started with its token already: nothing to ask the host
                placement, rec.token = warm
            else:
                await self.warm.make_room(slot_id, choice.type)
                progress_to(functools.partial(self._report, rec))  # this task's context only
                placement = await self.backend.launch(slot_id, choice, rec.token,
                                                      environment=rec.environment or None)
        except Exception as e:
            self.scheduler.release(slot_id, choice.type, choice.count)
            self.log.warning("Could not start a kernel for session %s: %s", rec.id, e)
            if isinstance(e, CloudGPUError):
                rec.error = type(e).__name__
            self._finish(rec, "failed", f"the host could not start a kernel: {e}")
            self._notify(rec.id)
            self._dispatch()
            return
        if placement.slot_id != slot_id:  # the backend placed it elsewhere (Ray may)
            self.scheduler.release(slot_id, choice.type, choice.count)
            self.scheduler.allocate(placement.slot_id, choice.type, choice.count)
            rec.host_id = placement.slot_id
        rec.host_url, rec.kernel_id = placement.host_url, placement.kernel_id
        rec.gpus, rec.simulated = placement.gpus, placement.simulated
        rec.state = "running"
        rec.last_seen = time.time()
        if rec.hold_until is None:  # a hold is billed from its claim
            rec.started = rec.last_seen
        self.ledger.save(rec)
        self._arm_budget(rec)
        self._notify(rec.id)

    async def _ask_host(self, rec: SessionRecord) -> dict[str, Any] | None:
        """The host's answer for a session's kernel; None also when it cannot be asked."""
        try:
            return await self.backend.probe(self._placement(rec))
        except CloudGPUError as e:
            self.log.info("Could not ask about session %s's kernel: %s", rec.id, e)
            return None

    def _placement(self, rec: SessionRecord) -> Placement:
        return Placement(rec.host_id or "", rec.host_url or "", rec.kernel_id or "", rec.gpus,
                         rec.simulated)

    def _finish(self, rec: SessionRecord, state: str, reason: str) -> None:
        rec.state, rec.stop_reason = state, reason
        if rec.ended is None:
            rec.ended = time.time()
        self.ledger.save(rec)
        self.sessions.pop(rec.id, None)
        self._progress.pop(rec.id, None)
        self._idle_since.pop(rec.id, None)
        self._away.pop(rec.id, None)

    async def stop(self, session_id: str, reason: str, state: str = "stopped") -> SessionRecord:
        """End a session whatever its state: dequeue it, or stop its kernel and free its GPUs."""
        rec = self.sessions.get(session_id) or self.ledger.get(session_id)
        if rec is None:
            raise SessionNotFoundError(f"No session `{session_id}`.")
        if not rec.active:
            return rec
        if rec.state == "queued":
            self.scheduler.cancel(rec.id)
            self._finish(rec, "cancelled", reason)
        else:
            launching = self._launching.get(rec.id)
            if launching is not None:
                await asyncio.shield(launching)  # let the kernel exist, then stop it
            if rec.kernel_id and state != "lost":
                # Billing ends when the kernel did, if it ended before it was stopped.
                end = kernel_end(await self._ask_host(rec))
                if end is not None:
                    rec.ended, reason = end[0], end[1]
            self._finish(rec, state, reason)
            if rec.kernel_id and state == "lost":
                # Its host may only be cut off: if it answers again, so must its kernel stop.
                self._unstopped[rec.kernel_id] = self._placement(rec)
            elif rec.kernel_id:
                await self._stop_kernel(self._placement(rec))
            self.scheduler.release(rec.host_id or "", rec.gpu_type or CPU, rec.count or 0)
        self._notify(rec.id)
        self._dispatch()
        return rec

    async def _stop_kernel(self, placement: Placement) -> bool:
        """Stop a kernel the pool is done with (its session ended, or a warm one); one whose
        host cannot be reached now is stopped when it answers again (:meth:`heartbeat`).
        Whether it is stopped."""
        try:
            await self.backend.stop(placement)
        except HostConnectionError as e:
            if placement.kernel_id not in self._unstopped:
                self.log.warning("Could not stop kernel %s on %s (%s); it will be stopped "
                                 "once its host answers", placement.kernel_id,
                                 placement.slot_id, e)
            self._unstopped[placement.kernel_id] = placement
            return False
        self._unstopped.pop(placement.kernel_id, None)
        return True

    async def check(self, session_id: str) -> None:
        """Probe a running session's kernel now (its client lost the connection to it), and
        end the session, saying why, if the kernel is gone."""
        rec = self.sessions.get(session_id)
        if rec is not None and rec.state == "running":
            await self._judge(rec)

    async def _judge(self, rec: SessionRecord) -> dict[str, Any] | None:
        """The kernel's model while it runs; None once the session was stopped for its kernel
        being gone (billed to the end its host remembers, else to its last sighting), or
        when its host cannot be asked now (the heartbeat judges hosts)."""
        try:
            model = await self.backend.probe(self._placement(rec))
        except CloudGPUError:
            return None
        if rec.id not in self.sessions:
            return None  # stopped meanwhile
        if model is None:
            rec.ended = rec.last_seen or rec.started
            await self.stop(rec.id, await self.backend.lost_reason(self._placement(rec)))
            return None
        if kernel_end(model) is not None:
            # stop() reads the end (when, and how it died) from the host's answer.
            await self.stop(rec.id, "its remote kernel is gone")
            return None
        return model

    def get(self, user: str, session_id: str) -> SessionRecord:
        """A user's session (active or ended).

        Raises:
            SessionNotFoundError: when it does not exist or is someone else's.
        """
        rec = self.sessions.get(session_id) or self.ledger.get(session_id)
        if rec is None or rec.user != user:
            raise SessionNotFoundError(f"No session `{session_id}` of yours.")
        return rec

    def version(self, session_id: str) -> int:
        """Bumped on every change of the session."""
        return self._versions.get(session_id, 0)

    def _notify(self, *session_ids: str) -> None:
        """Bump these sessions' versions, and those of every queued session (its place in
        line may have moved), and wake everyone who waits."""
        for session_id in {*session_ids, *self.scheduler.queued}:
            self._versions[session_id] = self._versions.get(session_id, 0) + 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait(self, session_id: str, version: int, timeout: float) -> None:
        """Return when the session changed past ``version``, or after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        if self.version(session_id) == version:
            self.log.debug("Session %s: waiting up to %.0f s for a change past version %d",
                           session_id, timeout, version)
        while self.version(session_id) == version:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def position(self, session_id: str) -> tuple[int, list[str]]:
        """Queued requests ahead of this one for the same hardware, and that hardware."""
        return self.scheduler.position(session_id)

    # -- money ---------------------------------------------------------------------------------

    def limit_for(self, user: str) -> float:
        """The user's daily limit in dollars (0: none)."""
        return self.user_limits.get(user, self.daily_limit)

    def spent_today(self, user: str, now: float | None = None) -> float:
        """What the user's sessions cost since local midnight."""
        now = now or time.time()
        midnight = start_of_day(now)
        return sum(r.cost(now, since=midnight) for r in self.ledger.for_user(user, midnight))

    async def meter(self) -> None:
        """Record liveness; warn at 80% of a budget and stop sessions at 100%.

        A session's own ``max_cost`` is exact (see ``_arm_budget``); daily limits, shared by
        all of a user's sessions, are checked here every ``meter_interval``.
        """
        now = time.time()
        await self._end_holds(now)
        running = [r for r in self.sessions.values() if r.state == "running"]
        alive = [r for r in running if self.health.healthy(r.host_id or "")
                 and not self._unheard(r.host_id or "")]
        self.ledger.touch([r.id for r in alive], now)
        for rec in alive:
            rec.last_seen = now
        for user in {r.user for r in running}:
            limit = self.limit_for(user)
            if not limit:
                continue
            spent = self.spent_today(user, now)
            what = f"your daily budget of ${limit:.2f}"
            for rec in [r for r in running if r.user == user]:
                if spent >= limit:
                    await self.stop(rec.id, f"{what} is spent (${spent:.2f} today)")
                elif spent >= WARN_AT * limit and not any(what in w for w in rec.warnings):
                    # Once, as spending crosses it: not again at each percent it rises.
                    await self._warn(rec, f"{spent / limit:.0%} of {what} used")

    def _arm_budget(self, rec: SessionRecord) -> None:
        """Warn at exactly 80% of ``max_cost`` and stop at exactly 100%, by timers."""
        if not rec.max_cost or not rec.rate_per_hour or rec.started is None:
            return
        loop = asyncio.get_running_loop()
        full = rec.max_cost / rec.rate_per_hour * 3600
        elapsed = time.time() - rec.started
        what = f"the session's max_cost of ${rec.max_cost:.2f}"

        def warn() -> None:
            self._spawn(self._warn(rec, f"80% of {what} used"))

        def stop() -> None:
            self._spawn(self.stop(rec.id, f"{what} was reached"))

        loop.call_later(max(WARN_AT * full - elapsed, 0), warn)
        loop.call_later(max(full - elapsed, 0), stop)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _warn(self, rec: SessionRecord, warning: str) -> None:
        if rec.state != "running" or warning in rec.warnings:
            return
        rec.warnings.append(warning)
        self.ledger.save(rec)
        self._notify(rec.id)

    def cost_report(self, user: str, now: float | None = None) -> dict[str, Any]:
        """Today's spending of one user: total, by notebook, by session."""
        now = now or time.time()
        midnight = start_of_day(now)
        records = [r for r in self.ledger.for_user(user, midnight) if not r.unclaimed_hold]
        by_notebook: dict[str, float] = {}
        for r in records:
            key = r.notebook or "(unnamed)"
            by_notebook[key] = by_notebook.get(key, 0.0) + r.cost(now, since=midnight)
        limit = self.limit_for(user)
        return {
            "user": user,
            "today": sum(by_notebook.values()),
            "daily_limit": limit or None,
            "by_notebook": by_notebook,
            "sessions": [{"id": r.id, "hardware": r.hardware, "gpu_type": r.gpu_type,
                          "count": r.count, "state": r.state, "notebook": r.notebook,
                          "cost": r.cost(now), "simulated": r.simulated, "ended": r.ended,
                          "stop_reason": r.stop_reason} for r in records],
        }

    # -- idleness ------------------------------------------------------------------------------

    async def cull(self) -> None:
        """Stop sessions whose kernel has been idle longer than their timeout, or is gone."""
        async with self._watching:
            await self._cull()

    async def _cull(self) -> None:
        now = time.time()
        for rec in [r for r in self.sessions.values() if r.state == "running"]:
            model = await self._judge(rec)
            if model is None:
                continue
            busy = model.get("execution_state") == "busy"
            activity = _parse_time(model.get("last_activity"))
            abandoned = self._abandoned(rec, model.get("connections", 1), busy, activity, now)
            if abandoned:
                await self.stop(rec.id, abandoned)
                continue
            last = activity or rec.started or now
            if busy:
                self._idle_since.pop(rec.id, None)
            else:
                self._idle_since[rec.id] = last
            timeout = rec.idle_timeout or 0
            if not timeout or busy:
                continue
            if now - last > timeout:
                reason = (f"idle: nothing ran for {duration(now - last)} "
                          f"(idle_timeout {duration(timeout)})")
                # The host decides, as one step: a cell that reached it since the probe
                # keeps the session (and idleness starts over); one after is never run.
                if await self.backend.stop_if_idle(self._placement(rec),
                                                   model.get("last_activity"), reason):
                    await self.stop(rec.id, reason)
                else:
                    self.log.info("Session %s read as idle, but a cell reached its kernel "
                                  "since: it stays", rec.id)

    async def heartbeat(self) -> None:
        """Ask every host whether it is there; end the sessions of one that is lost.

        A host that misses ``heartbeat_misses`` beats has lost its sessions. They end at
        the last beat it answered, their GPUs are freed, and their clients are told why
        (``stop_reason``) when they ask.
        """
        async with self._watching:
            await self._heartbeat()

    async def _heartbeat(self) -> None:
        now = time.time()
        for slot_id, info in (await self.backend.heartbeat()).items():
            if info is None:
                last = self.health.missed(slot_id, now)
                if last is not None:
                    await self._lose_slot(slot_id, last, f"its machine was lost: the host "
                                          f"stopped answering {duration(now - last)} ago")
                continue
            # First what must stop there: its GPUs are free for the next session only then.
            for placement in [p for p in self._unstopped.values() if p.slot_id == slot_id]:
                if await self._stop_kernel(placement):
                    self.log.warning("Stopped kernel %s on %s, left running by a session "
                                     "that ended while the pool could not reach it",
                                     placement.kernel_id, slot_id)
            if self.health.answered(slot_id, now) and slot_id in self.scheduler.slots:
                self.log.warning("Host %s answers again; placing sessions there again", slot_id)
                self.scheduler.slots[slot_id].down = False
                self._dispatch()

    async def _lose_slot(self, slot_id: str, last_seen: float, reason: str) -> None:
        lost = [r for r in self.sessions.values() if r.host_id == slot_id
                and r.state == "running"]
        if lost:
            self.log.warning("Host %s is lost; ending %d session(s): %s", slot_id, len(lost),
                             reason)
        if slot_id in self.scheduler.slots:
            self.scheduler.slots[slot_id].down = True
        for rec in lost:
            # (not past its own last sighting: one the pool kept at its start, on a host it
            # never heard from, was last seen by the pool before)
            rec.ended = max(min(last_seen, rec.last_seen or last_seen), rec.started or 0)
            await self.stop(rec.id, reason, state="lost")
        for placement in self.warm.forget_slot(slot_id):
            self._unstopped[placement.kernel_id] = placement
        self.warm.refill()

    def _abandoned(self, rec: SessionRecord, connections: int, busy: bool,
                   activity: float | None, now: float) -> str | None:
        """Why ``rec`` is stopped as abandoned, if it is: no client was connected to it for
        ``disconnected_timeout`` seconds since its kernel was last active (``activity``,
        as its host said, with ``connections`` and ``busy``).

        A cell still running keeps it, up to ``busy_disconnected_timeout``: a notebook
        whose laptop slept through a long training comes back to the cell's end and its
        output (the host replays what it missed), not to a stopped session.

        What it found is kept for the session's view (``_disconnected``), also where no
        timeout applies.
        """
        if connections > 0:
            self._away.pop(rec.id, None)
            return None
        away = self._away.setdefault(rec.id, _Away(since=now))
        away.cell_running, away.stop_at = busy, None
        gone_for = now - away.since
        if not self.disconnected_timeout:
            return None
        if busy:
            if self.busy_disconnected_timeout:
                if gone_for >= self.busy_disconnected_timeout:
                    return (f"no notebook was connected to it for {duration(gone_for)} while a "
                            f"cell ran (busy_disconnected_timeout "
                            f"{duration(self.busy_disconnected_timeout)})")
                away.stop_at = away.since + self.busy_disconnected_timeout
            if gone_for >= self.disconnected_timeout and not away.said_kept:
                away.said_kept = True
                self.log.info("Session %s has had no notebook connected for %s, but a cell "
                              "is running: it stays until the cell ends", rec.id,
                              duration(gone_for))
            return None
        last = activity or away.since
        away.stop_at = max(away.since, last) + self.disconnected_timeout
        if now < away.stop_at:
            return None
        reason = f"no notebook was connected to it for {duration(self.disconnected_timeout)}"
        if last > away.since:
            reason += f" after its cell ended (away for {duration(gone_for)} in all)"
        return reason

    # -- views ---------------------------------------------------------------------------------

    async def metrics(self, user: str) -> dict[str, dict[str, Any]]:
        """Live readings of the user's running sessions, by session id (from their hosts)."""
        running = [r for r in self.sessions.values()
                   if r.user == user and r.state == "running" and r.kernel_id]
        by_kernel = await self.backend.metrics([self._placement(r) for r in running])
        return {r.id: by_kernel[r.kernel_id] for r in running if r.kernel_id in by_kernel}

    def hardware(self) -> list[dict[str, Any]]:
        """Every catalog type with free/total counts, price and queue length."""
        out = []
        for hw in self.catalog:
            total = sum(s.total.get(hw.name, 0) for s in self.scheduler.slots.values())
            free = sum(s.free(hw.name) for s in self.scheduler.slots.values())
            simulated = any(s.simulated and s.total.get(hw.name) for s in
                            self.scheduler.slots.values())
            unisolated = self.shared and any(not s.isolated and (s.total.get(hw.name) or
                                                                 not hw.is_gpu)
                                             for s in self.scheduler.slots.values())
            out.append({"type": hw.name, "aliases": list(hw.aliases), "memory_gb": hw.memory_gb,
                        "price_per_hour": hw.price_per_hour, "price_source": hw.price_source,
                        "total": total if hw.is_gpu else None,
                        "free": free if hw.is_gpu else None,
                        "queued": self.scheduler.queue_length(hw.name),
                        "simulated": simulated, "available": bool(total) or not hw.is_gpu,
                        "not_isolated": unisolated})
        return out

    def view(self, rec: SessionRecord, *, with_token: bool) -> dict[str, Any]:
        """A session as the REST API shows it to its owner."""
        ahead, waiting_for = self.position(rec.id) if rec.state == "queued" else (0, [])
        body: dict[str, Any] = {
            "id": rec.id, "user": rec.user, "hardware": rec.hardware, "state": rec.state,
            "created": rec.created, "started": rec.started, "ended": rec.ended,
            "gpu_type": rec.gpu_type, "count": rec.count, "rate_per_hour": rec.rate_per_hour,
            "cost": rec.cost(), "max_cost": rec.max_cost, "idle_timeout": rec.idle_timeout,
            "notebook": rec.notebook, "stop_reason": rec.stop_reason, "warnings": rec.warnings,
            "simulated": rec.simulated, "gpus": rec.gpus, "host_url": rec.host_url,
            "kernel_id": rec.kernel_id, "ahead": ahead, "waiting_for": waiting_for,
            "version": self.version(rec.id),
            "idle_since": self._idle_since.get(rec.id) if rec.state == "running" else None,
            "disconnected": self._disconnected(rec),
            "environment": rec.environment, "progress": self._progress.get(rec.id, []),
            "error": rec.error, "hold_until": rec.hold_until,
            **self._isolation(self.scheduler.slots.get(rec.host_id or "")),
        }
        if with_token and rec.state == "running":
            body["token"] = rec.token
        return body


    def _disconnected(self, rec: SessionRecord) -> dict[str, Any] | None:
        """Since when no notebook has been connected to a running session (as the last
        cull saw it), whether a cell runs meanwhile, and when the pool stops it unless one
        connects again (``stop_at``, None: not for that); None while one is connected."""
        away = self._away.get(rec.id) if rec.state == "running" else None
        if away is None:
            return None
        return {"since": away.since, "cell_running": away.cell_running,
                "stop_at": away.stop_at}

    def _isolation(self, slot: Slot | None) -> dict[str, Any]:
        """How a session's kernel is isolated, and a warning where that matters: a pool
        several people share, on a host that does not isolate kernels."""
        if slot is None:
            return {"isolation": None, "isolation_warning": None}
        warning = None
        if self.shared and not slot.isolated:
            warning = (f"not isolated: its host runs kernels unsandboxed ({slot.isolation}), "
                       f"where other users of this pool could read its files and variables")
        return {"isolation": slot.isolation, "isolation_warning": warning}


def _check_limits(max_cost: float | None, idle_timeout: float | None) -> None:
    if max_cost is not None and not (math.isfinite(max_cost) and max_cost > 0):
        raise InvalidRequestError(
            f"max_cost must be a positive number of dollars, not {max_cost}.")
    if idle_timeout is not None and not (math.isfinite(idle_timeout) and idle_timeout >= 0):
        raise InvalidRequestError(
            f"idle_timeout must be a number of seconds, 0 or more (0: never), not "
            f"{idle_timeout}."
        )


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
