"""The client: remote sessions by hardware, from one provider, on the background loop."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import sys
import threading
from collections.abc import Mapping
from typing import Any

from ._loop import get_loop, run_sync
from .errors import CloudGPUError
from .hardware import HardwareSpec
from .provider import SessionProvider, StatusCallback
from .serialize import versions
from .session import RemoteSession

__all__ = ["Client", "default_provider", "get_client"]


def default_provider() -> SessionProvider:
    """The configured pool, or this user's local pool (found or started)."""
    from .config import load_client_config
    from .pool_client import PoolProvider

    settings = load_client_config()
    if settings.pool_url:
        return PoolProvider(settings.pool_url, settings.token)
    from ._localpool import local_pool

    url, token = local_pool()
    return PoolProvider(url, token, description="local pool")


class Client:
    """Keeps one remote session per hardware spec, reusing it from cell to cell.

    Args:
        provider: where kernels come from; by default the configured or local pool,
            looked up on first use.
    """

    def __init__(self, provider: SessionProvider | None = None) -> None:
        self._provider = provider
        self._provider_lock = threading.Lock()
        self.sessions: dict[str, RemoteSession] = {}
        self._lock = asyncio.Lock()

    @property
    def provider(self) -> SessionProvider:
        """The provider, found (and the local pool started) on first use."""
        with self._provider_lock:
            if self._provider is None:
                self._provider = default_provider()
            return self._provider

    def prepare(self) -> None:
        """Find the provider now, in a background thread, so the first cell need not.

        A failure here is not lost: the first cell looks again and reports it.
        """
        def find() -> None:
            versions()  # imports dill, which the first greeting would otherwise wait for
            with contextlib.suppress(CloudGPUError):
                self.provider  # noqa: B018

        threading.Thread(target=find, name="cloudgpu-prepare", daemon=True).start()

    async def session(self, spec: HardwareSpec, *, new: bool = False,
                      on_status: StatusCallback | None = None,
                      options: Mapping[str, Any] | None = None) -> RemoteSession:
        """The live session for ``spec``; a fresh one when ``new`` or when the old one is gone.

        A replaced session's end reason (idleness, budget) is on ``replaced_reason``.
        """
        key = str(spec)
        async with self._lock:
            old = self.sessions.get(key)
            if old is not None and old.alive and not new:
                return old
            reason = None
            if old is not None:
                if not old.alive and not new:
                    reason = await self.provider.ended_reason(old.grant) or old.stopped_reason
                await self._drop(key)
            provider = self.provider if self._provider is not None else \
                await asyncio.get_running_loop().run_in_executor(None, lambda: self.provider)
            grant = await provider.acquire(spec, on_status=on_status, options=options)
            try:
                session = await RemoteSession.open(grant, wait=False)
            except BaseException:
                await provider.release(grant)
                raise
            session.replaced_reason = reason
            self.sessions[key] = session
            return session

    async def _drop(self, key: str) -> None:
        session = self.sessions.pop(key)
        await session.close(shutdown=False)
        await self.provider.release(session.grant)

    async def shutdown(self, spec: HardwareSpec | None = None) -> list[str]:
        """Stop the session for ``spec``, or all of them; returns what was stopped."""
        async with self._lock:
            keys = [str(spec)] if spec is not None else list(self.sessions)
            stopped = []
            for key in keys:
                if key in self.sessions:
                    stopped.append(self.sessions[key].grant.display)
                    await self._drop(key)
            return stopped

    async def aclose(self) -> None:
        """Release every session, then close the provider."""
        await self.shutdown()
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
    if client is not None and client.sessions:
        # Release the hardware now rather than when the pool notices nobody is connected.
        try:
            run_sync(client.aclose(), timeout=20)
        except (CloudGPUError, TimeoutError) as e:
            print(f"cloudgpu: could not release remote sessions at exit ({e}); the pool stops "
                  f"them once it sees no notebook connected.", file=sys.stderr)
