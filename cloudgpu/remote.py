"""One connection to one remote kernel, the one every front-end drives it through.

:class:`RemoteKernel` owns the websocket to a granted kernel and everything about the
conversation on it:

- **Our own requests** carry this connection's Jupyter session id. Whatever the kernel
  sends parented to one of them (replies, iopub) goes to the route registered for that
  request; nothing of ours ever reaches anyone else.
- **Relayed traffic** (the Cloud GPU kernel's frontends, who keep their own headers) goes
  to ``forward``, untouched.
- **The agent comm** (``cloudgpu.agent``): opened with our versions as soon as the socket
  is up; the agent's ``hello`` answers with its own (the version handshake), and
  ``push``, ``pull`` and ``snapshot`` exchanges are matched by batch id.
- **The side channel** (``cloudgpu._side``): frames of 1 MiB and more go on a connection
  of their own to the agent, opened once the agent says it serves one, and kept. When it
  cannot be opened (an old host, a proxy, turned off) they go as comm messages; when it
  breaks mid-transfer, a push's values are sent again as comm messages and a pull is asked
  again without it. Never a silently wrong value.
- **Death**, one mechanism: the link (``cloudgpu._link.KernelLink``) giving up (the host
  says the kernel was stopped or died, refuses our token, or cannot be reached again), or
  the kernel's iopub status turning ``dead`` or ``restarting``. Either resolves
  :attr:`RemoteKernel.lost` with the error that says what happened, fails everything
  still waiting, and calls the ``on_lost`` callbacks once. Closing the connection
  ourselves is not a loss. A connection that merely dropped is made again by the link,
  with nothing lost; front-ends hear of it through ``on_notice``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from . import _wire
from ._http import tls_context
from ._link import RECONNECT_TIMEOUT, KernelLink, Notice
from ._side import Buffer, SideChannel, SideError, pick
from ._transfer import Assembler, pack
from .errors import CloudGPUError, HostConnectionError, RemoteKernelDiedError, SerializationError
from .host_client import HostClient
from .provider import Grant
from .serialize import Serialized, versions

__all__ = ["AGENT_TARGET", "AgentBatch", "Forward", "RemoteKernel", "version_skew"]

T = TypeVar("T")

log = logging.getLogger("cloudgpu.client")

AGENT_TARGET = "cloudgpu.agent"
DEATH_STATES = frozenset({"restarting", "autorestarting", "dead"})
PROGRESS_MIN_BYTES = 32 * 2**20
SIDE_TRIES = 3  # failed side channel openings (that may succeed later) before we stop trying

#: Receives each message that is not this connection's own business: (channel, message).
Forward = Callable[[str, _wire.Message], None]
#: Receives each message parented to one of our requests: (channel, message).
Route = Callable[[str, _wire.Message], None]
#: Receives transfer progress: {"direction": "push"|"pull", "done": bytes, "total": bytes}.
Progress = Callable[[dict[str, Any]], None]
#: Sends a request to the agent some other way than its own comm message.
Send = Callable[[dict[str, Any]], Awaitable[None]]
#: Takes an agent message (its data and buffers) that another message carries.
Carry = Callable[[dict[str, Any], list[memoryview]], Awaitable[None]]
#: Buffers an execute request may carry for a push: bigger ones go as comm messages.
CARRY_MAX = 1 << 20


class AgentBatch:
    """One exchange with the agent: the messages that come back under one batch id.

    Attributes:
        id: the batch id.
        assembler: rebuilds the values a ``pulled`` or ``snapshot`` answer carries.
        done: resolves with the answer's final part (``errors``, ``stale``, ...).
        answered: whether that final part came (big frames may still be on the way).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_progress: Progress | None) -> None:
        self.id = uuid.uuid4().hex
        self.assembler = Assembler()
        self.done: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.answered = False
        self._on_progress = on_progress
        self._side: asyncio.Task[list[Buffer]] | None = None
        self._side_channel: SideChannel | None = None
        self._ask_again: Callable[[], Awaitable[None]] | None = None
        self._asking: asyncio.Task[None] | None = None

    def expect_side(self, side: SideChannel, ask_again: Callable[[], Awaitable[None]]) -> None:
        """Receive this answer's big frames on ``side``; if they do not come whole, ask
        again with ``ask_again`` (the same request, without the side channel)."""
        def report(done: int, total: int) -> None:
            if self._on_progress is not None and total >= PROGRESS_MIN_BYTES:
                self._on_progress({"direction": "pull", "done": done, "total": total})

        self._ask_again = ask_again
        self._side_channel = side
        self._side = asyncio.ensure_future(side.receive(self.id, report))
        self._side.add_done_callback(_retrieve)

    def feed(self, data: dict[str, Any], buffers: list[Any]) -> None:
        """Take one message of the answer."""
        if data.get("op") in ("pushed", "ran_on"):
            self.answered = True
            self._resolve(data)
            return
        if data.get("op") == "side_failed":  # the big frames the answer named will not come
            if self._side_channel is not None and self._side_channel.id == data.get("side"):
                self._side_channel.close()  # its receive fails: the values are asked again
            return
        self.assembler.feed(data, buffers)
        if self._on_progress is not None and self.assembler.total >= PROGRESS_MIN_BYTES:
            self._on_progress({"direction": "pull", "done": self.assembler.received,
                               "total": self.assembler.total})
        if not self.assembler.done:
            return
        self.answered = True
        side = self._side
        if data.get("side_failed") and self._side_channel is not None:
            self._side_channel.close()  # the agent could not send: stop waiting for it
        if side is not None and self.assembler.side():
            side.add_done_callback(lambda _: self._side_arrived(side, data))
        else:
            self._resolve(data)

    def _side_arrived(self, side: asyncio.Task[list[Buffer]], data: dict[str, Any]) -> None:
        try:
            self.assembler.fill_side(side.result())
        except (SideError, ValueError, asyncio.CancelledError) as e:
            log.warning("Batch %s did not come whole by the side channel (%s); asking again "
                        "without it", self.id, e)
            self._side, self.assembler = None, Assembler()
            if self._ask_again is not None:
                self._asking = asyncio.ensure_future(self._ask_again())
                self._asking.add_done_callback(self._asked)
            return
        except MemoryError as e:  # asked again, they would not fit either
            self.fail(SerializationError(
                f"The values pulled do not fit in this process's memory ({e}); they stay in "
                "the remote kernel. Pull a smaller part of them, or free memory here first."))
            return
        except Exception as e:  # a fault of ours: the cell fails rather than wait for ever
            log.exception("Batch %s: receiving its side channel frames failed", self.id)
            self.fail(e)
            return
        self._resolve(data)

    def _asked(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.fail(task.exception())  # type: ignore[arg-type]

    def _resolve(self, data: dict[str, Any]) -> None:
        if not self.done.done():
            self.done.set_result(data)

    def fail(self, error: BaseException) -> None:
        """End the exchange with ``error`` (the kernel or the connection is gone)."""
        if not self.done.done():
            self.done.set_exception(error)
            self.done.exception()  # retrieved here: whoever awaits it raises it


class RemoteKernel:
    """A granted remote kernel and the one websocket that drives it.

    Use :meth:`open`; see the module docstring for who gets which message.

    Args:
        grant: what the provider handed out.
        forward: receives every message that is not ours (relayed frontends' traffic).
        check: asks the provider whether the session ended, and why (see ``KernelLink``).
        reconnect_timeout: seconds to keep reconnecting after the connection dropped.
    """

    def __init__(self, grant: Grant, forward: Forward | None = None, *,
                 check: Callable[[], Awaitable[str | None]] | None = None,
                 reconnect_timeout: float = RECONNECT_TIMEOUT, side_channel: bool = True) -> None:
        self.grant = grant
        self.forward = forward
        self.host = HostClient(grant.host_url, grant.token)
        #: The Jupyter session id of the messages we send for ourselves.
        self.session = uuid.uuid4().hex
        self.link = KernelLink(self.host, grant.kernel_id, self.session,
                               on_message=self._on_message, on_notice=self._notice,
                               on_gone=self._lose, check=check,
                               reconnect_timeout=reconnect_timeout)
        self.comm_id = uuid.uuid4().hex
        #: When this connection was opened (``time.monotonic()``), for uptime.
        self.opened = time.monotonic()
        #: The agent's greeting: its versions, hostname, pid and devices.
        self.remote: dict[str, Any] = {}
        #: Differences between the two sides that can break unpickling, as sentences.
        self.version_warnings: list[str] = []
        loop = asyncio.get_running_loop()
        #: Resolves (with the error saying why, as a value) once the kernel is lost.
        self.lost: asyncio.Future[CloudGPUError] = loop.create_future()
        self._hello: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._routes: dict[str, Route] = {}
        self._batches: dict[str, AgentBatch] = {}
        self._lost_callbacks: list[Callable[[CloudGPUError], None]] = []
        self._notice_callbacks: list[Notice] = []
        self._closing = False
        self._side_wanted = side_channel
        self._side_task: asyncio.Task[SideChannel | None] | None = None
        #: Why big frames take the comm path on this kernel for good, once we know.
        self.side_off: str | None = None if side_channel else "turned off"
        self._side_failures = 0

    @classmethod
    async def open(cls, grant: Grant, forward: Forward | None = None, *,
                   check: Callable[[], Awaitable[str | None]] | None = None,
                   reconnect_timeout: float = RECONNECT_TIMEOUT,
                   side_channel: bool = True) -> RemoteKernel:
        """Connect to the granted kernel and greet its agent (without waiting for the answer).

        With ``side_channel`` False, big values take the kernel websocket too.

        Raises:
            HostConnectionError: the host cannot be reached.
            AuthenticationError: the host refused the grant's token.
        """
        kernel = cls(grant, forward, check=check, reconnect_timeout=reconnect_timeout,
                     side_channel=side_channel)
        try:
            await kernel.link.open()
            await kernel.agent_send({"versions": versions()}, open_comm=True)
        except BaseException:
            await kernel.close()
            raise
        return kernel

    @property
    def kernel_id(self) -> str:
        """The remote kernel's id."""
        return self.grant.kernel_id

    @property
    def alive(self) -> bool:
        """False once the kernel died or the connection dropped or was closed."""
        return not self.lost.done() and not self._closing

    # --- sending ---------------------------------------------------------------------------

    def message(self, msg_type: str, content: dict[str, Any], **kw: Any) -> _wire.Message:
        """A new message of our own (parented replies come back to its route)."""
        return _wire.new_message(msg_type, content, self.session, **kw)

    async def send(self, channel: str, msg: _wire.Message) -> None:
        """Send one message, ours or relayed.

        Raises:
            CloudGPUError: why the kernel is lost, when it is.
        """
        if self.lost.done():
            raise self.lost.result()
        try:
            header = msg["header"]
            runs = channel == "shell" and header.get("msg_type") == "execute_request"
            await self.link.send(_wire.encode(channel, msg), header.get("msg_id") if runs else None)
        except CloudGPUError:
            if self.lost.done():  # the link gave up meanwhile: say why
                raise self.lost.result() from None
            raise

    def route(self, msg_id: str, handler: Route) -> None:
        """Deliver what the kernel sends parented to our request ``msg_id`` to ``handler``."""
        self._routes[msg_id] = handler

    def unroute(self, msg_id: str) -> None:
        """Stop delivering for ``msg_id``; later messages parented to it are dropped."""
        self._routes.pop(msg_id, None)

    async def request(self, channel: str, msg_type: str, content: dict[str, Any],
                      timeout: float) -> _wire.Message:
        """Send a request of our own and wait for its reply.

        Raises:
            HostConnectionError: no reply within ``timeout`` seconds.
            CloudGPUError: why the kernel was lost meanwhile.
        """
        msg = self.message(msg_type, content)
        msg_id = msg["header"]["msg_id"]
        reply: asyncio.Future[_wire.Message] = asyncio.get_running_loop().create_future()

        def on_reply(reply_channel: str, answer: _wire.Message) -> None:
            if reply_channel != "iopub" and not reply.done():
                reply.set_result(answer)

        self.route(msg_id, on_reply)
        try:
            await self.send(channel, msg)
            return await self.wait(reply, timeout, f"answer {msg_type}")
        finally:
            self.unroute(msg_id)

    async def wait(self, future: asyncio.Future[T], timeout: float | None, what: str) -> T:
        """``future``'s result; the loss error if the kernel is lost first.

        Raises:
            HostConnectionError: nothing within ``timeout`` seconds (``what`` says what).
        """
        waiting: list[asyncio.Future[Any]] = [future, self.lost]
        await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if future.done():
            return future.result()
        if self.lost.done():
            raise self.lost.result()
        raise HostConnectionError(
            f"The remote kernel {self.kernel_id} on {self.grant.host_url} did not {what} "
            f"within {timeout:.0f} s."
        )

    async def kernel_info(self, timeout: float = 60.0) -> dict[str, Any]:
        """The remote kernel's ``kernel_info_reply`` content (language, banner, ...)."""
        reply = await self.request("shell", "kernel_info_request", {}, timeout)
        return dict(reply["content"])

    async def interrupt(self) -> None:
        """Interrupt whatever the kernel runs, through the host. A host that cannot be
        reached while the link waits on for a running cell past its reconnect timeout
        ends that wait instead (see ``KernelLink.stop_waiting``)."""
        try:
            await self.host.interrupt(self.kernel_id)
        except HostConnectionError:
            if not await self.link.stop_waiting():
                raise

    # --- the agent -------------------------------------------------------------------------

    async def ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """The agent's greeting, once it came; ``remote`` and ``version_warnings`` are set.

        Raises:
            HostConnectionError: the agent did not answer in time.
        """
        if not self.remote:
            hello = await self.wait(self._hello, timeout,
                                    "answer the cloudgpu agent's greeting (is the agent loaded "
                                    "there, or is the kernel still starting?)")
            self.version_warnings = version_skew(versions(), hello.get("versions", {}))
            self.remote = hello
        return self.remote

    def batch(self, on_progress: Progress | None = None) -> AgentBatch:
        """A new exchange with the agent; its answer is fed to it as it arrives."""
        batch = AgentBatch(asyncio.get_running_loop(), on_progress)
        self._batches[batch.id] = batch
        batch.done.add_done_callback(lambda _: self._batches.pop(batch.id, None))
        return batch

    def forget(self, *batches: AgentBatch) -> None:
        """Stop waiting for these exchanges' answers (their cell is over)."""
        for batch in batches:
            self._batches.pop(batch.id, None)

    async def agent_send(self, data: dict[str, Any], buffers: list[Any] | None = None, *,
                         open_comm: bool = False) -> None:
        """One message to the agent (the comm's first, with ``open_comm``)."""
        if open_comm:
            content = {"comm_id": self.comm_id, "target_name": AGENT_TARGET, "data": data}
            await self.send("shell", self.message("comm_open", content))
        else:
            await self.send("shell", self.message(
                "comm_msg", {"comm_id": self.comm_id, "data": data}, buffers=buffers))

    async def push(self, values: dict[str, Serialized], batch: AgentBatch,
                   on_progress: Progress | None = None, verify: bool = False,
                   carry: Carry | None = None) -> None:
        """Send ``values`` to the agent as batch ``batch``; its ``pushed`` answer resolves it.

        Big frames go by the side channel first, when there is one. With ``verify``, the
        agent fingerprints each value it is asked to keep, trusting no check it made
        before (see ``remote_host/host/held.py``). Where what is left fits one message
        with at most ``CARRY_MAX`` bytes of buffers, ``carry`` takes it instead of a comm
        message (an execute request carries it, see ``push_on_execute``).
        """
        total = sum(v.nbytes for v in values.values())
        sent = 0

        def report(done: int, _: int) -> None:
            if on_progress is not None and total >= PROGRESS_MIN_BYTES:
                on_progress({"direction": "push", "done": done, "total": total})

        extra: dict[str, Any] = {"op": "push", "id": batch.id,
                                 **({"verify": True} if verify else {})}
        picked = pick(values)
        frames = list(values.values())
        for _ in range(2 if picked else 0):  # a side channel that broke is opened once more
            side = await self.side_channel()
            if side is None:
                break
            try:
                await side.send(batch.id, [frames[vi].frames[fi] for vi, fi in picked], report)
            except SideError as e:
                log.warning("Kernel %s: %s", self.kernel_id, e)
                continue
            extra["side"] = side.id
            sent = sum(frames[vi].frames[fi].nbytes for vi, fi in picked)
            break
        if "side" not in extra:
            picked = []  # the websocket carries them
        parts = list(pack(values, extra=extra, side=picked))
        if carry is not None and len(parts) == 1 and \
                sum(b.nbytes for b in parts[0][1]) <= CARRY_MAX:
            await carry(*parts[0])
            report(total, total)
            return
        for data, buffers in parts:
            await self.agent_send(data, buffers)
            sent += sum(b.nbytes for b in buffers)
            report(sent, total)

    async def pull(self, names: list[str], batch: AgentBatch, only_if_ok: bool = True,
                   send: Send | None = None) -> None:
        """Ask the agent for ``names``; they arrive in ``batch``'s assembler (big frames by
        the side channel, when there is one). ``send`` carries the first request (by
        default a comm message; an execute request can, see ``pull_on_execute``)."""
        request = {"op": "pull", "id": batch.id, "names": names, "only_if_ok": only_if_ok}

        async def ask(request: dict[str, Any], tries: int, send: Send) -> None:
            side = await self.side_channel() if tries else None
            if side is None:
                await send(request)
                return
            # Asked again (once more by a new side channel, then by the websocket), the
            # values come whole; the cell has run (the agent sent them), so it is not
            # asked again whether it succeeded.
            again = {**request, "only_if_ok": False}
            batch.expect_side(side, lambda: ask(again, tries - 1, self.agent_send))
            await send({**request, "side": side.id})

        await ask(request, 2, send or self.agent_send)

    def greeted(self, feature: str) -> bool:
        """Whether the agent has greeted us and serves ``feature`` (a flag of its hello)."""
        hello = self._hello
        return hello.done() and hello.exception() is None and bool(hello.result().get(feature))

    async def side_channel(self) -> SideChannel | None:
        """The side channel to the agent, opened if need be; None where big frames take
        the websocket (turned off, refused, not served, or the agent has not greeted us)."""
        if self.side_off is not None or not self.greeted("side"):
            return None
        task = self._side_task
        if task is not None and task.done():
            side = task.result()
            if side is not None and side.broken is None:
                return side
            task = None  # broke, or could not be opened the last time: try again
        if task is None:
            task = self._side_task = asyncio.ensure_future(self._open_side())
        return await asyncio.shield(task)

    async def _open_side(self) -> SideChannel | None:
        try:
            return await SideChannel.open(self.grant.host_url, self.grant.token,
                                          self.kernel_id, tls_context)
        except SideError as e:
            self._side_failures += 1
            if e.permanent or self._side_failures >= SIDE_TRIES:
                self.side_off = str(e)
            log.warning("Kernel %s: big values go by the websocket: %s", self.kernel_id, e)
            return None

    def _close_side(self) -> None:
        task, self._side_task = self._side_task, None
        if task is None:
            return
        if task.done():
            side = task.result()
            if side is not None:
                side.close()
        else:
            task.add_done_callback(_close_opened)

    async def snapshot(self, timeout: float = 600.0) -> tuple[dict[str, Serialized],
                                                                dict[str, str]]:
        """Every variable of the kernel that can move, as frames, and why the others cannot.

        Raises:
            HostConnectionError: the agent sent nothing within ``timeout`` seconds.
            SerializationError: the agent failed taking them (a fault of its own).
        """
        batch = self.batch()
        await self.agent_send({"op": "snapshot", "id": batch.id})
        final = await self.wait(batch.done, timeout, "send its variables")
        if final.get("failed"):
            raise SerializationError(f"The old kernel's variables could not be taken: "
                                     f"{final['failed']}.")
        return batch.assembler.values(), dict(final.get("errors", {}))

    async def ran_on(self, timeout: float = 60.0) -> dict[str, Any]:
        """What the remote kernel runs on (GPUs, driver, CUDA, Python, imported packages), as
        its agent reports it for ``metadata.cloudgpu.ran_on``.

        Raises:
            HostConnectionError: the agent did not answer within ``timeout`` seconds.
        """
        batch = self.batch()
        await self.agent_send({"op": "ran_on", "id": batch.id})
        answer = await self.wait(batch.done, timeout, "say what it runs on")
        return dict(answer["ran_on"])

    # --- receiving -------------------------------------------------------------------------

    def _on_message(self, channel: str, msg: _wire.Message) -> None:
        content = msg["content"]
        msg_type = msg["msg_type"]
        if channel == "iopub" and msg_type == "status" and \
                content.get("execution_state") in DEATH_STATES:
            self._lose(RemoteKernelDiedError(
                f"The remote kernel {self.kernel_id} on {self.grant.display} died "
                f"({content['execution_state']})."
            ))
            return
        if msg_type == "comm_msg" and content.get("comm_id") == self.comm_id:
            self._on_agent(content.get("data", {}), msg["buffers"])
            return
        parent = msg["parent_header"]
        if parent.get("session") == self.session:
            route = self._routes.get(parent.get("msg_id", ""))
            if route is not None:
                route(channel, msg)
            return  # ours, answered or not: never anyone else's business
        if self.forward is not None:
            self.forward(channel, msg)

    def _on_agent(self, data: dict[str, Any], buffers: list[Any]) -> None:
        if data.get("op") == "hello":
            if not self._hello.done():
                self._hello.set_result(data)
                if data.get("side") and self.side_off is None:  # open it before it is needed
                    self._side_task = asyncio.ensure_future(self._open_side())
            return
        batch = self._batches.get(str(data.get("id")))
        if batch is not None:
            batch.feed(data, buffers)

    # --- the end ---------------------------------------------------------------------------

    def on_notice(self, callback: Notice) -> Callable[[], None]:
        """Tell ``callback`` what happens to the connection (dropped, back, what was lost);
        returns the function that stops telling it."""
        self._notice_callbacks.append(callback)
        return lambda: self._notice_callbacks.remove(callback) \
            if callback in self._notice_callbacks else None

    def _notice(self, text: str) -> None:
        log.warning("Kernel %s on %s: %s", self.kernel_id, self.grant.host_url, text)
        for callback in list(self._notice_callbacks):
            try:
                callback(text)
            except Exception:  # a front-end's bug must not stop the reconnecting
                log.exception("A notice callback failed")

    def on_lost(self, callback: Callable[[CloudGPUError], None]) -> None:
        """Call ``callback(error)`` once if the kernel is lost (at once if it already is).

        Not called when we close the connection ourselves.
        """
        if self.lost.done():
            if not self._closing:
                asyncio.get_running_loop().call_soon(callback, self.lost.result())
            return
        self._lost_callbacks.append(callback)

    def _lose(self, error: CloudGPUError) -> None:
        if self.lost.done():
            return
        self.lost.set_result(error)
        self._close_side()
        for batch in list(self._batches.values()):
            batch.fail(error)
        if not self._hello.done():
            self._hello.set_exception(error)
            self._hello.exception()
        callbacks, self._lost_callbacks = self._lost_callbacks, []
        if not self._closing:
            for callback in callbacks:
                callback(error)

    async def close(self, shutdown: bool = False) -> None:
        """Disconnect; with ``shutdown`` also stop the remote kernel (a provider usually does)."""
        self._closing = True
        await self.link.close()
        task = self._side_task
        if task is not None and not task.done():
            await asyncio.wait([task])
        self._lose(RemoteKernelDiedError(f"The connection to the remote kernel "
                                         f"{self.kernel_id} was closed."))
        if shutdown:
            await self.host.shutdown(self.kernel_id)
        await self.host.aclose()


def version_skew(local: dict[str, str], remote: dict[str, str]) -> list[str]:
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


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Take a side receive's outcome, so that a failure nobody waited for is not reported."""
    if not task.cancelled():
        task.exception()


def _close_opened(task: asyncio.Task[SideChannel | None]) -> None:
    if not task.cancelled() and task.exception() is None and (side := task.result()):
        side.close()
