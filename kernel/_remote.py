"""The remote side of the proxy: one granted kernel and the one websocket that relays to it.

Messages the proxy relays keep the frontend's headers, so the remote kernel's replies and
outputs come back parented to the frontend's requests. Messages this module sends for its
own purposes (the kernel_info handshake, the agent comm for ``snapshot``) use the
connection's own session, and everything parented to them stays here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

from cloudgpu import _wire
from cloudgpu._transfer import Assembler
from cloudgpu.errors import AuthenticationError, CloudGPUError, HostConnectionError
from cloudgpu.host_client import HostClient, KernelConnection
from cloudgpu.serialize import Serialized
from cloudgpu.session import AGENT_TARGET, Grant

__all__ = ["RemoteKernel"]

HANDSHAKE_TIMEOUT = 60.0
WATCH_INTERVAL = 2.0

#: Receives every message the frontend should see: (channel, message).
Forward = Callable[[str, _wire.Message], None]


class RemoteKernel:
    """A granted remote kernel, connected.

    Args:
        grant: what the provider handed out.
        forward: called with every message that is not this object's own business.
    """

    def __init__(self, grant: Grant, forward: Forward) -> None:
        self.grant = grant
        self.forward = forward
        self.host = HostClient(grant.host_url, grant.token)
        self.conn: KernelConnection | None = None
        self.info: dict[str, Any] = {}
        self.started = time.monotonic()
        self._own: dict[str, asyncio.Future[dict[str, Any]]] = {}  # our request id -> reply
        self._agent_comm = ""
        self._snapshots: dict[str, tuple[Assembler, asyncio.Future[dict[str, Any]]]] = {}
        self._watcher: asyncio.Task[None] | None = None

    @property
    def closed(self) -> asyncio.Future[None]:
        """Done when the websocket has closed, for whatever reason."""
        assert self.conn is not None
        return self.conn.closed

    async def connect(self) -> None:
        """Open the websocket and wait until the kernel answers ``kernel_info``.

        Raises:
            HostConnectionError: the host cannot be reached or the kernel does not answer.
        """
        self.conn = await self.host.connect(self.grant.kernel_id, self._on_message)
        reply = await self.request("shell", "kernel_info_request", {}, HANDSHAKE_TIMEOUT)
        self.info = reply["content"]

    async def request(self, channel: str, msg_type: str, content: dict[str, Any],
                      timeout: float) -> _wire.Message:
        """Send a request of our own and wait for its reply."""
        assert self.conn is not None
        msg = self.conn.message(msg_type, content)
        waiter = asyncio.get_running_loop().create_future()
        self._own[msg["header"]["msg_id"]] = waiter
        try:
            await self.conn.send(channel, msg)
            return await asyncio.wait_for(_first(waiter, self.conn.closed), timeout)
        except asyncio.TimeoutError:
            raise HostConnectionError(
                f"The remote kernel {self.grant.kernel_id} on {self.grant.host_url} did not "
                f"answer {msg_type} within {timeout:.0f} s."
            ) from None
        finally:
            self._own.pop(msg["header"]["msg_id"], None)

    async def continue_count(self, execution_count: int) -> None:
        """Number the next cell ``execution_count``, so a switch does not restart at [1]."""
        code = f"get_ipython().execution_count = {int(execution_count)}"
        reply = await self.request("shell", "execute_request", {
            "code": code, "silent": True, "store_history": False, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": False}, HANDSHAKE_TIMEOUT)
        if reply["content"].get("status") != "ok":
            raise CloudGPUError(f"The remote kernel refused `{code}`: {reply['content']}")

    async def send(self, channel: str, msg: _wire.Message) -> None:
        """Relay one frontend message, headers unchanged."""
        assert self.conn is not None
        await self.conn.send(channel, msg)

    def watch(self, on_gone: Callable[[str], None], interval: float = WATCH_INTERVAL) -> None:
        """Call ``on_gone(why)`` once the host no longer runs this kernel for us; until closed.

        A host closes a kernel's websockets when it stops the kernel, but a kernel that
        dies and is restarted by the host keeps them open: ask the host too.
        """

        async def watch() -> None:
            on_gone(await self._watch(interval))

        self._watcher = asyncio.get_running_loop().create_task(watch())

    async def _watch(self, interval: float) -> str:
        kernel, where = self.grant.kernel_id, self.grant.display
        failures = 0
        while True:
            await asyncio.sleep(interval)
            try:
                model = await self.host.request("GET", f"/api/kernels/{kernel}")
            except AuthenticationError:  # a pool revokes a session's token when it stops it
                return f"The remote kernel {kernel} on {where} was stopped."
            except CloudGPUError as e:  # unreachable, or 404: three in a row, not one blip
                failures += 1
                if failures >= 3:
                    return f"The remote kernel {kernel} on {where} is gone (the host: {e})."
                continue
            failures = 0
            if model and model.get("execution_state") == "dead":
                return f"The remote kernel {kernel} on {where} died."

    async def interrupt(self) -> None:
        """Interrupt the running cell through the host."""
        await self.host.interrupt(self.grant.kernel_id)

    async def snapshot(self, timeout: float = 600.0) -> tuple[dict[str, Serialized],
                                                                dict[str, str]]:
        """Every variable of the kernel that can move, as frames, and why the others cannot.

        Raises:
            CloudGPUError: the kernel has no cloudgpu agent or does not answer.
        """
        assert self.conn is not None
        if not self._agent_comm:
            self._agent_comm = uuid.uuid4().hex
            await self.conn.send("shell", self.conn.message(
                "comm_open", {"comm_id": self._agent_comm, "target_name": AGENT_TARGET,
                              "data": {}}))
        batch = uuid.uuid4().hex
        done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        assembler = Assembler()
        self._snapshots[batch] = (assembler, done)
        try:
            await self.conn.send("shell", self.conn.message(
                "comm_msg", {"comm_id": self._agent_comm,
                             "data": {"op": "snapshot", "id": batch}}))
            final = await asyncio.wait_for(_first(done, self.conn.closed), timeout)
        except asyncio.TimeoutError:
            raise CloudGPUError(
                f"The remote kernel {self.grant.kernel_id} did not send its variables within "
                f"{timeout:.0f} s; is the cloudgpu agent loaded there?"
            ) from None
        finally:
            self._snapshots.pop(batch, None)
        return assembler.values(), dict(final.get("errors", {}))

    def _on_message(self, channel: str, msg: _wire.Message) -> None:
        assert self.conn is not None
        parent = msg["parent_header"]
        if parent.get("session") == self.conn.session:
            waiter = self._own.get(parent.get("msg_id", ""))
            if waiter is not None and channel != "iopub" and not waiter.done():
                waiter.set_result(msg)
            elif msg["msg_type"] == "comm_msg":
                self._on_agent(msg)
            return  # our own traffic: never the frontend's business
        if msg["msg_type"] == "comm_msg" and msg["content"].get("comm_id") == self._agent_comm:
            self._on_agent(msg)
            return
        self.forward(channel, msg)

    def _on_agent(self, msg: _wire.Message) -> None:
        data = msg["content"].get("data", {})
        if data.get("op") != "snapshot" or data.get("id") not in self._snapshots:
            return
        assembler, done = self._snapshots[data["id"]]
        assembler.feed(data, msg["buffers"])
        if assembler.done and not done.done():
            done.set_result(data)

    async def close(self) -> None:
        """Close the websocket and the HTTP client; the kernel itself is left to the provider."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self.conn is not None:
            await self.conn.close()
        await self.host.aclose()


async def _first(result: asyncio.Future[Any], closed: asyncio.Future[None]) -> Any:
    """``result``'s value, or HostConnectionError once ``closed`` is done first."""
    await asyncio.wait([result, closed], return_when=asyncio.FIRST_COMPLETED)
    if result.done():
        return result.result()
    raise HostConnectionError("The connection to the remote kernel closed.")
