"""A remote session: one kernel on a host, driven cell by cell with variables moving both ways.

``RemoteSession.run_cell`` pipelines the push, the execute request and the pull on the
shell channel: all three are sent at once and the kernel handles them in order, so a
cell with nothing to move costs one round trip.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import _wire
from ._transfer import Assembler, pack
from .errors import (
    HostConnectionError,
    RemoteExecutionError,
    RemoteKernelDiedError,
)
from .host_client import HostClient, KernelConnection
from .serialize import FINGERPRINT_MIN, Serialized, versions

__all__ = ["CellResult", "Grant", "RemoteSession"]

AGENT_TARGET = "cloudgpu.agent"
OUTPUT_TYPES = frozenset(
    {"stream", "display_data", "update_display_data", "clear_output", "execute_result"}
)
PROGRESS_MIN_BYTES = 32 * 2**20

#: Called from the background loop with ("output", iopub message) or ("progress", info).
Sink = Callable[[str, dict[str, Any]], None]


@dataclass
class Grant:
    """What a provider hands out: where a kernel is and the right to drive it.

    Attributes:
        host_url: the host's base URL.
        token: a token for that host (scoped to this kernel when a pool grants it).
        kernel_id: the kernel on that host.
        hardware: the hardware spec granted, canonical (``H100:2``, ``cpu``).
        gpus: the devices the kernel holds, as the host reports them.
        simulated: True when those GPUs are simulated.
        session_id: the pool's session id, when a pool granted it.
        rate_per_hour: dollars per hour this hardware costs (count x price).
        started: when billing started (epoch seconds).
    """

    host_url: str
    token: str
    kernel_id: str
    hardware: str
    gpus: list[dict[str, Any]] = field(default_factory=list)
    simulated: bool = False
    session_id: str | None = None
    rate_per_hour: float = 0.0
    started: float = 0.0

    def cost(self, now: float | None = None) -> float:
        """Dollars billed so far, computed here (no round trip)."""
        if not self.started:
            return 0.0
        return max((now or time.time()) - self.started, 0.0) / 3600 * self.rate_per_hour

    @property
    def display(self) -> str:
        """Human text for the hardware: ``1x H100 (simulated)``, ``CPU``."""
        if not self.gpus:
            return "CPU"
        names = list(dict.fromkeys(g["type"] for g in self.gpus))
        text = f"{len(self.gpus)}x {'/'.join(names)}"
        return f"{text} (simulated)" if self.simulated else text


@dataclass
class CellResult:
    """How a remote cell went.

    Attributes:
        status: ``ok`` or ``error``.
        execution_count: the remote execution count.
        pulled: the values sent back, as frames still to unpickle.
        pull_errors: names that could not come back, and why.
        push_errors: inputs that could not be loaded remotely, and why.
        seconds: wall time from the first byte sent to the last received.
        error: the remote exception when ``status`` is ``error``.
        sent: what went out per input name: ``{"bytes": n, "out_of_band": frames}``
            (0 bytes for an input the remote kernel already held).
        received: the same for what came back.
        stale: inputs the remote side said had changed there, and were sent again.
        warnings: the provider's warnings about the session (a budget nearly spent).
    """

    status: str
    execution_count: int | None
    pulled: dict[str, Serialized] = field(default_factory=dict)
    pull_errors: dict[str, str] = field(default_factory=dict)
    push_errors: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    error: RemoteExecutionError | None = None
    sent: dict[str, dict[str, int]] = field(default_factory=dict)
    received: dict[str, dict[str, int]] = field(default_factory=dict)
    stale: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class _CellRun:
    """Bookkeeping for one cell in flight."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sink: Sink, pushing: bool,
                 pulling: bool) -> None:
        self.sink = sink
        self.exec_id = ""
        self.push_id = uuid.uuid4().hex
        self.pull_id = uuid.uuid4().hex
        self.reply: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.idle: asyncio.Future[None] = loop.create_future()
        self.pushed: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.pulled: asyncio.Future[dict[str, Any]] = loop.create_future()
        if not pushing:
            self.pushed.set_result({"errors": {}})
        if not pulling:
            self.pulled.set_result({})
        self.assembler = Assembler()

    def futures(self) -> list[asyncio.Future[Any]]:
        return [self.reply, self.idle, self.pushed, self.pulled]

    def fail(self, error: BaseException) -> None:
        for f in self.futures():
            if not f.done():
                f.set_exception(error)
                f.exception()  # mark retrieved: the first one awaited raises it


class RemoteSession:
    """One remote kernel with the cloudgpu agent, and the connection that drives it."""

    def __init__(self, grant: Grant, host: HostClient) -> None:
        self.grant = grant
        self.host = host
        self.conn: KernelConnection | None = None
        self.comm_id = uuid.uuid4().hex
        self.remote: dict[str, Any] = {}
        self.version_warnings: list[str] = []
        self.version_warned = False  # shown to the user once
        self.stopped_reason: str | None = None
        self.replaced_reason: str | None = None
        #: What the remote kernel holds, by name: fingerprints of big values sent or received.
        self.fingerprints: dict[str, str] = {}
        self._hello: asyncio.Future[dict[str, Any]] | None = None
        self._runs: dict[str, _CellRun] = {}  # by execute msg_id, push id and pull id

    @classmethod
    async def open(cls, grant: Grant, *, wait: bool = True) -> RemoteSession:
        """Connect to the granted kernel and greet its agent with our versions.

        With ``wait=False`` the agent's answer is not awaited here: the first cell, sent
        right behind the greeting on the same channel, collects it, saving a round trip.
        """
        session = cls(grant, HostClient(grant.host_url, grant.token))
        try:
            await session._connect()
            if wait:
                await session.ready()
        except BaseException:
            await session.close(shutdown=False)
            raise
        return session

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        self._hello = loop.create_future()
        self.conn = await self.host.connect(self.grant.kernel_id, self._on_message)
        self.conn.closed.add_done_callback(lambda _: self._on_closed())
        await self.conn.send("shell", self.conn.message(
            "comm_open",
            {"comm_id": self.comm_id, "target_name": AGENT_TARGET,
             "data": {"versions": versions()}},
        ))

    async def ready(self, timeout: float = 60.0) -> None:
        """Wait for the agent's greeting; afterwards ``remote`` and ``version_warnings`` are set.

        Raises:
            HostConnectionError: when the agent does not answer in time.
        """
        assert self._hello is not None
        try:
            self.remote = await asyncio.wait_for(asyncio.shield(self._hello), timeout)
        except asyncio.TimeoutError:
            raise HostConnectionError(
                f"The remote kernel {self.grant.kernel_id} did not answer within {timeout:.0f} s;"
                f" it may still be starting, or the cloudgpu agent is not loaded there."
            ) from None
        self.version_warnings = _version_skew(versions(), self.remote.get("versions", {}))

    @property
    def kernel_id(self) -> str:
        """The remote kernel's id."""
        return self.grant.kernel_id

    @property
    def alive(self) -> bool:
        """False once the kernel died, was stopped, or the connection dropped."""
        return self.stopped_reason is None and self.conn is not None and not self.conn.closed.done()

    async def run_cell(self, code: str, push: dict[str, Serialized], pull: list[str],
                       sink: Sink) -> CellResult:
        """Push inputs, run ``code``, pull outputs: all sent at once, answered in order.

        A big input the remote kernel already holds unchanged (same fingerprint on both
        sides) is not sent again; if the remote copy changed meanwhile, the agent refuses
        the cell before it runs and it is sent again, whole, with the inputs.

        Raises:
            RemoteKernelDiedError: when the kernel dies or restarts during the cell.
            HostConnectionError: when the connection drops.
        """
        outgoing = {name: Serialized("keep") if self._holds(name, value) else value
                    for name, value in push.items()}
        result = await self._run_once(code, outgoing, pull, sink)
        stale = result.stale
        if stale:
            for name in stale:
                self.fingerprints.pop(name, None)
            outgoing.update({name: push[name] for name in stale})
            retry = await self._run_once(code, outgoing, pull, sink)
            retry.seconds += result.seconds
            retry.stale = stale
            result = retry
        if not result.push_errors:
            for name, value in push.items():
                if value.nbytes >= FINGERPRINT_MIN:
                    self.fingerprints[name] = value.fingerprint
        for name, value in result.pulled.items():
            if value.digest:  # the agent fingerprinted it as it left
                self.fingerprints[name] = value.digest
            else:
                self.fingerprints.pop(name, None)
        result.sent = _stats(outgoing)
        return result

    def _holds(self, name: str, value: Serialized) -> bool:
        return value.nbytes >= FINGERPRINT_MIN and self.fingerprints.get(name) == value.fingerprint

    async def _run_once(self, code: str, push: dict[str, Serialized], pull: list[str],
                        sink: Sink) -> CellResult:
        if not self.alive or self.conn is None:
            raise RemoteKernelDiedError(
                f"The remote kernel is gone ({self.stopped_reason or 'connection closed'})."
            )
        conn = self.conn
        started = time.perf_counter()
        run = _CellRun(asyncio.get_running_loop(), sink, bool(push), bool(pull))
        self._runs[run.push_id] = self._runs[run.pull_id] = run
        try:
            if push:
                await self._send_values(conn, run, push)
            execute = conn.message("execute_request", {
                "code": code, "silent": False, "store_history": True, "user_expressions": {},
                "allow_stdin": False, "stop_on_error": False,
            })
            run.exec_id = execute["header"]["msg_id"]
            self._runs[run.exec_id] = run
            await conn.send("shell", execute)
            if pull:
                await conn.send("shell", self._comm_msg(
                    {"op": "pull", "id": run.pull_id, "names": pull, "only_if_ok": True}
                ))
            waits: list[Any] = list(run.futures())
            if not self.remote:  # the greeting was pipelined in front of this cell
                waits.append(self.ready())
            reply, _, pushed, pulled, *_ = await asyncio.gather(*waits)
        finally:
            for key in (run.exec_id, run.push_id, run.pull_id):
                self._runs.pop(key, None)
        result = CellResult(
            status=reply.get("status", "error"),
            execution_count=reply.get("execution_count"),
            push_errors=pushed.get("errors", {}),
            pull_errors=pulled.get("errors", {}),
            seconds=time.perf_counter() - started,
            stale=pushed.get("stale", []),
        )
        if result.status == "ok" and pull:
            result.pulled = run.assembler.values()
            result.received = _stats(result.pulled)
        elif result.status != "ok":
            result.error = RemoteExecutionError(
                reply.get("ename", "Error"), reply.get("evalue", ""), reply.get("traceback", [])
            )
        return result

    def _comm_msg(self, data: dict[str, Any], buffers: list[Any] | None = None) -> _wire.Message:
        assert self.conn is not None
        return self.conn.message("comm_msg", {"comm_id": self.comm_id, "data": data},
                                 buffers=buffers)

    async def _send_values(self, conn: KernelConnection, run: _CellRun,
                           values: dict[str, Serialized]) -> None:
        total = sum(v.nbytes for v in values.values())
        sent = 0
        for data, buffers in pack(values, extra={"op": "push", "id": run.push_id}):
            await conn.send("shell", self._comm_msg(data, buffers))
            sent += sum(b.nbytes for b in buffers)
            if total >= PROGRESS_MIN_BYTES:
                run.sink("progress", {"direction": "push", "done": sent, "total": total})

    async def interrupt(self) -> None:
        """Interrupt the running cell; the kernel stays usable."""
        await self.host.interrupt(self.kernel_id)

    def _on_message(self, channel: str, msg: _wire.Message) -> None:
        msg_type = msg["msg_type"]
        content = msg["content"]
        if channel == "iopub" and msg_type == "status" and content.get("execution_state") in (
            "restarting", "dead", "autorestarting"
        ):
            self._stop(RemoteKernelDiedError(
                f"The remote kernel {self.kernel_id} died and lost its state "
                f"({content['execution_state']}). Run the cell again to start a new one "
                f"(`%%remote --new`)."
            ))
            return
        if msg_type == "comm_msg" and content.get("comm_id") == self.comm_id:
            self._on_agent(content["data"], msg["buffers"])
            return
        run = self._runs.get(msg["parent_header"].get("msg_id", ""))
        if run is None:
            return
        if channel == "shell" and msg_type == "execute_reply":
            if not run.reply.done():
                run.reply.set_result(content)
        elif channel == "iopub":
            if msg_type == "status" and content.get("execution_state") == "idle":
                if not run.idle.done():
                    run.idle.set_result(None)
            elif msg_type in OUTPUT_TYPES:
                run.sink("output", msg)

    def _on_agent(self, data: dict[str, Any], buffers: list[Any]) -> None:
        op = data.get("op")
        if op == "hello":
            if self._hello is not None and not self._hello.done():
                self._hello.set_result(data)
            return
        run = self._runs.get(data.get("id", ""))
        if run is None:
            return
        if op == "pushed":
            run.pushed.set_result(data)
        elif op == "pulled":
            run.assembler.feed(data, buffers)
            if run.assembler.total >= PROGRESS_MIN_BYTES:
                run.sink("progress", {"direction": "pull", "done": run.assembler.received,
                                      "total": run.assembler.total})
            if run.assembler.done and not run.pulled.done():
                run.pulled.set_result(data)

    def _on_closed(self) -> None:
        self._stop(HostConnectionError(
            f"The connection to the remote kernel {self.kernel_id} at {self.grant.host_url} "
            f"closed. Your local variables are unchanged; run the cell again to reconnect."
        ))

    def _stop(self, error: BaseException) -> None:
        if self.stopped_reason is None:
            self.stopped_reason = str(error)
        for run in set(self._runs.values()):
            run.fail(error)
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(error)
            self._hello.exception()

    async def close(self, shutdown: bool = True) -> None:
        """Disconnect; with ``shutdown`` also stop the remote kernel."""
        if self.stopped_reason is None:
            self.stopped_reason = "closed"
        if self.conn is not None:
            await self.conn.close()
        if shutdown:
            await self.host.shutdown(self.kernel_id)
        await self.host.aclose()


def _stats(values: dict[str, Serialized]) -> dict[str, dict[str, int]]:
    return {n: {"bytes": v.nbytes, "out_of_band": v.out_of_band} for n, v in values.items()}


def _version_skew(local: dict[str, str], remote: dict[str, str]) -> list[str]:
    """Warnings for differences that can break unpickling, naming both versions."""
    found = []
    for key, label in (("python", "Python"), ("cloudpickle", "cloudpickle")):
        mine, theirs = local.get(key, "?"), remote.get(key, "?")
        if mine.split(".")[:2] != theirs.split(".")[:2]:
            found.append(
                f"Local {label} is {mine} but the remote kernel runs {label} {theirs}: "
                f"functions and classes pickled on one side may fail to load on the other. "
                f"Use the same {label} minor version on both sides."
            )
    return found
