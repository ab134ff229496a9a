"""The client: remote sessions by hardware, from one provider, on the background loop."""

from __future__ import annotations

import asyncio
import atexit
import threading

from ._loop import run_sync
from .hardware import HardwareSpec
from .provider import SessionProvider
from .session import RemoteSession

__all__ = ["Client", "get_client"]


class Client:
    """Keeps one remote session per hardware spec, reusing it from cell to cell.

    Args:
        provider: where kernels come from; the embedded local host by default.
    """

    def __init__(self, provider: SessionProvider | None = None) -> None:
        if provider is None:
            from ._embedded import EmbeddedHostProvider

            provider = EmbeddedHostProvider()
        self.provider = provider
        self.sessions: dict[str, RemoteSession] = {}
        self._lock = asyncio.Lock()

    async def session(self, spec: HardwareSpec, *, new: bool = False) -> RemoteSession:
        """The live session for ``spec``; a fresh one when ``new`` or when the old one is gone.

        Returns the previous session's stop reason through ``RemoteSession.replaced_reason``.
        """
        key = str(spec)
        async with self._lock:
            old = self.sessions.get(key)
            if old is not None and old.alive and not new:
                return old
            if old is not None:
                await self._drop(key)
            grant = await self.provider.acquire(spec)
            try:
                session = await RemoteSession.open(grant)
            except BaseException:
                await self.provider.release(grant)
                raise
            session.replaced_reason = None if old is None or new else old.stopped_reason
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
        """Stop every session and the provider."""
        await self.shutdown()
        await self.provider.aclose()


_default: Client | None = None
_default_lock = threading.Lock()


def get_client() -> Client:
    """This process's client, made on first use and closed at exit."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
            atexit.register(_close_default)
        return _default


def _close_default() -> None:
    global _default
    client, _default = _default, None
    if client is not None:
        try:
            run_sync(client.aclose(), timeout=15)
        except Exception:  # at exit, the host is stopped below regardless
            pass
