"""Token authentication for the host: every HTTP and websocket request, compared in constant time.

Two kinds of token open a host. The host token (``--token``) opens everything; a pool
holds it. A scoped token, registered by the pool when it starts a kernel for a session,
opens only that kernel: its REST resource, its websocket channels, its side channel for
big values, interrupt and restart.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import re
from typing import Any

from jupyter_server.auth.identity import IdentityProvider, User
from tornado import web
from traitlets import Float, Integer

from ..throttle import BadTokenThrottle

__all__ = ["HostIdentityProvider"]

_DENIED = (
    "This cloudgpu host requires its token: send `Authorization: token <TOKEN>`. "
    "The token given is {what}. Use the token the host was started with "
    "(`cloudgpu host --token`, or the one your pool granted)."
)
#: What a scoped token may open, after the base URL: its kernel's resource and actions.
_KERNEL_ROUTE = re.compile(
    r"api/(?:cloudgpu/)?kernels/(?P<id>[0-9a-fA-F-]+)(?:/channels|/side|/interrupt|/restart)?/?"
)


ENDED_KEPT = 1000  # revoked scoped tokens remembered, to tell their holders why


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class HostIdentityProvider(IdentityProvider):
    """Accept a request only with the host token, or a kernel's scoped token on that kernel.

    Unlike Jupyter's default provider there is no login page or cookie: a host is driven by
    programs, and each request proves itself. Tokens are compared with ``hmac.compare_digest``
    and never written to the log; scoped tokens are kept only as SHA-256 digests.
    """

    bad_tokens_allowed = Integer(
        10, help="Wrong tokens one address may present per bad_token_window before its "
        "wrong tokens are answered 429 (a right token is always accepted)."
    ).tag(config=True)
    bad_token_window = Float(60.0, help="Seconds over which wrong tokens are counted.").tag(
        config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._scoped: dict[bytes, str] = {}
        self._ended: collections.OrderedDict[bytes, str] = collections.OrderedDict()
        self.throttle = BadTokenThrottle(self.bad_tokens_allowed, self.bad_token_window)

    def add_scoped_token(self, token: str, kernel_id: str) -> None:
        """Let ``token`` open ``kernel_id`` and nothing else."""
        self._scoped[_digest(token)] = kernel_id

    def forget_kernel(self, kernel_id: str) -> None:
        """Revoke the scoped tokens of a kernel that is gone (remembered, to say so)."""
        for key in [k for k, v in self._scoped.items() if v == kernel_id]:
            del self._scoped[key]
            self._ended[key] = kernel_id
        while len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)

    def get_user(self, handler: web.RequestHandler) -> User:
        """Return who the token belongs to, or raise 403 saying what was wrong.

        An address that keeps presenting wrong tokens is answered 429 for a while.
        """
        given = self.get_token(handler)
        address = handler.request.remote_ip or "?"
        if self.token and given and hmac.compare_digest(given.encode(), self.token.encode()):
            handler._token_authenticated = True  # type: ignore[attr-defined]
            return User(username="cloudgpu", name="cloudgpu")
        digest = _digest(given or "")
        kernel_id = next((k for d, k in self._scoped.items() if hmac.compare_digest(d, digest)),
                         None) if given else None
        if kernel_id is None and given and digest in self._ended:
            raise web.HTTPError(403, reason="Forbidden", log_message=(
                f"The kernel this token opened ({self._ended[digest]}) has ended; the token "
                f"no longer opens anything. Ask the pool for a new session."))
        if kernel_id is None:
            refusal = self.throttle.refusal(address)
            if refusal:
                raise web.HTTPError(429, reason="Too Many Requests", log_message=refusal)
            self.throttle.failed(address)
            raise web.HTTPError(403, reason="Forbidden", log_message=_DENIED.format(
                what="wrong" if given else "missing"))
        base = handler.settings.get("base_url", "/")
        path = handler.request.path
        match = _KERNEL_ROUTE.fullmatch(path[len(base):]) if path.startswith(base) else None
        if match is None or match.group("id") != kernel_id:
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
