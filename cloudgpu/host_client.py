"""Talking to one host: its REST API (httpx) and a kernel's websocket (websockets)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.parse
from collections.abc import Callable
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from . import _wire
from ._http import async_client, tls_context
from .errors import (
    AuthenticationError,
    CloudGPUError,
    HostConnectionError,
    RemoteKernelDiedError,
    error_from_wire,
)

__all__ = ["HostClient", "KernelConnection", "error_from_response"]

log = logging.getLogger("cloudgpu.client")

#: Receives each message: (channel, message); ("", {}) for one that could not be decoded,
#: so that a receiver counting messages counts it too.
Handler = Callable[[str, _wire.Message], None]


class HostClient:
    """The REST side of a host: inventory, kernels with GPUs, interrupt, shutdown.

    Args:
        url: the host's base URL, ``http://127.0.0.1:8899/``.
        token: the host token, or a token a pool scoped to one kernel.
    """

    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self._http = async_client(self.url, token, httpx.Timeout(60.0, connect=10.0))

    async def request(self, method: str, path: str, json: Any = None,
                      missing_ok: bool = False) -> Any:
        """One REST call; errors come back as the cloudgpu errors the host named.

        With ``missing_ok``, a 404 returns None instead of raising.

        Raises:
            HostConnectionError: the host cannot be reached.
            AuthenticationError: the host refused the token.
            CloudGPUError: another subclass, as the host answered (see ``errors.error_from_wire``).
        """
        try:
            response = await self._http.request(method, path, json=json)
        except httpx.HTTPError as e:
            raise HostConnectionError(
                f"Cannot reach the cloudgpu host at {self.url}: {e.__class__.__name__}: {e}. "
                f"Is it running?"
            ) from e
        if response.status_code == 404 and missing_ok:
            return None
        if response.status_code >= 400:
            error = error_from_response(response)
            if isinstance(error, AuthenticationError):  # the subclass stays (too many tries)
                raise type(error)(f"The host at {self.url} refused our token "
                                  f"({response.status_code}): {error}")
            raise error
        return response.json() if response.content else None

    async def info(self) -> dict[str, Any]:
        """``GET /api/cloudgpu/host``: versions and inventory."""
        return await self.request("GET", "/api/cloudgpu/host")  # type: ignore[no-any-return]

    async def start_kernel(self, hardware: str, scoped_token: str | None = None,
                           environment: list[str] | None = None) -> dict[str, Any]:
        """Start a kernel holding ``hardware``; returns its kernel model.

        With ``scoped_token``, that token will open this kernel (and nothing else); with
        ``environment``, it runs in the environment made for those requirements.
        """
        body: dict[str, Any] = {"hardware": hardware}
        if scoped_token:
            body["scoped_token"] = scoped_token
        if environment:
            body["environment"] = environment
        return await self.request(  # type: ignore[no-any-return]
            "POST", "/api/cloudgpu/kernels", body
        )

    async def prepare_environment(self, requirements: list[str]) -> dict[str, Any]:
        """Have the host prepare (or find cached) the environment for ``requirements``."""
        return await self.request(  # type: ignore[no-any-return]
            "POST", "/api/cloudgpu/environments", {"requirements": requirements}
        )

    async def environment(self, key: str, wait: float = 0.0, version: int = -1,
                          ) -> dict[str, Any]:
        """An environment's state; with ``wait``, once it changed past ``version``."""
        return await self.request(  # type: ignore[no-any-return]
            "GET", f"/api/cloudgpu/environments/{key}?wait={wait}&version={version}"
        )

    async def kernel(self, kernel_id: str) -> dict[str, Any] | None:
        """The kernel's model (state, last activity), or None when the host has no such kernel."""
        return await self.request(  # type: ignore[no-any-return]
            "GET", f"/api/kernels/{kernel_id}", missing_ok=True
        )

    async def kernel_state(self, kernel_id: str) -> dict[str, Any] | None:
        """The kernel's model, or how and when it ended (``cloudgpu.state``); None when the
        host knows nothing of it."""
        return await self.request(  # type: ignore[no-any-return]
            "GET", f"/api/cloudgpu/kernels/{kernel_id}", missing_ok=True
        )

    async def interrupt(self, kernel_id: str) -> None:
        """Interrupt whatever the kernel is running."""
        await self.request("POST", f"/api/kernels/{kernel_id}/interrupt")

    async def shutdown(self, kernel_id: str) -> None:
        """Shut a kernel down (its GPUs are freed), whatever goes wrong doing it."""
        with contextlib.suppress(CloudGPUError):
            await self.stop_kernel(kernel_id)

    async def stop_kernel(self, kernel_id: str) -> None:
        """Shut a kernel down (its GPUs are freed); one the host no longer has is stopped.

        Raises:
            HostConnectionError: the host cannot be reached.
            CloudGPUError: another subclass, as the host answered.
        """
        await self.request("DELETE", f"/api/kernels/{kernel_id}", missing_ok=True)

    async def stop_if_idle(self, kernel_id: str, since: str | None, reason: str) -> bool:
        """Shut a kernel down for ``reason`` unless it was active after ``since`` (its
        ``last_activity`` as last read) or runs something now; whether it is shut down.

        A host without the endpoint (an older one), or without the kernel, says True:
        the caller stops it the plain way, as it did before.

        Raises:
            HostConnectionError: the host cannot be reached.
        """
        answer = await self.request("POST", f"/api/cloudgpu/kernels/{kernel_id}/stop",
                                    {"reason": reason, "if_idle_since": since},
                                    missing_ok=True)
        return answer is None or bool(answer.get("stopped"))

    async def connect(self, kernel_id: str, on_message: Handler, *,
                      session_id: str | None = None, since: int | None = None,
                      ) -> KernelConnection:
        """Open the kernel's websocket; every message received goes to ``on_message``.

        With ``since`` (and the ``session_id`` of the messages we send), the host keeps
        the session's channels across connections and sends first a notice, then what
        the session missed after frame number ``since`` (see remote_host/host/replay.py).
        """
        return await KernelConnection.open(self, kernel_id, on_message,
                                           session_id=session_id, since=since)

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> HostClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _json(body: bytes | bytearray | None) -> dict[str, Any]:
    try:
        data = json.loads(body or b"")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def error_from_response(response: httpx.Response) -> CloudGPUError:
    """The cloudgpu error a failed host or pool response stands for, with its message."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = None
    fallback = f"{response.request.method} {response.request.url.path} failed " \
               f"({response.status_code} {response.reason_phrase}): {response.text[:300]}"
    return error_from_wire(response.status_code, body, fallback)


class KernelConnection:
    """One websocket to one kernel: send messages on any channel, receive them all.

    Transport only: which messages belong to whom is ``cloudgpu.remote.RemoteKernel``'s job.
    """

    def __init__(self, ws: ClientConnection, kernel_id: str, on_message: Handler) -> None:
        self.ws = ws
        self.kernel_id = kernel_id
        self._on_message = on_message
        self._reader = asyncio.get_running_loop().create_task(self._read())
        #: Done once the websocket closed; holds the host's close frame, (code, reason),
        #: when it sent one, or None when the connection just broke.
        self.closed: asyncio.Future[tuple[int, str] | None] = \
            asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, host: HostClient, kernel_id: str, on_message: Handler, *,
                   session_id: str | None = None, since: int | None = None,
                   ) -> KernelConnection:
        """Connect to ``/api/kernels/{id}/channels`` with the v1 framing.

        Raises:
            AuthenticationError: the host refused the token.
            RemoteKernelDiedError: the host has no such kernel (any more).
            HostConnectionError: the host cannot be reached, or answered otherwise.
        """
        query = urllib.parse.urlencode({k: v for k, v in (("session_id", session_id),
                                                          ("cloudgpu_since", since))
                                        if v is not None})
        ws_url = host.url.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels"
        try:
            ws = await connect(
                f"{ws_url}?{query}" if query else ws_url,
                subprotocols=[_wire.SUBPROTOCOL],  # type: ignore[list-item]
                additional_headers={"Authorization": f"token {host.token}"},
                max_size=None, compression=None, ping_interval=10, ping_timeout=20,
                open_timeout=20, ssl=tls_context() if ws_url.startswith("wss:") else None,
            )
        except InvalidStatus as e:
            status, body = e.response.status_code, _json(e.response.body)
            message = str(body.get("message") or e.response.reason_phrase)
            if status in (401, 403, 429):
                raise AuthenticationError(
                    f"The host at {host.url} refused our token for kernel {kernel_id} "
                    f"({status}): {message}") from e
            if status == 404:
                said = f" ({message})" if message and message != "Not Found" else ""
                raise RemoteKernelDiedError(
                    f"The host at {host.url} has no kernel {kernel_id} any more{said}.") from e
            raise HostConnectionError(
                f"The host at {host.url} refused the websocket for kernel {kernel_id}: "
                f"HTTP {status}: {message}"
            ) from e
        except (OSError, WebSocketException, TimeoutError) as e:
            raise HostConnectionError(
                f"Cannot open the kernel websocket at {ws_url}: {e.__class__.__name__}: {e}"
            ) from e
        if ws.subprotocol != _wire.SUBPROTOCOL:
            await ws.close()
            raise HostConnectionError(
                f"The host at {host.url} does not speak {_wire.SUBPROTOCOL}; upgrade "
                f"jupyter_server there (>= 2.10)."
            )
        return cls(ws, kernel_id, on_message)

    async def send(self, channel: str, msg: _wire.Message) -> None:
        """Send one message.

        Raises:
            HostConnectionError: when the connection has dropped.
        """
        await self.send_frame(_wire.encode(channel, msg))

    async def send_frame(self, frame: bytes) -> None:
        """Send one framed message (``_wire.encode``).

        Raises:
            HostConnectionError: when the connection has dropped.
        """
        try:
            await self.ws.send(frame)
        except ConnectionClosed as e:
            raise HostConnectionError(
                f"The connection to kernel {self.kernel_id} dropped: {e}"
            ) from e

    async def _read(self) -> None:
        try:
            async for data in self.ws:
                if isinstance(data, str):
                    continue  # v1 is binary only
                try:
                    channel, msg = _wire.decode(data)
                except (ValueError, UnicodeDecodeError) as e:  # malformed: still "a message"
                    log.warning("Dropped a malformed message from kernel %s: %s",
                                self.kernel_id, e)
                    channel, msg = "", {}
                try:
                    self._on_message(channel, msg)
                except Exception:  # one bad message must not end the connection
                    log.exception("Handling a message from kernel %s failed", self.kernel_id)
        except ConnectionClosed:
            pass
        finally:
            frame = self.ws.protocol.close_rcvd
            if not self.closed.done():
                self.closed.set_result(None if frame is None else (frame.code, frame.reason))

    async def close(self) -> None:
        """Close the websocket."""
        await self.ws.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
