"""Token authentication for the host: every HTTP and websocket request, compared in constant time.

Two kinds of token open a host. The host token (``--token``) opens everything; a pool
holds it. A scoped token, registered by the pool when it starts a kernel for a session,
opens only that kernel: its REST resource, its websocket channels, interrupt and restart.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any

from jupyter_server.auth.identity import IdentityProvider, User
from tornado import web

__all__ = ["HostIdentityProvider"]

_DENIED = (
    "This cloudgpu host requires its token: send `Authorization: token <TOKEN>`. "
    "The token given is {what}. Use the token the host was started with "
    "(`cloudgpu host --token`, or the one your pool granted)."
)
_KERNEL_PATH = re.compile(r"/api/kernels/([0-9a-fA-F-]+)(/channels|/interrupt|/restart)?/?$")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class HostIdentityProvider(IdentityProvider):
    """Accept a request only with the host token, or a kernel's scoped token on that kernel.

    Unlike Jupyter's default provider there is no login page or cookie: a host is driven by
    programs, and each request proves itself. Tokens are compared with ``hmac.compare_digest``
    and never written to the log; scoped tokens are kept only as SHA-256 digests.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._scoped: dict[bytes, str] = {}

    def add_scoped_token(self, token: str, kernel_id: str) -> None:
        """Let ``token`` open ``kernel_id`` and nothing else."""
        self._scoped[_digest(token)] = kernel_id

    def forget_kernel(self, kernel_id: str) -> None:
        """Drop the scoped tokens of a kernel that is gone."""
        for key in [k for k, v in self._scoped.items() if v == kernel_id]:
            del self._scoped[key]

    def get_user(self, handler: web.RequestHandler) -> User:
        """Return who the token belongs to, or raise 403 saying what was wrong."""
        given = self.get_token(handler)
        if not given:
            raise web.HTTPError(403, reason="Forbidden", log_message=_DENIED.format(what="missing"))
        if self.token and hmac.compare_digest(given.encode(), self.token.encode()):
            handler._token_authenticated = True  # type: ignore[attr-defined]
            return User(username="cloudgpu", name="cloudgpu")
        digest = _digest(given)
        kernel_id = next((k for d, k in self._scoped.items() if hmac.compare_digest(d, digest)),
                         None)
        if kernel_id is None:
            raise web.HTTPError(403, reason="Forbidden", log_message=_DENIED.format(what="wrong"))
        match = _KERNEL_PATH.search(handler.request.path)
        if match is None or match.group(1) != kernel_id:
            raise web.HTTPError(
                403, reason="Forbidden",
                log_message="This token is scoped to one kernel and cannot be used for "
                f"{handler.request.method} {handler.request.path}. Ask the pool for a session "
                "of your own.",
            )
        handler._token_authenticated = True  # type: ignore[attr-defined]
        return User(username=f"kernel-{kernel_id}", name="cloudgpu session")

    def is_token_authenticated(self, handler: web.RequestHandler) -> bool:
        """Every admitted request is token-authenticated: no xsrf cookie, no origin check."""
        return True

    def should_check_origin(self, handler: web.RequestHandler) -> bool:
        """Token-authenticated clients are programs, not browsers: skip the origin check."""
        return False

    def get_handlers(self) -> list[tuple[str, Any]]:
        """No login or logout pages on a host."""
        return []
