"""The REST API the JupyterLab frontend polls, under ``<base_url>/cloudgpu/api/``.

Every handler is Jupyter Server's authenticated ``APIHandler`` (a request without the
server's token or cookie gets 403), and reaches the pool only through
:class:`cloudgpu.client.Client`, which finds it the way kernels do: the configured pool,
or this user's local pool (started if none runs).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

from cloudgpu.client import Client
from cloudgpu.errors import CloudGPUError, PoolConnectionError, error_body, http_status

from .views import session_view, status_view

__all__ = ["API_PREFIX", "PoolLink", "setup_handlers"]

API_PREFIX = "cloudgpu/api"
T = TypeVar("T")


class PoolLink:
    """The server's one client of the pool.

    When the pool cannot be reached (a local pool stopped with ``cloudgpu pool stop``), the
    client is dropped, so the next request looks for the pool again, as a kernel's next
    cell would.
    """

    def __init__(self, make_client: Callable[[], Client] = Client) -> None:
        self._make_client = make_client
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        """The client, made on first use."""
        if self._client is None:
            self._client = self._make_client()
        return self._client

    def prepare(self) -> None:
        """Find (or start) the pool now, in the background, so the first poll need not."""
        self.client.prepare()

    async def call(self, job: Callable[[Client], Awaitable[T]]) -> T:
        """``job(client)``; a pool that cannot be reached is looked for again next time."""
        client = self.client
        try:
            return await job(client)
        except PoolConnectionError:
            if self._client is client:
                self._client = None
                await client.aclose()
            raise

    async def description(self) -> str:
        """How users should read where their sessions run (``local pool``, a URL)."""
        return (await self.client.get_provider()).description

    async def aclose(self) -> None:
        """Close the client (it holds no sessions of its own)."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


class CloudGPUAPIHandler(APIHandler):
    """Answers cloudgpu errors as ``{"error", "message", "status"}`` with their status."""

    @property
    def link(self) -> PoolLink:
        return self.settings["cloudgpu_pool"]  # type: ignore[no-any-return]

    @property
    def root_dir(self) -> str:
        return str(self.settings.get("server_root_dir", "."))

    async def answer(self, produce: Callable[[], Awaitable[Any]], status: int = 200) -> None:
        """Finish with ``await produce()`` as JSON, or with the cloudgpu error it raised."""
        try:
            body = await produce()
        except CloudGPUError as e:
            self.set_status(http_status(e))
            self.finish(json.dumps(error_body(e)))
            return
        self.set_status(status)
        self.finish(json.dumps(body, default=str))


class StatusHandler(CloudGPUAPIHandler):
    """``GET /cloudgpu/api/status``: sessions with live readings, totals and today's spending:
    all the status bar and the sessions panel show, in one request. With ``?ended_since=T``,
    also the sessions that ended since then, and why."""

    @web.authenticated
    async def get(self) -> None:
        since = self.get_query_argument("ended_since", None)
        try:
            ended_since = float(since) if since is not None else None
        except ValueError:
            raise web.HTTPError(400, "ended_since must be a time in seconds (the `now` of "
                                     "an earlier status)") from None

        async def produce() -> dict[str, Any]:
            sessions, metrics, cost = await self.link.call(lambda c: asyncio.gather(
                c.user_sessions(), c.metrics(), c.cost()))
            return status_view(sessions, metrics, cost, self.root_dir, time.time(),
                               await self.link.description(), ended_since)

        await self.answer(produce)


class HardwareHandler(CloudGPUAPIHandler):
    """``GET /cloudgpu/api/hardware``: every type with memory, $/hour, free/total and queue."""

    @web.authenticated
    async def get(self) -> None:
        async def produce() -> dict[str, Any]:
            hardware = await self.link.call(lambda c: c.hardware())
            return {"pool": await self.link.description(), "hardware": hardware,
                    "simulated": any(h.get("simulated") for h in hardware)}

        await self.answer(produce)


class SessionsHandler(CloudGPUAPIHandler):
    """``GET /cloudgpu/api/sessions``: the user's active sessions, as the panel shows them."""

    @web.authenticated
    async def get(self) -> None:
        async def produce() -> dict[str, Any]:
            sessions = await self.link.call(lambda c: c.user_sessions())
            now = time.time()
            return {"sessions": [session_view(s, None, self.root_dir, now) for s in sessions]}

        await self.answer(produce)


class SessionHandler(CloudGPUAPIHandler):
    """``GET /cloudgpu/api/sessions/{id}``: that session, active or ended (its
    ``stop_reason``); ``DELETE``: stop it and free its hardware."""

    @web.authenticated
    async def get(self, session_id: str) -> None:
        async def produce() -> dict[str, Any]:
            found = await self.link.call(lambda c: c.user_session(session_id))
            return {"session": session_view(found, None, self.root_dir, time.time())}

        await self.answer(produce)

    @web.authenticated
    async def delete(self, session_id: str) -> None:
        async def produce() -> dict[str, Any]:
            ended = await self.link.call(lambda c: c.stop_session(session_id))
            return {"session": session_view(ended, None, self.root_dir, time.time())}

        await self.answer(produce)


class MetricsHandler(CloudGPUAPIHandler):
    """``GET /cloudgpu/api/metrics``: live GPU readings of the running sessions, by id."""

    @web.authenticated
    async def get(self) -> None:
        async def produce() -> dict[str, Any]:
            return {"metrics": await self.link.call(lambda c: c.metrics())}

        await self.answer(produce)


HANDLERS: list[tuple[str, type[CloudGPUAPIHandler]]] = [
    ("status", StatusHandler),
    ("hardware", HardwareHandler),
    ("sessions", SessionsHandler),
    (r"sessions/([0-9a-f]+)", SessionHandler),
    ("metrics", MetricsHandler),
]


def setup_handlers(web_app: web.Application, link: PoolLink) -> None:
    """Route ``<base_url>/cloudgpu/api/...`` to our handlers, sharing ``link``."""
    web_app.settings["cloudgpu_pool"] = link
    base = web_app.settings["base_url"]
    web_app.add_handlers(".*$", [(url_path_join(base, API_PREFIX, path), handler)
                                 for path, handler in HANDLERS])
