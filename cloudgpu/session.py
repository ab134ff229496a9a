"""A remote session: one kernel on a host, driven cell by cell with variables moving both ways.

``RemoteSession.run_cell`` pipelines the push, the execute request and the pull on the
shell channel: all three are sent at once and the kernel handles them in order, so a
cell with nothing to move costs one round trip. The session sits on a
:class:`~cloudgpu.remote.RemoteKernel`, the one connection to that kernel, which the Cloud
GPU kernel also relays its frontends' traffic through.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ._link import RECONNECT_TIMEOUT
from ._move import MoveReport, carry_over
from .errors import CloudGPUError, RemoteExecutionError, RemoteKernelDiedError
from .provider import Grant
from .remote import AgentBatch, Forward, RemoteKernel
from .serialize import FINGERPRINT_MIN, Serialized

__all__ = ["CellResult", "RemoteSession", "Sink"]

OUTPUT_TYPES = frozenset(
    {"stream", "display_data", "update_display_data", "clear_output", "execute_result"}
)

#: Called from the background loop with ("output", iopub message), ("progress", info) or
#: ("notice", {"text": ...}) (the connection dropped, came back).
Sink = Callable[[str, dict[str, Any]], None]


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
        versions: for moved values whose type an installed package defines, that package
            on the remote side: ``{name: [module, distribution, version]}``.
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
    versions: dict[str, list[str]] = field(default_factory=dict)


class _CellRun:
    """Bookkeeping for one cell in flight: its reply, its idle, its push and pull."""

    def __init__(self, kernel: RemoteKernel, sink: Sink, pushing: bool, pulling: bool,
                 kept_on_execute: bool = False) -> None:
        """``kept_on_execute``: the inputs are all kept, named on the execute request; the
        agent answers only if one changed, before the cell's idle."""
        loop = asyncio.get_running_loop()
        self.kept_on_execute = kept_on_execute
        self.sink = sink
        #: Whether anything came back for the execute request (the kernel got it).
        self.reached = False
        self.reply: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.idle: asyncio.Future[None] = loop.create_future()
        self.pushed = kernel.batch()
        self.pulled = kernel.batch(lambda info: sink("progress", info))
        #: The exchanges the agent answers before the cell's idle, or never.
        self.answered_by_idle: list[AgentBatch] = []
        if not pushing:
            self.pushed.done.set_result({"errors": {}})
        if not pulling:
            self.pulled.done.set_result({})

    def on_message(self, channel: str, msg: dict[str, Any]) -> None:
        """A message parented to the cell's execute request."""
        self.reached = True
        msg_type = msg["msg_type"]
        if channel == "shell" and msg_type == "execute_reply":
            if not self.reply.done():
                self.reply.set_result(msg["content"])
        elif channel == "iopub":
            if msg_type == "status" and msg["content"].get("execution_state") == "idle":
                if self.kept_on_execute and not self.pushed.done.done():
                    self.pushed.done.set_result({"errors": {}})  # all still as sent
                for batch in self.answered_by_idle:
                    if not batch.answered:  # its answer would have come first, on IOPub
                        batch.fail(CloudGPUError(
                            "The cloudgpu agent in the remote kernel did not answer for this "
                            "cell's variables before the cell ended there (the remote "
                            "kernel's log may say why); no variable here was changed. Run "
                            "the cell again."))
                if not self.idle.done():
                    self.idle.set_result(None)
            elif msg_type in OUTPUT_TYPES:
                self.sink("output", msg)

    def futures(self) -> list[asyncio.Future[Any]]:
        return [self.reply, self.idle, self.pushed.done, self.pulled.done]


class RemoteSession:
    """One remote kernel with the cloudgpu agent, and the cell-level operations on it.

    Args:
        kernel: the connection to it.
    """

    def __init__(self, kernel: RemoteKernel) -> None:
        self.kernel = kernel
        self.version_warned = False  # shown to the user once
        #: Why the session this one replaced had ended (idleness, budget), if it had.
        self.replaced_reason: str | None = None
        #: What the remote kernel holds, by name: fingerprints of big values sent or received.
        self.fingerprints: dict[str, str] = {}
        #: Have the agent fingerprint a kept value before each cell, trusting no earlier
        #: check (``ClientConfig.verify_unchanged``).
        self.verify_unchanged = False
        #: Whether the remote kernel answered anything for the last cell's execute request;
        #: False when the cell failed before any of it came back (its code did not start,
        #: unless the kernel ended as it did and its first messages were lost with it).
        self.last_cell_reached = False
        #: Whether any message of the last cell was written to a connection to its host;
        #: False when all of it waited for a connection that never came back (so it did
        #: not run there, whatever became of the kernel).
        self.last_cell_left = False

    @classmethod
    async def open(cls, grant: Grant, *, wait: bool = True, forward: Forward | None = None,
                   check: Callable[[], Awaitable[str | None]] | None = None,
                   reconnect_timeout: float = RECONNECT_TIMEOUT,
                   verify_unchanged: bool = False,
                   side_channel: bool = True) -> RemoteSession:
        """Connect to the granted kernel and greet its agent with our versions.

        With ``wait=False`` the agent's answer is not awaited here: the first cell, sent
        right behind the greeting on the same channel, collects it, saving a round trip.
        ``forward`` receives the traffic that is not the session's own, ``check`` asks the
        provider whether the session ended (see ``RemoteKernel``); ``verify_unchanged`` is
        the attribute's first value. With ``side_channel`` False, big values take the
        kernel websocket too (see ``cloudgpu._side``).
        """
        kernel = await RemoteKernel.open(grant, forward, check=check,
                                         reconnect_timeout=reconnect_timeout,
                                         side_channel=side_channel)
        try:
            if wait:
                await kernel.ready()
        except BaseException:
            await kernel.close()
            raise
        session = cls(kernel)
        session.verify_unchanged = verify_unchanged
        return session

    @property
    def grant(self) -> Grant:
        """What the provider granted."""
        return self.kernel.grant

    @property
    def kernel_id(self) -> str:
        """The remote kernel's id."""
        return self.kernel.kernel_id

    @property
    def remote(self) -> dict[str, Any]:
        """The agent's greeting (versions, hostname, pid), once it came."""
        return self.kernel.remote

    @property
    def version_warnings(self) -> list[str]:
        """Differences between the two sides that can break unpickling."""
        return self.kernel.version_warnings

    @property
    def alive(self) -> bool:
        """False once the kernel died, was stopped, or the connection dropped."""
        return self.kernel.alive

    async def ready(self) -> None:
        """Wait for the agent's greeting (see ``RemoteKernel.ready``)."""
        await self.kernel.ready()

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
                push[name].digest = None  # from the frames: a trusted one was wrong
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
        kernel = self.kernel
        self.last_cell_left = False
        if not kernel.alive:
            raise kernel.lost.result() if kernel.lost.done() else RemoteKernelDiedError(
                f"The remote kernel {self.kernel_id} is gone (the connection was closed).")
        started = time.perf_counter()
        first_frame = kernel.link.sent + 1
        # Inputs that are all kept need no push: the execute request names them.
        kept = bool(push) and all(v.codec == "keep" for v in push.values()) and \
            kernel.greeted("keep_on_execute")
        run = _CellRun(kernel, sink, bool(push), bool(pull), kept_on_execute=kept)
        # Nothing here reads execute_input: the agent publishes none for this request. What
        # the agent answers for it (stale kept inputs, a carried push or pull) goes on `comm`.
        asked: dict[str, Any] = {"echo": False, "comm": kernel.comm_id}
        if kept:
            asked.update(keep=list(push), id=run.pushed.id)
            if self.verify_unchanged:
                asked["verify"] = True
        # The inputs (what the side channel does not carry) and the outputs are asked for on
        # the execute request too, where the agent can: one message, one execution there.
        push_on_execute = kernel.greeted("push_on_execute")
        pull_on_execute = bool(pull) and kernel.greeted("pull_on_execute")
        # Its answers come on IOPub before the cell's idle: a push's, sent ahead of the
        # request or on it, and a pull's on it. One still missing then will not come.
        if push and not kept:
            run.answered_by_idle.append(run.pushed)
        if pull_on_execute:
            run.answered_by_idle.append(run.pulled)
        carried: list[memoryview] = []

        async def carry_pull(request: dict[str, Any]) -> None:
            asked["pull"] = request

        async def carry_push(data: dict[str, Any], buffers: list[memoryview]) -> None:
            asked["push"] = data
            carried.extend(buffers)

        quiet = kernel.on_notice(lambda text: sink("notice", {"text": text}))
        exec_id = ""
        try:
            if push and not kept:
                await kernel.push(push, run.pushed, lambda info: sink("progress", info),
                                  verify=self.verify_unchanged,
                                  carry=carry_push if push_on_execute else None)
            if pull_on_execute:
                await kernel.pull(pull, run.pulled, send=carry_pull)
            execute = kernel.message("execute_request", {
                "code": code, "silent": False, "store_history": True, "user_expressions": {},
                "allow_stdin": False, "stop_on_error": False,
            }, metadata={"cloudgpu": asked}, buffers=carried)
            exec_id = execute["header"]["msg_id"]
            kernel.route(exec_id, run.on_message)
            await kernel.send("shell", execute)
            if pull and not pull_on_execute:
                await kernel.pull(pull, run.pulled)
            waits: list[Any] = [kernel.wait(f, None, "answer") for f in run.futures()]
            if not kernel.remote:  # the greeting was pipelined in front of this cell
                waits.append(kernel.ready())
            reply, _, pushed, pulled, *_ = await asyncio.gather(*waits)
        finally:
            self.last_cell_reached = run.reached
            self.last_cell_left = kernel.link.written >= first_frame
            quiet()
            kernel.unroute(exec_id)
            kernel.forget(run.pushed, run.pulled)
        result = CellResult(
            status=reply.get("status", "error"),
            execution_count=reply.get("execution_count"),
            push_errors=pushed.get("errors", {}),
            pull_errors=pulled.get("errors", {}),
            seconds=time.perf_counter() - started,
            stale=pushed.get("stale", []),
            versions={**pushed.get("versions", {}), **pulled.get("versions", {})},
        )
        if result.status == "ok" and pull:
            result.pulled = run.pulled.assembler.values()
            result.received = _stats(result.pulled)
        elif result.status != "ok":
            result.error = RemoteExecutionError(
                reply.get("ename", "Error"), reply.get("evalue", ""), reply.get("traceback", [])
            )
        return result

    async def carry_over(self, values: dict[str, Serialized], failed: dict[str, str],
                         say: Callable[[str], None]) -> MoveReport:
        """Load another kernel's ``snapshot`` into this one (a switch of hardware)."""
        return await carry_over(self, values, failed, say)

    async def snapshot(self) -> tuple[dict[str, Serialized], dict[str, str]]:
        """Every variable that can move to other hardware, and why the others cannot."""
        return await self.kernel.snapshot()

    async def interrupt(self) -> None:
        """Interrupt the running cell; the kernel stays usable."""
        await self.kernel.interrupt()

    async def close(self, shutdown: bool = False) -> None:
        """Disconnect; with ``shutdown`` also stop the remote kernel."""
        await self.kernel.close(shutdown=shutdown)


def _stats(values: dict[str, Serialized]) -> dict[str, dict[str, int]]:
    return {n: {"bytes": v.nbytes, "out_of_band": v.out_of_band} for n, v in values.items()}
