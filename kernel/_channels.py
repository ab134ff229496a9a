"""The local side of the proxy: the ZMQ sockets a Jupyter frontend connects to.

Binds shell, control and stdin (ROUTER), iopub (PUB) and the heartbeat (ROUTER echo)
from a connection file, verifies each incoming signature and signs each outgoing
message with the connection file's key, as ipykernel does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.session import Session

__all__ = ["LocalChannels", "Received"]

log = logging.getLogger("cloudgpu.kernel")

#: (channel, ZMQ identities of the sender, the message) for every request from a frontend.
Received = Callable[[str, list[bytes], dict[str, Any]], Awaitable[None]]

_ROUTERS = ("shell", "control", "stdin")


def _address(info: dict[str, Any], channel: str) -> str:
    transport = info.get("transport", "tcp")
    port = info[f"{channel}_port"]
    ip = info.get("ip", "127.0.0.1")
    return f"ipc://{ip}-{port}" if transport == "ipc" else f"tcp://{ip}:{port}"


class LocalChannels:
    """The kernel's sockets, bound to the ports of a connection file.

    Args:
        info: the parsed connection file.
        on_message: awaited for each valid message on shell, control and stdin.
    """

    def __init__(self, info: dict[str, Any], on_message: Received) -> None:
        self.session = Session(key=info.get("key", "").encode(),
                               signature_scheme=info.get("signature_scheme", "hmac-sha256"),
                               username="kernel")
        self.ident = info.get("kernel_name") or "cloudgpu"
        self._on_message = on_message
        self._context = zmq.asyncio.Context()
        self.sockets: dict[str, zmq.asyncio.Socket] = {}
        for channel in _ROUTERS:
            self.sockets[channel] = self._bind(zmq.ROUTER, info, channel)
        self.sockets["iopub"] = self._bind(zmq.PUB, info, "iopub")
        self.sockets["hb"] = self._bind(zmq.ROUTER, info, "hb")
        self._senders: dict[str, zmq.Socket[bytes]] = {
            channel: zmq.Socket.shadow(socket.underlying)
            for channel, socket in self.sockets.items()
        }
        self._tasks: list[asyncio.Task[None]] = []

    def _bind(self, kind: int, info: dict[str, Any], channel: str) -> zmq.asyncio.Socket:
        socket = self._context.socket(kind)
        socket.linger = 1000
        if kind == zmq.ROUTER:
            socket.router_handover = 1  # a frontend that reconnects keeps its identity
        socket.bind(_address(info, channel))
        return socket

    def start(self) -> None:
        """Start reading every socket and answering heartbeats."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read(c)) for c in _ROUTERS]
        self._tasks.append(loop.create_task(self._heartbeat()))

    async def _heartbeat(self) -> None:
        hb = self.sockets["hb"]
        while True:
            await hb.send_multipart(await hb.recv_multipart())

    async def _read(self, channel: str) -> None:
        socket = self.sockets[channel]
        while True:
            parts = await socket.recv_multipart()
            try:
                idents, rest = self.session.feed_identities(parts)
                msg = self.session.deserialize(rest, content=True)
            except (ValueError, KeyError, TypeError) as e:  # bad signature or malformed: drop it
                log.warning("Dropped an invalid message on %s: %s", channel, e)
                continue
            try:
                await self._on_message(channel, idents, msg)
            except Exception:
                log.exception("Handling %s on %s failed", msg["header"].get("msg_type"), channel)

    def send(self, channel: str, msg: dict[str, Any], idents: list[bytes] | None = None) -> None:
        """Sign and send one message now, with its buffers; on iopub the topic replaces ``idents``.

        ROUTER and PUB sockets never block on send (they drop past the high-water mark),
        so this sends at once, in call order, through a synchronous view of the socket.
        """
        if channel == "iopub":
            idents = [f"kernel.{self.ident}.{msg['header']['msg_type']}".encode()]
        parts = self.session.serialize(msg, ident=idents)
        self._senders[channel].send_multipart([*parts, *msg.get("buffers", ())], copy=False)

    def message(self, msg_type: str, content: dict[str, Any],
                parent: dict[str, Any] | None = None) -> dict[str, Any]:
        """A new message from this kernel, a reply to ``parent`` when given."""
        return self.session.msg(msg_type, content, parent=parent or {})

    def publish(self, msg_type: str, content: dict[str, Any],
                parent: dict[str, Any] | None = None) -> None:
        """Publish on iopub, parented to ``parent`` (a request's header)."""
        self.send("iopub", self.message(msg_type, content, parent))

    async def close(self) -> None:
        """Stop reading and close every socket."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for socket in self.sockets.values():
            socket.close(linger=500)
        self._context.term()
