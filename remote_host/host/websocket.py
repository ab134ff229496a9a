"""The host's kernel websocket: Jupyter's, with Nagle off, copy-free big messages and replay.

Any Jupyter client can connect as to Jupyter Server. A client that asks for replay
(``/api/kernels/{id}/channels?session_id=S&cloudgpu_since=N``, as cloudgpu's does) gets
the same ZMQ channels back across connections, and what it missed (see ``replay.py``).
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection
from tornado import web
from tornado.websocket import WebSocketClosedError

from cloudgpu._wire import SUBPROTOCOL, v1_offsets

from .replay import Frame, ReplaySession, frame_size, v1_frame

__all__ = ["HostWebsocketConnection"]

_DIRECT_MIN = 1 << 20  # messages this big skip the copies (see write_frame)
_DEATH_LOOK = 0.1  # seconds between looks for the kernel's end while a client waits to open


class HostWebsocketConnection(ZMQChannelsWebsocketConnection):
    """Jupyter's kernel websocket connection, made for programs driving remote kernels.

    - Nagle's algorithm is off: tornado leaves it on, so a small message sent right after
      another waits for the peer's delayed ACK, about 40 ms on every cell.
    - Big messages are written part by part: Jupyter joins a v1 message into one bytes
      object and tornado copies it once more into a websocket frame, which for a 4 MiB
      variable chunk was most of the host's work (35% in tornado's frame copy, by py-spy).
    - With ``cloudgpu_since``, the connection attaches to the session's
      :class:`~.replay.ReplaySession` instead of opening channels of its own.
    - A kernel that ends while a client waits to open (its process died just before, and
      the host noticed only after the client came) is refused with 404 and how it ended,
      instead of holding the client for ``kernel_info_timeout`` (60 s) on a kernel that
      will never answer.
    """

    replay: ReplaySession | None = None

    def _since(self) -> int | None:
        text = self.websocket_handler.get_argument("cloudgpu_since", None)
        if text is None:
            return None
        try:
            return max(int(text), 0)
        except ValueError:
            return None

    async def prepare(self) -> None:
        """Wait for the kernel to answer, as Jupyter does, or for it to end (404)."""
        waiting = asyncio.ensure_future(super().prepare())
        ended = self.multi_kernel_manager.ended
        while not waiting.done():
            await asyncio.wait([waiting], timeout=_DEATH_LOOK)
            how = ended.get(self.kernel_id)
            if how is not None and not waiting.done():
                waiting.cancel()
                raise web.HTTPError(404, reason=f"Kernel {self.kernel_id} ended: "
                                    f"{how.get('reason') or how.get('state')}")
        waiting.result()

    def connect(self) -> Any:
        """Connect to the kernel's ZMQ channels (the session's own, when it replays)."""
        self.websocket_handler.set_nodelay(True)
        km = self.multi_kernel_manager
        km.websockets.setdefault(self.kernel_id, set()).add(self)
        since = self._since()
        if since is None:
            return super().connect()
        km.notify_connect(self.kernel_id)
        ZMQChannelsWebsocketConnection._open_sockets.add(self)
        existing: ReplaySession | None = km.replay_sessions.get(self.session_key)
        replay: ReplaySession
        if existing is None:
            self.create_stream()
            replay = km.open_replay_session(self.kernel_id, self.session_key, self.channels)
            connected = self.nudge()  # fresh channels: make sure iopub is subscribed first
        else:
            replay, self.channels = existing, existing.channels
            connected = asyncio.get_running_loop().create_future()
            connected.set_result(None)
        self.replay = replay

        def attach(_: Any) -> None:
            if self.replay is replay and self.websocket_handler.ws_connection is not None:
                replay.listen(lambda parts: self.session.feed_identities(parts))
                replay.attach(self, since)

        connected.add_done_callback(attach)
        return connected

    # --- to the client ---------------------------------------------------------------------

    def write_frame(self, frame: Frame) -> None:
        """Write one v1 frame now: big ones part by part, without copies."""
        ws = getattr(self.websocket_handler, "ws_connection", None)
        if ws is None or ws.is_closing():
            return  # a replaying session keeps it; the next connection gets it
        size = frame_size(frame)
        if (size < _DIRECT_MIN or getattr(ws, "_compressor", None) is not None
                or getattr(ws, "mask_outgoing", True)):
            try:
                self.websocket_handler.write_message(b"".join(frame), binary=True)
            except WebSocketClosedError:
                pass  # as above: kept for the next connection, or gone with this client
            return
        head = struct.pack("!BBQ", 0x80 | 0x2, 127, size)  # FIN, binary, 64-bit length
        ws.stream.write(head + frame[0] + frame[1])
        for part in frame[2:]:
            ws.stream.write(part)

    def close_socket(self, code: int, reason: str) -> None:
        """Close the websocket with ``code`` and ``reason``."""
        self.websocket_handler.close(code, reason)

    def _on_zmq_reply(self, stream: Any, msg_list: list[bytes]) -> None:
        """A kernel message for a client without replay, through the copy-free path (v1)."""
        if stream.closed() or self.subprotocol != SUBPROTOCOL:
            super()._on_zmq_reply(stream, msg_list)  # Jupyter's own: a closed stream, JSON
            return
        self.write_frame(v1_frame(getattr(stream, "channel", ""), msg_list))

    @property
    def write_message(self) -> Any:
        """Jupyter Server's own messages (a kernel's status, a warning) to the client.

        A replaying session numbers them with the kernel's, so both sides count alike.
        """
        if self.replay is None:
            return self.websocket_handler.write_message

        def write(message: bytes | str, binary: bool = False) -> None:
            if self.replay is not None and isinstance(message, bytes):
                self.replay.send([message])

        return write

    # --- from the client -------------------------------------------------------------------

    def handle_incoming_message(self, incoming_msg: Any) -> None:
        """Relay one client message to the kernel; a malformed one is dropped, logged, and
        so is every message for a kernel being shut down (it must not start a cell).

        A shell request counts as the kernel's activity as it is relayed (the pool's idle
        check asks the host, see ``GPUKernelManager.claim_idle``). A replaying session
        counts every message, malformed or dropped, as the client counted it sent.
        """
        if self.replay is not None:
            self.replay.log.received += 1
        km = self.multi_kernel_manager
        if self.kernel_id in km.stopping:
            self.log.info("Dropped a message for kernel %s: it is being shut down",
                          self.kernel_id)
            return
        try:
            if self.subprotocol == SUBPROTOCOL:
                if not isinstance(incoming_msg, bytes):
                    raise TypeError("the v1 protocol carries binary messages only")
                # Checked before Jupyter Server trusts its offset count.
                msg_type = _v1_shell_type(incoming_msg, v1_offsets(incoming_msg))
            else:
                msg_type = _json_shell_type(incoming_msg)
            if msg_type:
                km.note_request(self.kernel_id, msg_type)
            super().handle_incoming_message(incoming_msg)
        except Exception as e:  # a bad message must not end the connection or the kernel
            self.log.warning("Dropped a malformed message for kernel %s: %s: %s",
                             self.kernel_id, type(e).__name__, e)

    # --- the end ---------------------------------------------------------------------------

    def disconnect(self) -> Any:
        """Forget this connection; a replaying session keeps its channels for the next one."""
        km = self.multi_kernel_manager
        km.websockets.get(self.kernel_id, set()).discard(self)
        replay, self.replay = self.replay, None
        if replay is None:
            return super().disconnect()
        replay.detach(self)
        km.notify_disconnect(self.kernel_id)
        if self._open_sessions.get(self.session_key) is self.websocket_handler:
            self._open_sessions.pop(self.session_key)
        if self.kernel_info_channel is not None and not self.kernel_info_channel.closed():
            self.kernel_info_channel.close()
        self.kernel_info_channel = None
        self.channels = {}  # the session's, not ours to close
        ZMQChannelsWebsocketConnection._open_sockets.discard(self)
        if not self._close_future.done():
            self._close_future.set_result(None)
        return None


def _v1_shell_type(message: bytes, offsets: list[int]) -> str | None:
    """The ``msg_type`` of a v1 message on the shell channel; None on other channels."""
    if message[offsets[0]:offsets[1]] != b"shell":
        return None
    return _msg_type(message[offsets[1]:offsets[2]])


def _json_shell_type(message: str | bytes) -> str | None:
    """The ``msg_type`` of a JSON protocol message on the shell channel (a message without
    a channel goes to the shell, as Jupyter Server sends it); None otherwise."""
    if not isinstance(message, str):
        return None  # Jupyter Server's own binary form: its parser says what is wrong
    try:
        msg = json.loads(message)
        if (msg.get("channel") or "shell") != "shell":
            return None
        return str(msg["header"]["msg_type"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # Jupyter Server's parser says what is wrong


def _msg_type(header: bytes) -> str | None:
    try:
        return str(json.loads(header)["msg_type"])
    except (ValueError, KeyError, TypeError):
        return None
