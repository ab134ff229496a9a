"""The client: the one owner of remote sessions, on the background loop.

Every front-end (the ``%%remote`` magic, the Cloud GPU kernel, the Python API) gets its
sessions here and asks about them here. The client acquires a kernel from the provider,
opens the connection, reuses it from cell to cell, replaces it (saying why the old one
ended) when it is gone, moves a session to other hardware with its variables, and
releases what it holds, also when opening fails half way.

At ``%load_ext`` it may also hold the provider's warm ``cpu`` kernel, connected, for the
first session to take (:meth:`Client.prepare`): the first ``%%remote gpu=cpu`` cell then
costs one round trip, not two (the websocket upgrade is done). A hold is not billed until a
session takes it, and is given back unused after ``ClientConfig.warm_hold`` seconds or when
the first session asked for is something else.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from ._loop import get_loop, run_sync
from ._move import MoveReport
from .environment import same_environment
from .errors import CloudGPUError
from .hardware import CPU, Catalog, HardwareSpec, parse_spec
from .provider import Grant, SessionProvider, StatusCallback
from .remote import Forward
from .serialize import versions

if TYPE_CHECKING:
    from .config import ClientConfig
from .session import RemoteSession

__all__ = ["Client", "default_provider", "get_client"]

log = logging.getLogger("cloudgpu.client")

WARNINGS_EVERY = 5.0
"""Seconds between asking the provider for a session's warnings (budget nearly spent)."""

HOLD_MARGIN = 10.0
"""Seconds a hold is asked for beyond the client's own while, so that the provider never ends
a hold this client may still take or is giving back."""


def _settings() -> ClientConfig:
    from .config import load_client_config

    return load_client_config()


def default_provider() -> SessionProvider:
    """The configured pool, or this user's local pool (found or started)."""
    from .pool_client import PoolProvider

    settings = _settings()
    if settings.pool_url:
        return PoolProvider(settings.pool_url, settings.token)
    from ._localpool import local_pool

    url, token = local_pool()
    return PoolProvider(url, token, description="local pool")


class Client:
    """Keeps one remote session per key (the hardware spec, by default), reusing it.

    Args:
        provider: where kernels come from; by default the configured or local pool,
            looked up on first use.
        reconnect_timeout, verify_unchanged, warm_hold: as ``ClientConfig`` says; by
            default, its.
    """

    def __init__(self, provider: SessionProvider | None = None,
                 reconnect_timeout: float | None = None,
                 verify_unchanged: bool | None = None,
                 warm_hold: float | None = None) -> None:
        self._provider = provider
        settings = _settings()
        #: Seconds a dropped connection is tried again before the cell fails.
        self.reconnect_timeout = reconnect_timeout if reconnect_timeout is not None \
            else settings.reconnect_timeout
        #: Fingerprint every big input before each cell, trusting no earlier check.
        self.verify_unchanged = verify_unchanged if verify_unchanged is not None \
            else settings.verify_unchanged
        #: Seconds :meth:`prepare` holds a warm kernel for the first session (0: none).
        self.warm_hold = warm_hold if warm_hold is not None else settings.warm_hold
        #: Whether big values may take a connection of their own (``ClientConfig.side_channel``).
        self.side_channel = settings.side_channel
        self._provider_lock = threading.Lock()
        #: The live (or last) session per key.
        self.sessions: dict[str, RemoteSession] = {}
        #: Sessions held under no key: each is its caller's own (see :meth:`acquire`).
        self.owned: set[RemoteSession] = set()
        self._lock = asyncio.Lock()
        self._warnings: dict[str, tuple[float, list[str]]] = {}  # per kernel: when, what
        self._ended: dict[str, str] = {}  # per kernel: why the provider ended its session
        # The held warm session (see `prepare`), until the first session asked for decides.
        self._hold: concurrent.futures.Future[RemoteSession | None] | None = None
        self._hold_timer: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def provider(self) -> SessionProvider:
        """The provider, found (and the local pool started) on first use. Blocks while it is."""
        with self._provider_lock:
            if self._provider is None:
                self._provider = default_provider()
            return self._provider

    async def get_provider(self) -> SessionProvider:
        """The provider, found off the loop when that may start the local pool."""
        if self._provider is not None:
            return self._provider
        return await asyncio.get_running_loop().run_in_executor(None, lambda: self.provider)

    def prepare(self, hold: bool = False) -> None:
        """Find the provider now, in a background thread, so the first cell need not.

        With ``hold``, also hold the provider's warm ``cpu`` kernel and open its websocket,
        for the first session to take (claimed then, and billed from then), for at most
        ``warm_hold`` seconds. A failure here is not lost: the first cell looks again and
        reports it.
        """
        def find() -> None:
            versions()  # imports dill, which the first greeting would otherwise wait for
            with contextlib.suppress(CloudGPUError):
                self.provider  # noqa: B018

        threading.Thread(target=find, name="cloudgpu-prepare", daemon=True).start()
        if hold and self.warm_hold > 0 and self._hold is None:
            self._hold = asyncio.run_coroutine_threadsafe(self._hold_warm(self.warm_hold),
                                                          get_loop())

    @property
    def held(self) -> RemoteSession | None:
        """The warm session held for the first session to take, once connected; else None."""
        hold = self._hold
        if hold is None or not hold.done() or hold.cancelled() or hold.exception():
            return None
        return hold.result()

    async def _hold_warm(self, seconds: float) -> RemoteSession | None:
        """Hold the provider's warm cpu kernel and connect to it, to be given back unused
        after ``seconds``; None when there is none to hold.

        A failure only means no hold: the first session asks the provider as usual, and
        reports what goes wrong then.
        """
        try:
            provider = await self.get_provider()
            grant = await provider.hold(parse_spec(CPU), seconds + HOLD_MARGIN)
        except CloudGPUError as e:
            log.info("No warm kernel held for the first cell: %s", e)
            return None
        if grant is None:
            return None

        async def ended() -> str | None:
            return await provider.ended_reason(grant)

        try:
            session = await self._connect(grant, ended)
        except BaseException as e:
            await asyncio.shield(provider.release(grant))
            if not isinstance(e, CloudGPUError):
                raise
            log.info("Could not connect to the held warm kernel: %s", e)
            return None
        self._hold_timer = asyncio.get_running_loop().call_later(
            seconds, lambda: self._spawn(self._drop_hold()))
        return session

    async def _take_hold(self, spec: HardwareSpec,
                         options: Mapping[str, Any] | None) -> RemoteSession | None:
        """The held session, claimed, when the first session asked for is one it fits
        (``cpu``, the host's own environment); otherwise it is given back."""
        hold, self._hold = self._hold, None  # the first session asked for decides
        if hold is None:
            return None
        session = await asyncio.wrap_future(hold)
        if self._hold_timer is not None:
            self._hold_timer.cancel()
        if session is None:
            return None
        if str(spec) != CPU or (options or {}).get("environment") or not session.alive:
            self._spawn(self._close_and_release(session))
            return None
        try:
            await (await self.get_provider()).claim(session.grant, options)
        except CloudGPUError as e:
            # The hold ended meanwhile, or a budget is spent: asking anew says why.
            log.info("Could not take the held warm kernel: %s", e)
            self._spawn(self._close_and_release(session))
            return None
        return session

    async def _drop_hold(self) -> None:
        """Give the held session back unused (its while is over, or the client closes)."""
        hold, self._hold = self._hold, None
        if self._hold_timer is not None:
            self._hold_timer.cancel()
        session = await asyncio.wrap_future(hold) if hold is not None else None
        if session is not None:
            await self._close_and_release(session)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("Giving back the held warm kernel failed: %s", task.exception())

    # --- sessions ----------------------------------------------------------------------------

    def current(self, key: str) -> RemoteSession | None:
        """The live session under ``key``, or None (none yet, or it is gone)."""
        session = self.sessions.get(key)
        return session if session is not None and session.alive else None

    async def session(self, spec: HardwareSpec, *, key: str | None = None, new: bool = False,
                      on_status: StatusCallback | None = None,
                      options: Mapping[str, Any] | None = None,
                      forward: Forward | None = None) -> RemoteSession:
        """The live session under ``key`` (default ``str(spec)``); a new one on ``spec`` when
        ``new``, when the old one is gone, or when ``options`` ask for another
        ``environment`` than the old one runs in.

        A replaced session's end reason (idleness, budget) is on ``replaced_reason``.
        ``forward`` receives the traffic on the connection that is not the client's own
        (see :class:`~cloudgpu.remote.RemoteKernel`).

        Raises:
            CloudGPUError: a subclass saying why no session can be had.
        """
        key = key or str(spec)
        async with self._lock:
            old = self.sessions.get(key)
            wanted = (options or {}).get("environment")
            if old is not None and old.alive and not new and \
                    same_environment(old.grant.environment, wanted):
                return old
            reason = None
            if old is not None:
                if not old.alive and not new:
                    reason = await self.ended_reason(old)
                await self._drop(key)
            session = await self._open(spec, on_status, options, forward)
            session.replaced_reason = reason
            self.sessions[key] = session
            return session

    async def acquire(self, spec: HardwareSpec, *, on_status: StatusCallback | None = None,
                      options: Mapping[str, Any] | None = None,
                      forward: Forward | None = None) -> RemoteSession:
        """A new session on ``spec`` of the caller's own: never reused or replaced here.

        Unlike :meth:`session` it waits for hardware without holding up anyone else's
        session. Give it back with :meth:`release`; :meth:`shutdown` without a spec (and
        the exit of the process) releases it too.

        Raises:
            CloudGPUError: a subclass saying why no session can be had.
        """
        session = await self._open(spec, on_status, options, forward)
        self.owned.add(session)
        return session

    async def _open(self, spec: HardwareSpec, on_status: StatusCallback | None,
                    options: Mapping[str, Any] | None, forward: Forward | None) -> RemoteSession:
        """Acquire and connect; what was acquired is released when connecting fails."""
        held = await self._take_hold(spec, options)
        if held is not None:
            held.kernel.forward = forward
            return held
        provider = await self.get_provider()
        grant = await provider.acquire(spec, on_status=on_status, options=options)

        async def ended() -> str | None:
            return await provider.ended_reason(grant)

        try:
            return await self._connect(grant, ended, forward)
        except BaseException:
            await asyncio.shield(provider.release(grant))
            raise

    async def _connect(self, grant: Grant, check: Callable[[], Awaitable[str | None]],
                       forward: Forward | None = None) -> RemoteSession:
        """Connect to ``grant``'s kernel as this client's settings say; the greeting is
        collected by the first cell."""
        return await RemoteSession.open(grant, wait=False, forward=forward, check=check,
                                        reconnect_timeout=self.reconnect_timeout,
                                        verify_unchanged=self.verify_unchanged,
                                        side_channel=self.side_channel)

    async def switch(self, key: str | RemoteSession, spec: HardwareSpec, *,
                     on_status: StatusCallback | None = None,
                     say: Callable[[str], None] = lambda text: None,
                     forward: Forward | None = None,
                     prepare: Callable[[RemoteSession], Coroutine[Any, Any, None]] | None = None,
                     options: Mapping[str, Any] | None = None,
                     ) -> tuple[RemoteSession, MoveReport]:
        """Move the session under ``key`` to ``spec``, carrying every variable that can move.

        The old kernel's variables are taken first, the new hardware acquired, the values
        loaded there and ``prepare(new)`` awaited; only then is the new session put under
        ``key`` and the old one released. If anything fails on the way, nothing changed:
        the new hardware is released and the old session is still there. ``key`` may also
        be a session of the caller's own (:meth:`acquire`); the new one is then its own.
        ``options`` are the new session's (as for :meth:`session`; the environment, say).

        Raises:
            CloudGPUError: why the new session could not be had or filled.
        """
        async with self._lock if isinstance(key, str) else contextlib.nullcontext():
            old = self.sessions.get(key) if isinstance(key, str) else key
            live = old is not None and old.alive
            values, failed = await old.snapshot() if live and old is not None else ({}, {})
            new = await self._open(spec, on_status, options, forward)
            try:
                if live:
                    report = await new.carry_over(values, failed, say)
                else:
                    report = MoveReport(note="nothing to carry over: the previous remote kernel "
                                             "was gone.")
                if prepare is not None:
                    await prepare(new)
            except BaseException:
                await asyncio.shield(self._close_and_release(new))
                raise
            if isinstance(key, str):
                self.sessions[key] = new
            else:
                self.owned.discard(key)
                self.owned.add(new)
            if old is not None:
                await self._close_and_release(old)
            return new, report

    async def _close_and_release(self, session: RemoteSession) -> None:
        await session.close()
        self._warnings.pop(session.kernel_id, None)
        self._ended.pop(session.kernel_id, None)
        await (await self.get_provider()).release(session.grant)

    async def _drop(self, key: str) -> None:
        await self._close_and_release(self.sessions.pop(key))

    async def release(self, session: RemoteSession) -> None:
        """Stop ``session`` and free its hardware; it is forgotten if it is still held."""
        if session in self.owned:  # nobody else's: no need to wait for the lock
            self.owned.discard(session)
            await self._close_and_release(session)
            return
        async with self._lock:
            for key, held in list(self.sessions.items()):
                if held is session:
                    del self.sessions[key]
            await self._close_and_release(session)

    async def shutdown(self, spec: HardwareSpec | None = None) -> list[str]:
        """Stop the session for ``spec``, or all of them (the owned ones too); returns what
        was stopped."""
        async with self._lock:
            keys = [str(spec)] if spec is not None else list(self.sessions)
            stopped = []
            for key in keys:
                if key in self.sessions:
                    stopped.append(self.sessions[key].grant.display)
                    await self._drop(key)
            if spec is None:
                await self._drop_hold()
                owned, self.owned = self.owned, set()
                for session in owned:
                    stopped.append(session.grant.display)
                    await self._close_and_release(session)
            return stopped

    # --- what front-ends show ----------------------------------------------------------------

    async def ended_reason(self, session: RemoteSession) -> str | None:
        """Why the provider ended ``session`` (budget, idleness, its owner), or None if it did
        not (the kernel died, or the connection dropped, by itself)."""
        return await (await self.get_provider()).ended_reason(session.grant)

    async def warnings(self, session: RemoteSession) -> list[str]:
        """The provider's warnings about ``session``, asked at most every ``WARNINGS_EVERY``
        seconds (a cell should not cost the pool a request each time, nor a notebook's
        "Run all" one request per cell while the first is on its way)."""
        checked, known = self._warnings.get(session.kernel_id, (0.0, []))
        if time.monotonic() - checked < WARNINGS_EVERY:
            return known
        self._warnings[session.kernel_id] = (time.monotonic(), known)  # asking now
        known, ended = await (await self.get_provider()).news(session.grant)
        self._warnings[session.kernel_id] = (time.monotonic(), known)
        if ended:
            self._ended[session.kernel_id] = ended
        return known

    def known_warnings(self, session: RemoteSession) -> list[str]:
        """The provider's warnings about ``session`` as :meth:`warnings` last heard them."""
        return list(self._warnings.get(session.kernel_id, (0.0, []))[1])

    def ended_meanwhile(self, session: RemoteSession) -> str | None:
        """Why the provider ended ``session`` while its kernel still ran our cells (as the
        last :meth:`warnings` heard), or None."""
        return self._ended.get(session.kernel_id)

    async def hardware(self) -> list[dict[str, Any]]:
        """The hardware on offer, with prices, free/total and queue lengths."""
        return await (await self.get_provider()).hardware()

    async def user_sessions(self) -> list[dict[str, Any]]:
        """Every active session of this user at the provider (this process's and others')."""
        return await (await self.get_provider()).sessions()

    async def cost(self) -> dict[str, Any]:
        """Today's spending at the provider."""
        return await (await self.get_provider()).cost()

    async def metrics(self) -> dict[str, dict[str, Any]]:
        """Live GPU readings of this user's running sessions, by session id."""
        return await (await self.get_provider()).metrics()

    async def user_session(self, session_id: str) -> dict[str, Any]:
        """One of this user's sessions by id, active or ended (``stop_reason`` says why)."""
        return await (await self.get_provider()).session(session_id)

    async def stop_session(self, session_id: str) -> dict[str, Any]:
        """Stop one of this user's sessions by id (one another process may hold)."""
        return await (await self.get_provider()).stop(session_id)

    async def catalog(self) -> Catalog:
        """The hardware types the provider knows."""
        return await (await self.get_provider()).catalog()

    def session_ids(self) -> set[str | None]:
        """The provider's ids of this process's sessions."""
        return {s.grant.session_id for s in [*self.sessions.values(), *self.owned]}

    async def aclose(self) -> None:
        """Release every session, then close the provider."""
        await self.shutdown()
        await asyncio.gather(*self._background, return_exceptions=True)  # logged when done
        if self._provider is not None:
            await self._provider.aclose()


_default: Client | None = None
_default_lock = threading.Lock()


def get_client() -> Client:
    """This process's client, made on first use; its sessions are released at exit."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
            get_loop()
            atexit.register(_close_default)
        return _default


def _close_default() -> None:
    global _default
    client, _default = _default, None
    if client is not None and (client.sessions or client.owned or client._hold is not None):
        # Release the hardware now rather than when the pool notices nobody is connected.
        try:
            run_sync(client.aclose(), timeout=20)
        except (CloudGPUError, TimeoutError) as e:
            print(f"cloudgpu: could not release remote sessions at exit ({e}); the pool stops "
                  f"them once it sees no notebook connected.", file=sys.stderr)
