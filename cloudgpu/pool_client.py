"""Talking to a pool: its REST API, and the provider that gets sessions from it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Any

import httpx

from ._http import async_client
from .errors import (
    CloudGPUError,
    HardwareUnavailableError,
    PoolConnectionError,
    error_from_wire,
)
from .hardware import HardwareSpec
from .host_client import error_from_response
from .provider import Grant, SessionProvider, StatusCallback

__all__ = ["PoolClient", "PoolProvider", "describe_wait"]


class PoolClient:
    """The pool's REST API, with errors turned into cloudgpu errors that say what to do."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self._http = async_client(self.url, token, httpx.Timeout(90.0, connect=10.0))

    async def request(self, method: str, path: str, json: Any = None,
                      params: dict[str, Any] | None = None, missing_ok: bool = False) -> Any:
        """One call; a failed one raises the cloudgpu error the pool named, with its message.

        With ``missing_ok``, a 404 returns None instead of raising.

        Raises:
            PoolConnectionError: the pool cannot be reached.
            CloudGPUError: a subclass, as the pool answered (see ``errors.error_from_wire``).
        """
        try:
            response = await self._http.request(method, path, json=json, params=params)
        except httpx.HTTPError as e:
            raise PoolConnectionError(
                f"Cannot reach the cloudgpu pool at {self.url}: {e.__class__.__name__}: {e}. "
                f"Is it running? (`cloudgpu pool --help`)"
            ) from e
        if response.status_code == 404 and missing_ok:
            return None
        if response.status_code >= 400:
            raise error_from_response(response)
        return response.json()

    async def info(self) -> dict[str, Any]:
        """``GET /api/pool``."""
        return await self.request("GET", "/api/pool")  # type: ignore[no-any-return]

    async def hardware(self) -> list[dict[str, Any]]:
        """``GET /api/hardware``."""
        return (await self.request("GET", "/api/hardware"))["hardware"]  # type: ignore[no-any-return]

    async def create(self, hardware: str, **options: Any) -> dict[str, Any]:
        """``POST /api/sessions``."""
        body = {"hardware": hardware, **{k: v for k, v in options.items() if v is not None}}
        return await self.request("POST", "/api/sessions", body)  # type: ignore[no-any-return]

    async def hold(self, hardware: str, seconds: float,
                   notebook: str | None) -> dict[str, Any] | None:
        """``POST /api/holds``: a warm kernel kept, unbilled, for a first cell; None from a
        pool older than holds."""
        body = {"hardware": hardware, "seconds": seconds, "notebook": notebook}
        return await self.request(  # type: ignore[no-any-return]
            "POST", "/api/holds", body, missing_ok=True)

    async def claim(self, session_id: str, **options: Any) -> dict[str, Any]:
        """``POST /api/sessions/{id}/claim``: take a held session; billed from now."""
        body = {k: v for k, v in options.items() if v is not None}
        return await self.request(  # type: ignore[no-any-return]
            "POST", f"/api/sessions/{session_id}/claim", body)

    async def session(self, session_id: str, wait: float = 0.0,
                      version: int = -1, check: bool = False) -> dict[str, Any]:
        """``GET /api/sessions/{id}``; with ``wait``, returns once it changed past ``version``;
        with ``check``, the pool first probes its kernel (ending it, saying why, if gone)."""
        params: dict[str, Any] = {"wait": wait, "version": version} if wait else {}
        if check:
            params["check"] = 1
        return await self.request(  # type: ignore[no-any-return]
            "GET", f"/api/sessions/{session_id}", params=params or None
        )

    async def sessions(self, all: bool = False) -> list[dict[str, Any]]:
        """``GET /api/sessions``: your active sessions (or all of today's)."""
        params = {"all": 1} if all else None
        return (await self.request("GET", "/api/sessions", params=params))["sessions"]  # type: ignore[no-any-return]

    async def delete(self, session_id: str) -> dict[str, Any]:
        """``DELETE /api/sessions/{id}``: stop it and free its hardware."""
        return await self.request("DELETE", f"/api/sessions/{session_id}")  # type: ignore[no-any-return]

    async def cost(self) -> dict[str, Any]:
        """``GET /api/cost``."""
        return await self.request("GET", "/api/cost")  # type: ignore[no-any-return]

    async def metrics(self) -> dict[str, dict[str, Any]]:
        """``GET /api/metrics``: live readings of your running sessions, by session id."""
        return (await self.request("GET", "/api/metrics"))["metrics"]  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()


def describe_wait(session: Mapping[str, Any], progress: str | None = None) -> str:
    """The live line a waiting cell shows: ``waiting for H100: 2 ahead of you``, or
    ``starting on CPU: environment: installing ...`` with a line of the launch's progress."""
    if session["state"] == "queued":
        what = " or ".join(session.get("waiting_for") or [session["hardware"]])
        ahead = session.get("ahead", 0)
        return f"waiting for {what}: {ahead} ahead of you" if ahead else \
            f"waiting for {what}: you are next"
    count, gpu = session.get("count"), session.get("gpu_type")
    what = "CPU" if gpu in (None, "cpu") else f"{count}x {gpu}"
    simulated = " (simulated)" if session.get("simulated") else ""
    if progress:  # the host preparing an environment, say
        return f"starting on {what}{simulated}: {progress}"
    return f"starting on {what}{simulated} ..."


class PoolProvider(SessionProvider):
    """Sessions from a pool: queued, granted, metered and released there.

    Args:
        url: the pool's URL.
        token: your token for it.
        description: how to name it to users (``local pool``, a URL).
    """

    def __init__(self, url: str, token: str, description: str | None = None) -> None:
        self.pool = PoolClient(url, token)
        self.description = description or f"pool at {url}"

    async def acquire(self, spec: HardwareSpec, *, on_status: StatusCallback | None = None,
                      options: Mapping[str, Any] | None = None) -> Grant:
        """Ask the pool and wait, reporting the queue position live, until granted.

        Cancelling (an interrupted cell) withdraws the request.

        Raises:
            CloudGPUError: a subclass naming why (unknown hardware, budget, none here).
        """
        opts = dict(options or {})
        opts.setdefault("notebook", os.environ.get("JPY_SESSION_NAME"))
        session = await self.pool.create(str(spec), **opts)
        said: list[str] = []

        def say(text: str) -> None:
            if on_status is not None and said[-1:] != [text]:
                on_status(text)
            said.append(text)

        shown = 0  # the launch's progress lines said so far: each one is, once
        try:
            while True:
                progress = list(session.get("progress") or [])
                for line in progress[shown:]:
                    say(describe_wait(session, line))
                shown = len(progress)
                if session["state"] not in ("queued", "starting"):
                    break
                if not progress:
                    say(describe_wait(session))
                session = await self.pool.session(session["id"], wait=20,
                                                  version=session["version"])
        except BaseException:
            await asyncio.shield(self._withdraw(session["id"]))
            raise
        if session["state"] != "running":
            message = (f"The pool could not start a session on `{spec}`: "
                       f"{session.get('stop_reason') or session['state']}")
            # The error the host named (EnvironmentBuildError, ...), else: no hardware.
            error = error_from_wire(409, {"error": session.get("error"), "message": message},
                                    message)
            raise error if session.get("error") else HardwareUnavailableError(message + ".")
        return _grant(session)

    async def hold(self, spec: HardwareSpec, seconds: float) -> Grant | None:
        """The pool's warm kernel on ``spec``, held (``POST /api/holds``); None when none is
        ready, or the pool is older than holds."""
        try:
            session = await self.pool.hold(str(spec), seconds,
                                           os.environ.get("JPY_SESSION_NAME"))
        except HardwareUnavailableError:
            return None  # nothing warm: the first cell asks as usual
        return _grant(session) if session is not None else None

    async def claim(self, grant: Grant, options: Mapping[str, Any] | None = None) -> None:
        """Take the held session (``POST /api/sessions/{id}/claim``): billed from now."""
        opts = options or {}
        assert grant.session_id, "a hold is always a pool's session"
        session = await self.pool.claim(grant.session_id, max_cost=opts.get("max_cost"),
                                        idle_timeout=opts.get("idle_timeout"))
        grant.started = session["started"] or 0.0

    async def _withdraw(self, session_id: str) -> None:
        try:
            await self.pool.delete(session_id)
        except CloudGPUError:
            pass  # already gone; nothing is held

    async def release(self, grant: Grant) -> None:
        """Stop the session at the pool: the kernel goes, the GPUs are free at once."""
        if grant.session_id:
            await self._withdraw(grant.session_id)

    async def ended_reason(self, grant: Grant) -> str | None:
        """The pool's stop reason for the session (idleness, budget, a lost node, ...).

        The pool probes the kernel first: this is asked when the connection to it failed,
        before the pool's own checks may have seen why.
        """
        if not grant.session_id:
            return None
        try:
            session = await self.pool.session(grant.session_id, check=True)
        except CloudGPUError:
            return None
        return _stop_reason(session)

    async def warnings(self, grant: Grant) -> list[str]:
        """Budget warnings the pool has for the session."""
        return (await self.news(grant))[0]

    async def news(self, grant: Grant) -> tuple[list[str], str | None]:
        """The session's budget warnings, and its stop reason if the pool ended it (a host
        it judged lost, whose kernel this client still reaches)."""
        if not grant.session_id:
            return [], None
        try:
            session = await self.pool.session(grant.session_id)
        except CloudGPUError:
            return [], None
        return list(session.get("warnings", [])), _stop_reason(session)

    async def hardware(self) -> list[dict[str, Any]]:
        """The pool's hardware list (``GET /api/hardware``)."""
        return await self.pool.hardware()

    async def sessions(self) -> list[dict[str, Any]]:
        """Your active sessions at the pool (``GET /api/sessions``)."""
        return await self.pool.sessions()

    async def cost(self) -> dict[str, Any]:
        """Today's spending at the pool (``GET /api/cost``)."""
        return await self.pool.cost()

    async def metrics(self) -> dict[str, dict[str, Any]]:
        """Live readings of your running sessions (``GET /api/metrics``)."""
        return await self.pool.metrics()

    async def session(self, session_id: str) -> dict[str, Any]:
        """One of your sessions, active or ended (``GET /api/sessions/{id}``)."""
        return await self.pool.session(session_id)

    async def stop(self, session_id: str) -> dict[str, Any]:
        """Stop one of your sessions (``DELETE /api/sessions/{id}``)."""
        return await self.pool.delete(session_id)

    async def aclose(self) -> None:
        """Close the HTTP client (sessions are released by the client first)."""
        await self.pool.aclose()


def _stop_reason(session: Mapping[str, Any]) -> str | None:
    """Why the pool ended a session, from its view; None while it runs."""
    return session.get("stop_reason") if session["state"] != "running" else None


def _grant(session: Mapping[str, Any]) -> Grant:
    """The grant a running session's view stands for."""
    return Grant(host_url=session["host_url"], token=session["token"],
                 kernel_id=session["kernel_id"],
                 hardware=f"{session['gpu_type']}:{session['count']}",
                 gpus=session["gpus"], simulated=session["simulated"],
                 session_id=session["id"], rate_per_hour=session["rate_per_hour"] or 0.0,
                 started=session["started"] or 0.0,
                 environment=list(session.get("environment") or []))
