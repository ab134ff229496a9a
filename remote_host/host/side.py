"""The host's end of the side channel (see ``cloudgpu._side``): authenticate, then step aside.

``GET /api/kernels/{id}/side?channel=C`` with ``Upgrade: cloudgpu-side`` is authenticated
like the kernel's websocket (the host token, or the token scoped to that kernel). The host
answers ``101 Switching Protocols`` and hands the connection to the kernel's agent over
the Unix socket beside the kernel's connection file: a plain TCP socket is passed as a
file descriptor, so the bytes never pass through the host; a TLS connection is relayed,
decrypted, through a fixed buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from pathlib import Path
from typing import Any, cast

from tornado import web
from tornado.iostream import IOStream, SSLIOStream, StreamClosedError

from cloudgpu._side import PROTOCOL
from cloudgpu.errors import InvalidRequestError, SessionNotFoundError

from .agent_side import socket_path
from .handlers import CloudGPUHandler
from .kernels import GPUKernelManager

__all__ = ["SideChannelHandler", "agent_socket"]

_CHANNEL = re.compile(r"[0-9a-f]{32}")
RELAY_BUFFER = 4 * 2**20


def agent_socket(km: GPUKernelManager, kernel_id: str) -> Path:
    """Where the agent of ``kernel_id`` listens for side channels, as the host sees it."""
    folder = km.sandbox.socket_dir(kernel_id)
    if folder is not None:  # a sandboxed kernel's own folder, holding its kernel.json
        return socket_path(folder / "kernel.json")
    return socket_path(km.get_kernel(kernel_id).connection_file)


class _Unavailable(Exception):
    """The kernel has no side channel now (it is starting, or its agent could not listen)."""


class SideChannelHandler(CloudGPUHandler):
    """``GET /api/kernels/{id}/side?channel=C``: this connection, upgraded, to the agent."""

    @web.authenticated
    async def get(self, kernel_id: str) -> None:
        km = cast(GPUKernelManager, self.kernel_manager)
        channel = self.get_query_argument("channel", "")
        if not km.side_channel:
            self.set_status(404)
            self.finish(json.dumps({"message": "The side channel is turned off on this host "
                                    "(GPUKernelManager.side_channel); transfers use the "
                                    "kernel websocket."}))
            return
        if kernel_id not in km:
            self.write_cloudgpu_error(SessionNotFoundError(
                f"This host has no kernel `{kernel_id}`."))
            return
        if self.request.headers.get("Upgrade", "").lower() != PROTOCOL \
                or not _CHANNEL.fullmatch(channel):
            self.write_cloudgpu_error(InvalidRequestError(
                f"Ask for the side channel with `Upgrade: {PROTOCOL}` and "
                f"`?channel=<32 hex digits>`."))
            return
        try:
            agent = await _connect_agent(agent_socket(km, kernel_id))
        except _Unavailable as e:
            self.set_status(503)
            self.finish(json.dumps({"message": str(e)}))
            return
        stream = self.detach()
        try:
            await stream.write(f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: {PROTOCOL}\r\n"
                               f"Connection: Upgrade\r\n\r\n".encode())
            hello = json.dumps({"channel": channel}).encode()
            if isinstance(stream, SSLIOStream):
                await asyncio.get_running_loop().sock_sendall(agent, hello)
                await _relay(stream, IOStream(agent))
                return
            socket.send_fds(agent, [hello], [stream.socket.fileno()])
        except (OSError, StreamClosedError) as e:
            self.log.warning("Side channel to kernel %s not handed over: %s", kernel_id, e)
        finally:
            if not isinstance(stream, SSLIOStream):
                agent.close()
                stream.close()  # the agent holds its own descriptor of the socket


async def _connect_agent(path: Path) -> socket.socket:
    agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    agent.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(agent, str(path))
    except OSError as e:
        agent.close()
        raise _Unavailable(f"The kernel's agent does not serve a side channel now ({e}); "
                           f"transfers use the kernel websocket.") from e
    return agent


async def _relay(client: IOStream, agent: IOStream) -> None:
    """Copy bytes both ways until either side closes, then close both."""
    async def pump(source: IOStream, sink: IOStream) -> None:
        buffer = bytearray(RELAY_BUFFER)
        view = memoryview(buffer)
        with contextlib.suppress(StreamClosedError):
            while True:
                n = await source.read_into(buffer, partial=True)
                await sink.write(view[:n])

    pumps = [asyncio.ensure_future(pump(client, agent)), asyncio.ensure_future(pump(agent, client))]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        client.close()
        agent.close()
        await asyncio.gather(*pumps, return_exceptions=True)


HANDLERS: list[tuple[str, Any]] = [(r"/api/kernels/([0-9a-fA-F-]+)/side", SideChannelHandler)]
