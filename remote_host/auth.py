"""Token authentication for the host: every HTTP and websocket request, compared in constant time."""

from __future__ import annotations

import hmac
from typing import Any

from jupyter_server.auth.identity import IdentityProvider, User
from tornado import web

__all__ = ["HostIdentityProvider"]

_DENIED = (
    "This cloudgpu host requires its token: send `Authorization: token <TOKEN>`. "
    "The token given is {what}. Use the token the host was started with "
    "(`cloudgpu host --token`, or the one your pool granted)."
)


class HostIdentityProvider(IdentityProvider):
    """Accept a request only when it carries the host token; refuse everything else with 403.

    Unlike Jupyter's default provider there is no login page or cookie: a host is driven by
    programs, and each request proves itself. Tokens are compared with ``hmac.compare_digest``
    and never written to the log.
    """

    def get_user(self, handler: web.RequestHandler) -> User:  # type: ignore[override]
        """Return the host's single user, or raise 403 saying what was wrong."""
        given = self.get_token(handler)
        if not given:
            raise web.HTTPError(403, reason="Forbidden", log_message=_DENIED.format(what="missing"))
        if not self.token or not hmac.compare_digest(given.encode(), self.token.encode()):
            raise web.HTTPError(403, reason="Forbidden", log_message=_DENIED.format(what="wrong"))
        handler._token_authenticated = True  # type: ignore[attr-defined]
        return User(username="cloudgpu", name="cloudgpu")

    def is_token_authenticated(self, handler: web.RequestHandler) -> bool:
        """Every admitted request is token-authenticated: no xsrf cookie, no origin check."""
        return True

    def should_check_origin(self, handler: web.RequestHandler) -> bool:
        """Token-authenticated clients are programs, not browsers: skip the origin check."""
        return False

    def get_handlers(self) -> list[tuple[str, Any]]:
        """No login or logout pages on a host."""
        return []
