"""The Cloud GPU proxy kernel: a local Jupyter kernel whose every cell runs on remote hardware.

Frontends talk to it over ZMQ like to any kernel. Requests are relayed over one
websocket to a remote kernel granted by the provider, replies and outputs come back
to the right frontend socket. The proxy itself answers what must not wait for the remote
side (kernel_info, heartbeat, shutdown, interrupt) and the ``%cloudgpu`` cells.

Shell requests pass through one queue in arrival order: the remote kernel sees them in
that order, a held request (the remote kernel still starting) holds those behind it, and
a ``%cloudgpu`` cell runs only after every cell before it has finished remotely.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from jupyter_client.jsonutil import squash_dates

from cloudgpu import _wire
from cloudgpu._bridge import Emit
from cloudgpu._core import SessionCore, stopped_error, stopped_kind
from cloudgpu.client import Client, get_client
from cloudgpu.errors import CloudGPUError, CommandError
from cloudgpu.hardware import HardwareSpec
from cloudgpu.session import RemoteSession

from ._channels import LocalChannels
from ._commands import USAGE, Command, parse_command, status_text
from ._replies import error_content, kernel_info, unavailable_reply

__all__ = ["ProxyKernel"]

log = logging.getLogger("cloudgpu.kernel")

T = TypeVar("T")
KEY = "cloudgpu-kernel"  # the proxy's one session in the process's client
HANDSHAKE_TIMEOUT = 60.0
RELEASE_TIMEOUT = 30.0


class _Interrupted(Exception):
    """Raised when the user interrupts a ``%cloudgpu`` command that waits for hardware."""


@dataclass
class _Request:
    """A request from a frontend, with where to send its reply."""

    channel: str
    idents: list[bytes]
    msg: dict[str, Any]
    generation: int = 0

    @property
    def msg_type(self) -> str:
        return str(self.msg["header"]["msg_type"])

    @property
    def msg_id(self) -> str:
        return str(self.msg["header"]["msg_id"])


class ProxyKernel:
    """Serves one connection file, running everything on hardware ``spec``.

    Args:
        connection_info: the parsed connection file.
        spec: the hardware to run on.
        client: where sessions come from; the process's client by default.
        environment: pip requirements the remote kernel runs with (kept across switches).
    """

    def __init__(self, connection_info: dict[str, Any], spec: HardwareSpec,
                 client: Client | None = None, environment: list[str] | None = None) -> None:
        self.client = client or get_client()
        #: The session, driven through the async core the magic and the Python API share.
        self.core = SessionCore(self.client, spec, key=KEY,
                                options={"environment": environment} if environment else None)
        self.local = LocalChannels(connection_info, self._on_local)
        self.remote: RemoteSession | None = None
        self.info: dict[str, Any] = {}  # the remote kernel's kernel_info reply
        self.execution_count = 0
        self._startup: asyncio.Task[None] | None = None
        self._lost: str | None = None  # why the last remote kernel is gone, until a new one
        self._lost_as = "RemoteKernelDiedError"  # the error its cells fail with then
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._pending: dict[str, _Request] = {}  # relayed requests awaiting a reply
        # Relayed execute requests not yet answered, in order (a dict as an ordered set):
        # the remote kernel runs the first, and the others wait there behind it.
        self._running: dict[str, None] = {}
        self._unsaid: list[str] = []  # the provider's words for the next cell to show
        # Cells interrupted by someone else (a provider stopping the session does that
        # first): their reply and idle, held until the provider says why.
        self._held: dict[str, list[tuple[str, _wire.Message]]] = {}
        self._let_through: str | None = None  # the cell whose held messages go on now
        self._idle = asyncio.Event()
        self._idle.set()
        self._busy_sent: set[str] = set()  # requests said busy for, not yet idle
        self._status_target: dict[str, Any] | None = None  # the cell showing provider progress
        self._progress: list[str] = []  # the provider's lines for the start under way
        self._losing: asyncio.Task[None] | None = None
        self._generation = 0  # bumped by an interrupt: requests held before it are cancelled
        self._cancel_reason = ("KeyboardInterrupt", "")
        self._interrupted = asyncio.Event()
        self._stopped = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def spec(self) -> HardwareSpec:
        """The hardware this kernel runs on (another one after a switch)."""
        return self.core.spec

    @spec.setter
    def spec(self, spec: HardwareSpec) -> None:
        self.core.spec = spec

    # --- lifecycle -------------------------------------------------------------

    async def run(self) -> None:
        """Serve until a shutdown request (or :meth:`stop`); the remote kernel starts at once."""
        self.local.start()
        self.local.publish("status", {"execution_state": "starting"})
        self._start_remote()
        consumer = asyncio.get_running_loop().create_task(self._consume())
        try:
            await self._stopped.wait()
        finally:
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
            await self._release_current()
            for task in list(self._tasks):
                task.cancel()
            await self.local.close()

    def stop(self) -> None:
        """Stop serving; the remote kernel is released on the way out."""
        self._stopped.set()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_remote(self) -> None:
        self._progress = []  # a new attempt: the last one's lines are stale
        self._startup = asyncio.get_running_loop().create_task(self._open_remote())
        self._startup.add_done_callback(self._started)

    def _started(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.warning("Starting a remote kernel on %s failed: %s", self.spec, task.exception())

    async def _open_remote(self) -> None:
        started = time.monotonic()
        session = await self.core.open(self._events(), forward=self._on_remote, announce=False)
        try:
            self._install(session, await session.kernel.kernel_info(HANDSHAKE_TIMEOUT))
        except BaseException:
            await asyncio.shield(self._release(session))
            raise
        ready = f"ready on {session.grant.display} in {time.monotonic() - started:.1f} s"
        if self._status_target is not None:
            self._stream(self._status_target, "stderr", f"cloudgpu: {ready}\n")
            self._status_target = None
            self._progress = []
        elif self._progress:  # ready before any cell came: the first one shows how it went
            self._progress.append(ready)

    def _events(self, say: Callable[[str], None] | None = None) -> Emit:
        """What the core shows while it opens or switches a session: its progress lines
        under the waiting cell, and its other words through ``say``."""
        loop = asyncio.get_running_loop()

        def emit(kind: str, payload: Any) -> None:  # a provider may call from any thread
            if kind == "status":
                loop.call_soon_threadsafe(self._show_progress, payload[1])
            elif kind == "say" and say is not None:
                say(str(payload))
            else:
                log.debug("core event %s: %s", kind, payload)

        return emit

    def _install(self, session: RemoteSession, info: dict[str, Any]) -> None:
        """Relay to ``session`` from now on; its loss fails what waits on it."""
        self.remote, self.info, self._lost = session, info, None
        session.kernel.on_lost(lambda error: self._on_lost(session, str(error)))
        session.kernel.on_notice(lambda text: self._on_notice(session, text))

    def _on_notice(self, session: RemoteSession, text: str) -> None:
        """Say under the running cell what happened to the connection (dropped, back)."""
        if session is self.remote:
            self._say(text, later=False)

    def _say(self, text: str, later: bool) -> None:
        """Say ``text`` under the cell the remote kernel runs now; with none, under the next
        one to start (``later``) or not at all."""
        request = next((self._pending.get(msg_id) for msg_id in self._running), None)
        if request is not None:
            self._stream(request.msg["header"], "stderr", f"cloudgpu: {text}\n")
        elif later:
            self._unsaid.append(text)

    async def _check_with_provider(self, remote: RemoteSession) -> None:
        """Beside each cell (as the core does for ``%%remote``): the provider's new warnings
        under the cell, and a session it ended while its kernel still runs our cells let
        go, as a kernel it lost would be."""
        try:
            warnings, ended = await self.core.news(remote)
        except (CloudGPUError, OSError) as e:
            log.debug("Asking the provider about %s failed: %s", remote.kernel_id, e)
            return
        if remote is not self.remote:
            return
        for text in self.core.unsaid(warnings):
            self._say(f"⚠ {text}", later=True)
        if ended:
            self._on_lost(remote, f"{ended}.", why=self.client.ended_meanwhile(remote))

    async def _release(self, session: RemoteSession) -> None:
        try:
            await asyncio.wait_for(self.client.release(session), RELEASE_TIMEOUT)
        except (CloudGPUError, OSError, asyncio.TimeoutError) as e:
            log.warning("Releasing remote kernel %s failed: %s", session.kernel_id, e)

    async def _release_current(self) -> None:
        if self._startup is not None and not self._startup.done():
            self._startup.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._startup
        remote, self.remote = self.remote, None
        if remote is not None:
            await self._release(remote)

    def _show_progress(self, text: str) -> None:
        log.info("provider: %s", text)
        self._progress.append(text)
        if self._status_target is not None:
            self._stream(self._status_target, "stderr", f"cloudgpu: {text}\n")

    # --- from the frontend -----------------------------------------------------

    async def _on_local(self, channel: str, idents: list[bytes], msg: dict[str, Any]) -> None:
        request = _Request(channel, idents, msg, self._generation)
        msg_type = request.msg_type
        if msg_type == "kernel_info_request":
            self._answer_kernel_info(request)
        elif msg_type == "shutdown_request":
            await self._shutdown(request)
        elif msg_type == "interrupt_request":
            await self.interrupt()
            self._reply(request, "interrupt_reply", {"status": "ok"})
        elif channel == "stdin":
            if self.remote is not None:
                await self._relay(request, self.remote)
        elif channel == "control":
            self._spawn(self._relay_when_ready(request))
        else:
            if msg_type == "execute_request" and self._status_target is None and \
                    not msg["content"].get("silent") and (self.remote is None or self._progress):
                self._say_busy(request)
                for text in self._progress:  # what happened before this cell came
                    self._stream(msg["header"], "stderr", f"cloudgpu: {text}\n")
                if self.remote is None:
                    self._status_target = msg["header"]  # and what happens next, live
                else:
                    self._progress = []
            self._queue.put_nowait(request)

    def _answer_kernel_info(self, request: _Request) -> None:
        info = self.info if self.remote is not None else {}
        self.local.publish("status", {"execution_state": "busy"}, request.msg["header"])
        self._reply(request, "kernel_info_reply", kernel_info(info, self._hardware_text()))
        self.local.publish("status", {"execution_state": "idle"}, request.msg["header"])

    def _hardware_text(self) -> str:
        return self.remote.grant.display if self.remote is not None else self.spec.display

    async def interrupt(self) -> None:
        """Interrupt the running cell remotely and cancel cells still waiting for a kernel."""
        self._generation += 1
        self._cancel_reason = ("KeyboardInterrupt",
                               ("Interrupted while waiting for the remote kernel; the cell did not "
                               "run."))
        self._interrupted.set()
        self._interrupted = asyncio.Event()
        if self.remote is not None:
            try:
                await self.remote.interrupt()
            except CloudGPUError as e:
                log.warning("Interrupting the remote kernel failed: %s", e)

    async def _shutdown(self, request: _Request) -> None:
        restart = bool(request.msg["content"].get("restart", False))
        self._reply(request, "shutdown_reply", {"status": "ok", "restart": restart})
        await self._release_current()
        self.stop()

    async def _consume(self) -> None:
        while True:
            request = await self._queue.get()
            try:
                await self._handle(request)
            except Exception:  # one bad request must not stop the kernel; say what happened
                log.exception("Handling %s failed", request.msg_type)
                if request.msg_type == "execute_request":
                    self._fail_execute(request, "CloudGPUError",
                                       "cloudgpu: the proxy kernel failed on this cell; see the "
                                       "kernel's log.")

    async def _handle(self, request: _Request) -> None:
        if request.msg_type == "execute_request":
            try:
                command = parse_command(request.msg["content"].get("code", ""))
            except CommandError as e:
                self._fail_execute(request, "CommandError", str(e))
                return
            if request.generation < self._generation:
                self._fail_execute(request, *self._cancel_reason)
                return
            if command is not None:
                await self._idle.wait()
                await self._run_command(request, command)
                return
        remote = await self._wait_for_remote(request, retry=True)
        if remote is not None:
            await self._relay(request, remote)

    async def _wait_for_remote(self, request: _Request, retry: bool) -> RemoteSession | None:
        """The remote kernel once it is up; None (and the request answered) when it cannot be.

        With ``retry`` (shell requests, handled one at a time), a failed start is tried
        again; control requests only wait, so they never race a switch for a kernel.
        """
        if self._losing is not None:
            await asyncio.wait([self._losing])
        if retry and self.remote is None and self._lost is None and (
                self._startup is None or self._startup.done()):
            self._start_remote()  # the last start failed: every new cell tries again
        if self.remote is None and self._startup is not None and not self._startup.done():
            interrupted = asyncio.get_running_loop().create_task(self._interrupted.wait())
            await asyncio.wait([self._startup, interrupted], return_when=asyncio.FIRST_COMPLETED)
            interrupted.cancel()
            if request.generation < self._generation:
                self._unavailable(request, *self._cancel_reason)
                return None
        if self.remote is not None:
            return self.remote
        if self._lost is not None:
            self._unavailable(request, self._lost_as, self._lost)
            return None
        startup = self._startup
        error = startup.exception() if startup is not None and startup.done() and \
            not startup.cancelled() else None
        self._unavailable(request, type(error).__name__ if error else "CloudGPUError",
                          f"cloudgpu: could not start a remote kernel on {self.spec.display}: "
                          f"{error}\nRun the cell again to retry, or `%cloudgpu switch gpu=cpu` "
                          f"for other hardware.")
        return None

    async def _relay_when_ready(self, request: _Request) -> None:
        remote = await self._wait_for_remote(request, retry=False)
        if remote is not None:
            await self._relay(request, remote)

    async def _relay(self, request: _Request, remote: RemoteSession) -> None:
        msg = request.msg
        wire: _wire.Message = {
            "header": squash_dates(msg["header"]),
            "parent_header": squash_dates(msg["parent_header"]),
            "metadata": squash_dates(msg["metadata"]),
            "content": msg["content"],
            "buffers": msg.get("buffers") or [],
        }
        if request.msg_type.endswith("_request"):
            self._pending[request.msg_id] = request
            if request.msg_type == "execute_request":
                self._running[request.msg_id] = None
                self._idle.clear()
                self._spawn(self._check_with_provider(remote))
        try:
            await remote.kernel.send(request.channel, wire)
        except CloudGPUError as e:  # lost meanwhile: its on_lost says so, once
            log.warning("Relaying %s failed: %s", request.msg_type, e)
            self._on_lost(remote, str(e))

    # --- from the remote kernel ------------------------------------------------

    def _on_remote(self, channel: str, msg: _wire.Message) -> None:
        parent = msg["parent_header"]
        parent_id = parent.get("msg_id", "")
        msg_type = msg["msg_type"]
        held = self._held.get(parent_id)
        if held is not None and (channel == "shell" or msg_type == "status"):
            held.append((channel, msg))
            return
        if channel == "iopub":
            if msg_type == "status":
                state = msg["content"].get("execution_state")
                if not parent:
                    return  # the remote kernel's own start, and the host's probes
                if state == "busy":
                    if parent_id in self._busy_sent:
                        return  # we said busy while it waited for the remote kernel
                    self._busy_sent.add(parent_id)
                elif state == "idle":
                    self._busy_sent.discard(parent_id)
            elif msg_type == "execute_input":
                self.execution_count = msg["content"].get("execution_count", self.execution_count)
                self.local.send("iopub", msg)
                unsaid, self._unsaid = self._unsaid, []
                for text in unsaid:
                    self._stream(parent, "stderr", f"cloudgpu: {text}\n")
                return
            elif msg_type == "error":
                self._hold_if_interrupted_elsewhere(parent_id, msg["content"])
            self.local.send("iopub", msg)
            return
        request = self._pending.get(parent_id)
        if request is None:
            return
        if msg_type == "execute_reply" and \
                self._hold_if_interrupted_elsewhere(parent_id, msg["content"]):
            self._held[parent_id].append((channel, msg))  # the error output may come later
            return
        if channel != "stdin" and msg_type.endswith("_reply"):
            del self._pending[parent_id]
            self._done_running(parent_id)
        self.local.send(channel, msg, request.idents)

    def _hold_if_interrupted_elsewhere(self, parent_id: str, error: dict[str, Any]) -> bool:
        """If a cell failed with a KeyboardInterrupt nobody asked for here (its error output
        or its reply, whichever comes first), hold its reply and idle while the provider is
        asked why (:meth:`_ask_why_interrupted`). Whether it is held now."""
        request = self._pending.get(parent_id)
        if error.get("ename") != "KeyboardInterrupt" or request is None or \
                request.msg_type != "execute_request" or parent_id == self._let_through or \
                request.generation != self._generation or self.remote is None:
            return False
        if parent_id not in self._held:
            self._held[parent_id] = []
            self._spawn(self._ask_why_interrupted(self.remote, parent_id))
        return True

    async def _ask_why_interrupted(self, remote: RemoteSession, parent_id: str) -> None:
        """A provider stopping a session interrupts its cell first: ask it, and fail the
        cell saying why (as ``%%remote`` does), instead of with a bare KeyboardInterrupt.
        Otherwise (the code raised it itself, say) the cell ends as the kernel said."""
        why = None
        with contextlib.suppress(CloudGPUError, OSError, asyncio.TimeoutError):
            why = await asyncio.wait_for(self.client.ended_reason(remote), 5)
        if why:  # the cell fails as the session is let go (_lose), which drops what was held
            if remote is self.remote:
                self._on_lost(remote, str(stopped_error(remote.grant.display, why)), why)
            elif self._losing is None or self._losing.done():
                self._held.pop(parent_id, None)  # let go already
            return
        held = self._held.pop(parent_id, [])
        self._let_through = parent_id
        try:
            for channel, msg in held:
                self._on_remote(channel, msg)
        finally:
            self._let_through = None

    def _done_running(self, msg_id: str) -> None:
        self._running.pop(msg_id, None)
        if not self._running:
            self._idle.set()

    def _on_lost(self, remote: RemoteSession, what: str, why: str | None = None) -> None:
        """The remote kernel died or its host went away: fail what waits on it, free the GPUs.
        ``why``: the provider's reason for ending the session, when it is known already."""
        if remote is not self.remote:
            return  # an old kernel we let go of
        self.remote = None
        self._lost = what
        self._losing = asyncio.get_running_loop().create_task(self._lose(remote, what, why))

    async def _lose(self, remote: RemoteSession, what: str, why: str | None) -> None:
        if why is None:
            with contextlib.suppress(CloudGPUError, OSError, asyncio.TimeoutError):
                # A pool knows when it stopped the session itself (budget, idleness).
                why = await asyncio.wait_for(self.client.ended_reason(remote), 5)
        said = f" The pool says: {why}." if why and why not in what else ""
        self._lost = (f"{what}{said} Its variables are "
                      f"lost and its hardware was released. Restart the kernel to start a new "
                      f"one, or `%cloudgpu switch gpu=...`.")
        log.warning("%s", self._lost)
        self._lost_as = stopped_kind(why).__name__ if why else "RemoteKernelDiedError"
        for request in list(self._pending.values()):
            self._unavailable(request, self._lost_as, self._lost)
        self._pending.clear()
        self._held.clear()
        self._running.clear()
        self._idle.set()
        await self._release(remote)

    # --- answering locally -----------------------------------------------------

    def _reply(self, request: _Request, msg_type: str, content: dict[str, Any]) -> None:
        self.local.send(request.channel,
                        self.local.message(msg_type, content, request.msg["header"]),
                        request.idents)

    def _say_busy(self, request: _Request) -> None:
        self._busy_sent.add(request.msg_id)
        self.local.publish("status", {"execution_state": "busy"}, request.msg["header"])

    def _stream(self, parent: dict[str, Any], name: str, text: str) -> None:
        self.local.publish("stream", {"name": name, "text": text}, parent)

    def _finish(self, request: _Request, content: dict[str, Any]) -> None:
        self._reply(request, f"{request.msg_type.replace('_request', '_reply')}", content)
        self.local.publish("status", {"execution_state": "idle"}, request.msg["header"])
        self._busy_sent.discard(request.msg_id)
        if self._status_target is request.msg["header"]:
            self._status_target = None  # later progress belongs to the next waiting cell

    def _fail_execute(self, request: _Request, ename: str, evalue: str) -> None:
        """End an execute request with an error the user sees under the cell."""
        if request.msg_id not in self._busy_sent:
            self.local.publish("status", {"execution_state": "busy"}, request.msg["header"])
        error = error_content(ename, evalue)
        self.local.publish("error", error, request.msg["header"])
        self._finish(request, {"status": "error", "execution_count": self.execution_count,
                               **error})

    def _unavailable(self, request: _Request, ename: str, evalue: str) -> None:
        """Answer a request that no remote kernel will: an error for cells, a stand-in else."""
        if request.msg_type == "execute_request":
            self._fail_execute(request, ename, evalue)
        elif request.msg_type.endswith("_request"):
            self._reply(request, *unavailable_reply(request.msg_type, request.msg["content"],
                                                    ename, evalue))

    # --- %cloudgpu -------------------------------------------------------------

    async def _run_command(self, request: _Request, command: Command) -> None:
        header = request.msg["header"]
        if request.msg_id not in self._busy_sent:
            self._say_busy(request)
        self.local.publish("execute_input", {"code": request.msg["content"]["code"],
                                             "execution_count": self.execution_count}, header)
        try:
            if command.action == "status":
                self._stream(header, "stdout", await self._status())
            elif command.action == "switch":
                assert command.spec is not None
                await self._switch(request, command.spec, command.options)
            else:
                self._stream(header, "stdout", USAGE + "\n")
        except (CloudGPUError, _Interrupted) as e:
            ename = "KeyboardInterrupt" if isinstance(e, _Interrupted) else type(e).__name__
            evalue = str(e)
            if command.action == "switch":
                now = f"still on {self._hardware_text()}" if self.remote else "no remote kernel"
                evalue = (f"Could not switch to {command.spec.display if command.spec else '?'}: "
                          f"{e} Nothing changed: {now}.")
            self._fail_execute(request, ename, evalue)
            return
        self._finish(request, {"status": "ok", "execution_count": self.execution_count,
                               "payload": [], "user_expressions": {}})

    async def _unless_interrupted(self, coro: Coroutine[Any, Any, T]) -> T:
        """``coro``'s result; cancelled (and _Interrupted raised) when the user interrupts."""
        task = asyncio.get_running_loop().create_task(coro)
        interrupted = asyncio.get_running_loop().create_task(self._interrupted.wait())
        await asyncio.wait([task, interrupted], return_when=asyncio.FIRST_COMPLETED)
        interrupted.cancel()
        if not task.done():
            task.cancel()  # a pool withdraws the request
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise _Interrupted("Interrupted while switching; the new hardware was released.")
        return task.result()

    async def _status(self) -> str:
        if self.remote is None and self._startup is not None and not self._startup.done():
            return f"starting a remote kernel on {self.spec.display} ...\n"
        if self.remote is None:
            why = self._lost or f"the last start on {self.spec.display} failed"
            return f"no remote kernel: {why}\n"
        return status_text(self.core.info(), self.core.options)

    async def _switch(self, request: _Request, spec: HardwareSpec,
                      options: Mapping[str, float]) -> None:
        """Move to ``spec``; its ``options`` (``max_cost``, ``idle_timeout``) hold for the new
        session and those after it, once it is there."""
        header = request.msg["header"]
        if self._startup is not None and not self._startup.done():
            # Still waiting for the old hardware, with nothing to carry: stop waiting.
            self._startup.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._startup
        old = self.remote
        self._stream(header, "stderr", f"cloudgpu: switching to {spec.display} ...\n")
        started = time.monotonic()

        async def take_over(new: RemoteSession) -> None:
            """Number the next cell on, and relay to the new kernel before the old one goes."""
            info = await new.kernel.kernel_info(HANDSHAKE_TIMEOUT)
            await self._continue_count(new, self.execution_count + 1)
            self.spec = spec
            self._install(new, info)

        self._status_target = header
        kept = dict(self.core.options)
        self.core.options.update(options)
        try:
            report = await self._unless_interrupted(self.core.switch(
                self._events(say=lambda text: self._stream(header, "stderr", text)), spec,
                forward=self._on_remote, prepare=take_over, announce=False))
        except BaseException:
            self.core.options = kept  # nothing changed
            raise
        finally:
            self._status_target = None
        grant = self.core.remote.grant
        lines = [(f"cloudgpu: now on {grant.display} (kernel {grant.kernel_id}), ready in "
                 f"{time.monotonic() - started:.1f} s.")]
        if old is not None:
            lines.append(f"cloudgpu: released {old.grant.display} (kernel {old.grant.kernel_id}).")
        self._stream(header, "stdout", "\n".join([*lines, *report.summary()]) + "\n")
        if report.failed:
            self._stream(header, "stderr", report.failures() + "\n")

    async def _continue_count(self, session: RemoteSession, execution_count: int) -> None:
        """Number the next cell ``execution_count``, so a switch does not restart at [1]."""
        code = f"get_ipython().execution_count = {int(execution_count)}"
        reply = await session.kernel.request("shell", "execute_request", {
            "code": code, "silent": True, "store_history": False, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": False}, HANDSHAKE_TIMEOUT)
        if reply["content"].get("status") != "ok":
            raise CloudGPUError(f"The remote kernel refused `{code}`: {reply['content']}")
