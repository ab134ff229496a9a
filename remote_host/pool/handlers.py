"""The pool's REST API under ``/api/``: hardware, sessions, cost. Every request names its user."""

from __future__ import annotations

import functools
import hmac
import json
import math
from collections.abc import Awaitable, Callable
from typing import Any

from tornado import web

from cloudgpu import __version__
from cloudgpu.environment import check_requirements
from cloudgpu.errors import (
    AuthenticationError,
    CloudGPUError,
    InvalidRequestError,
    RequestTooLargeError,
    TooManyAttemptsError,
    error_body,
    http_status,
)

from ..throttle import BadTokenThrottle
from .service import Pool

__all__ = ["POOL_HANDLERS"]


def api(method: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Answer a cloudgpu error with its message and the HTTP status that fits it."""

    @functools.wraps(method)
    async def wrapper(self: PoolHandler, *args: Any) -> None:
        try:
            await method(self, *args)
        except CloudGPUError as e:
            self.write_json(error_body(e), http_status(e))

    return wrapper


class PoolHandler(web.RequestHandler):
    """Authenticates every request and answers errors as JSON ``{"message": ...}``."""

    user: str

    @property
    def pool(self) -> Pool:
        return self.settings["pool"]  # type: ignore[no-any-return]

    def prepare(self) -> None:
        """Find the user the token belongs to, in constant time; 403 otherwise, and 429 for
        an address that keeps sending wrong tokens (see ``remote_host/throttle.py``).

        A body over ``max_body_size`` is refused (413) before anything else.
        """
        limit = self.settings["max_body_size"]
        if len(self.request.body or b"") > limit:
            raise RequestTooLargeError(
                f"The request body is {len(self.request.body):,} bytes; this pool accepts at "
                f"most {limit:,} (PoolApp.max_body_size).")
        header = self.request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() not in ("token", "bearer"):
            given = self.get_query_argument("token", "")
        user = None
        for token, name in self.settings["users"].items():
            if given and hmac.compare_digest(given.encode(), token.encode()):
                user = name
        if user is None:
            throttle: BadTokenThrottle = self.settings["throttle"]
            address = self.request.remote_ip or "?"
            refusal = throttle.refusal(address)
            if refusal:
                raise TooManyAttemptsError(refusal)
            throttle.failed(address)
            raise AuthenticationError(
                f"This cloudgpu pool needs a valid token (`Authorization: token T`); the one "
                f"given is {'wrong' if given else 'missing'}. Set CLOUDGPU_TOKEN to the token "
                f"the pool's operator gave you.")
        self.user = user

    def write_json(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body, default=str))

    def body(self) -> dict[str, Any]:
        if not self.request.body:
            return {}
        try:
            data = json.loads(self.request.body)
        except ValueError:
            raise InvalidRequestError("The request body is not JSON.") from None
        if not isinstance(data, dict):
            raise InvalidRequestError("The request body must be a JSON object.")
        return data

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Every error in the shared wire convention (``cloudgpu.errors.error_body``)."""
        exc = kwargs.get("exc_info", (None, None))[1]
        if isinstance(exc, CloudGPUError):  # raised outside `api` (authentication)
            self.set_status(http_status(exc))
            body = error_body(exc)
        else:  # tornado's own: an unknown route, a wrong method
            message = exc.log_message if isinstance(exc, web.HTTPError) and exc.log_message \
                else self._reason
            body = {"error": "CloudGPUError", "message": message, "status": status_code}
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))



class InfoHandler(PoolHandler):
    """``GET /api/pool``: who you are and what the pool is."""

    @api
    async def get(self) -> None:
        slots = self.pool.scheduler.slots.values()
        self.write_json({"cloudgpu": __version__, "user": self.user,
                         "backend": self.pool.backend.name, "hosts": len(slots),
                         "simulated": any(s.simulated for s in slots),
                         "idle_timeout": self.pool.idle_timeout,
                         "daily_limit": self.pool.limit_for(self.user) or None})


class HardwareHandler(PoolHandler):
    """``GET /api/hardware``: every type with free/total, price and queue length."""

    @api
    async def get(self) -> None:
        self.write_json({"hardware": self.pool.hardware()})


class SessionsHandler(PoolHandler):
    """``GET /api/sessions`` (yours, less holds no cell took) and ``POST /api/sessions``
    ``{"hardware": "H100"}`` (also ``max_cost``, ``idle_timeout``, ``notebook``, and
    ``environment``: a list of pip requirement strings the kernel needs)."""

    @api
    async def get(self) -> None:
        pool = self.pool
        show_all = self.get_query_argument("all", "0") not in ("0", "false", "")
        records = [r for r in pool.ledger.for_user(self.user)
                   if (show_all or r.active) and not r.unclaimed_hold]
        self.write_json({"sessions": [pool.view(r, with_token=False) for r in records]})

    @api
    async def post(self) -> None:
        body = self.body()
        hardware = body.get("hardware")
        if not isinstance(hardware, str):
            raise InvalidRequestError('Give the hardware: {"hardware": "H100"}.')
        rec = await self.pool.create(
            self.user, hardware, max_cost=_number(body, "max_cost"),
            idle_timeout=_number(body, "idle_timeout"), notebook=body.get("notebook"),
            environment=check_requirements(body.get("environment")),
        )
        self.write_json(self.pool.view(rec, with_token=True), 201)


class HoldsHandler(PoolHandler):
    """``POST /api/holds`` ``{"hardware": "cpu", "seconds": 120, "notebook": ...}``: hold a
    ready warm CPU kernel for a first cell (see ``Pool.hold``); 409 when none is ready."""

    @api
    async def post(self) -> None:
        body = self.body()
        hardware, seconds = body.get("hardware", "cpu"), _number(body, "seconds")
        if not isinstance(hardware, str) or seconds is None:
            raise InvalidRequestError('Give the hardware and seconds: '
                                      '{"hardware": "cpu", "seconds": 120}.')
        rec = await self.pool.hold(self.user, hardware, seconds, notebook=body.get("notebook"))
        self.write_json(self.pool.view(rec, with_token=True), 201)


class ClaimHandler(PoolHandler):
    """``POST /api/sessions/{id}/claim`` ``{"max_cost": ..., "idle_timeout": ...}``: a cell
    takes its held session, which is billed from now (see ``Pool.claim``)."""

    @api
    async def post(self, session_id: str) -> None:
        body = self.body()
        rec = await self.pool.claim(self.user, session_id, max_cost=_number(body, "max_cost"),
                                    idle_timeout=_number(body, "idle_timeout"))
        self.write_json(self.pool.view(rec, with_token=True))


class SessionHandler(PoolHandler):
    """``GET /api/sessions/{id}[?wait=S&version=V]`` (long poll) and ``DELETE`` (stop).

    ``?check=1`` first probes the session's kernel (a client that lost its connection asks
    this), so that a kernel that is gone shows as a stopped session with the reason.
    """

    @api
    async def get(self, session_id: str) -> None:
        pool = self.pool
        pool.get(self.user, session_id)
        if self.get_query_argument("check", "0") not in ("0", "false", ""):
            await pool.check(session_id)
        try:
            wait = min(float(self.get_query_argument("wait", "0") or 0), 60.0)
            version = int(self.get_query_argument("version", "-1"))
        except ValueError:
            raise InvalidRequestError("`wait` must be seconds and `version` an integer: "
                                      "?wait=20&version=3.") from None
        if wait > 0:
            await pool.wait(session_id, version, wait)
        self.write_json(pool.view(pool.get(self.user, session_id), with_token=True))

    @api
    async def delete(self, session_id: str) -> None:
        self.pool.get(self.user, session_id)
        rec = await self.pool.stop(session_id, "stopped by its owner")
        self.write_json(self.pool.view(rec, with_token=False))


class CostHandler(PoolHandler):
    """``GET /api/cost``: today's spending, by notebook and by session."""

    @api
    async def get(self) -> None:
        self.write_json(self.pool.cost_report(self.user))


class MetricsHandler(PoolHandler):
    """``GET /api/metrics``: live GPU readings of your running sessions, by session id."""

    @api
    async def get(self) -> None:
        self.write_json({"metrics": await self.pool.metrics(self.user)})


def _number(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequestError(f"`{key}` must be a number (finite), not {value!r}.")
    return float(value)


POOL_HANDLERS: list[tuple[str, type[PoolHandler]]] = [
    (r"/api/pool", InfoHandler),
    (r"/api/hardware", HardwareHandler),
    (r"/api/sessions", SessionsHandler),
    (r"/api/sessions/([0-9a-f]+)", SessionHandler),
    (r"/api/sessions/([0-9a-f]+)/claim", ClaimHandler),
    (r"/api/holds", HoldsHandler),
    (r"/api/cost", CostHandler),
    (r"/api/metrics", MetricsHandler),
]
