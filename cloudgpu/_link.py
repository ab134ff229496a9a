"""The durable connection to one remote kernel: reconnected when it drops, nothing lost or doubled.

One websocket at a time carries a session's messages. When it breaks (a laptop closed, a
network changed, a proxy restarted), the link opens a new one with backoff and jitter,
saying how many frames it received (``cloudgpu_since``). The host answers with a notice
of how many of ours it received, replays what we missed, and the link sends again what
the host missed from its own bounded log, all before anything new goes out. Frames are
counted, not numbered: TCP keeps each connection's frames in order, so counts are enough
(see ``remote_host/host/replay.py`` for the host's side).

The link gives up, and says why, when the host says the kernel is gone (it was stopped,
or it died), refuses our token (the pool ended the session), when the provider says the
session ended (its machine was lost), or when no connection could be made for
``reconnect_timeout`` seconds. A kernel that was running something when the connection
dropped (a long training, as a network stays away) is the exception, where a provider
watches the session: the cell goes on there without us, so the link keeps trying until
the provider says the session ended (it stops one whose cell ran on alone for too long),
or the user interrupts (:meth:`KernelLink.stop_waiting`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from . import _wire
from ._wire import CONFUSED, KERNEL_DIED, KERNEL_STOPPED, REPLACED
from .errors import (
    AuthenticationError,
    CloudGPUError,
    HostConnectionError,
    RemoteKernelDiedError,
)
from .host_client import HostClient, KernelConnection

__all__ = ["KernelLink"]

log = logging.getLogger("cloudgpu.client")

TOO_BIG = 1009  # RFC 6455: a message bigger than the host accepts

RECONNECT_TIMEOUT = 120.0
SEND_LOG_BYTES = 64 * 2**20
FIRST_DELAY, MAX_DELAY = 0.1, 5.0
NOTICE_TIMEOUT = 30.0
#: Seconds a reconnection waits for the provider to say whether the session still runs
#: (longer, and the kernel is resumed without its word).
CHECK_BEFORE_RESUMING = 5.0
FIRST_CONNECT_TIMEOUT = 20.0

#: Something the user should hear about the connection, as a sentence.
Notice = Callable[[str], None]


class _CannotResend(Exception):
    """What the host is missing of ours is no longer in the send log."""


class KernelLink:
    """One session's connection to one kernel, across websockets.

    Args:
        host: the host's client (its token opens the kernel).
        kernel_id: the kernel.
        session: the Jupyter session id of the messages we send; the host keeps the
            session's channels and replay log under it.
        on_message: every message of a Jupyter channel, in order, exactly once.
        on_notice: sentences for the user (the connection dropped, came back, lost N).
        on_gone: called once with the error that says why the link gave up.
        check: asks the provider whether the session ended and why (None: it did not);
            asked while reconnecting, so that a lost machine is not waited for, and once
            the kernel answers again, so that one whose session ended is not resumed.
        reconnect_timeout: seconds to keep trying to reconnect (with ``check``, for as
            long as the provider keeps the session while the kernel runs something).
    """

    def __init__(self, host: HostClient, kernel_id: str, session: str, *,
                 on_message: Callable[[str, _wire.Message], None],
                 on_notice: Notice, on_gone: Callable[[CloudGPUError], None],
                 check: Callable[[], Awaitable[str | None]] | None = None,
                 reconnect_timeout: float = RECONNECT_TIMEOUT,
                 send_log_bytes: int = SEND_LOG_BYTES) -> None:
        self.host = host
        self.kernel_id = kernel_id
        self.session = session
        self._on_message = on_message
        self._on_notice = on_notice
        self._on_gone = on_gone
        self._check = check
        self.reconnect_timeout = reconnect_timeout
        self.send_log_bytes = send_log_bytes
        self.conn: KernelConnection | None = None
        #: Frames of the Jupyter channels received, over all connections.
        self.received = 0
        #: Frames sent (or queued to send), over all connections.
        self.sent = 0
        #: The last of those written to a connection (the host may have it); the ones
        #: after it are queued, and cannot have reached the kernel.
        self.written = 0
        #: How many times the link reconnected.
        self.reconnects = 0
        self._log: collections.deque[tuple[int, bytes]] = collections.deque()
        self._log_bytes = 0
        self._write = asyncio.Lock()
        self._connected = False
        self._gone = False
        self._closing = False
        self._death: dict[str, Any] | None = None
        self._kernel_busy = False  # as its last status said
        self._waiting_since: float | None = None  # reconnecting past the timeout, since
        self._running: list[str] = []  # execute requests sent whose idle did not come yet
        # What a new connection delivered before the link knows it resumes on it.
        self._held: list[tuple[str, _wire.Message]] | None = None
        self._notice: asyncio.Future[dict[str, Any]] | None = None
        self._reconnecting: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        """Whether frames go out now; False while the link reconnects (what is sent then
        waits for the connection) and once it gave up."""
        return self._connected

    async def open(self) -> None:
        """Open the first websocket; a connection that breaks while opening is tried again
        (with backoff, for up to ``FIRST_CONNECT_TIMEOUT`` seconds).

        Raises:
            HostConnectionError, AuthenticationError, RemoteKernelDiedError: as the host answers.
        """
        started, delay = time.monotonic(), FIRST_DELAY
        while True:
            try:
                self.conn = await self._connect()
                break
            except HostConnectionError as e:
                if time.monotonic() - started > min(FIRST_CONNECT_TIMEOUT, self.reconnect_timeout):
                    raise
                log.info("Connecting to kernel %s failed (%s); trying again", self.kernel_id, e)
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, MAX_DELAY)
        self._connected = True  # nothing can have been lost yet: no need to wait the notice

    async def _connect(self) -> KernelConnection:
        conn = await self.host.connect(self.kernel_id, self._receive, session_id=self.session,
                                       since=self.received)
        conn.closed.add_done_callback(lambda closed: self._on_closed(conn, closed.result()))
        return conn

    # --- sending ---------------------------------------------------------------------------

    async def send(self, frame: bytes, execute: str | None = None) -> None:
        """Send one framed message; if the connection is down, it goes once it is back.
        ``execute``: its msg_id, when it is an execute request (the link counts it as
        running until the kernel's idle status for it comes).

        Raises:
            CloudGPUError: the link gave up (why is in the error).
        """
        async with self._write:
            if self._gone:
                raise HostConnectionError(f"The connection to kernel {self.kernel_id} is gone.")
            self.sent += 1
            self._keep(self.sent, frame)
            if execute is not None:
                self._running.append(execute)
            if self._connected and self.conn is not None:
                self.written = self.sent
                try:
                    await self.conn.send_frame(frame)
                except HostConnectionError:
                    pass  # kept in the log: sent again once reconnected, if the host lacks it

    def _keep(self, number: int, frame: bytes) -> None:
        self._log.append((number, frame))
        self._log_bytes += len(frame)
        while len(self._log) > 1 and self._log_bytes > self.send_log_bytes:
            self._log_bytes -= len(self._log.popleft()[1])

    # --- receiving -------------------------------------------------------------------------

    def _receive(self, channel: str, msg: _wire.Message) -> None:
        if channel == _wire.NOTICE_CHANNEL:
            self._on_host_notice(msg["content"])
            return
        self.received += 1  # a malformed one too: the host counted it as sent
        if channel == "iopub" and msg.get("msg_type") == "status":
            state = (msg.get("content") or {}).get("execution_state")
            self._kernel_busy = state == "busy"
            if state == "idle":
                self._ended((msg.get("parent_header") or {}).get("msg_id"))
            elif state == "starting":
                self._running.clear()  # a new kernel process: what was sent will not end
        if not channel or self._gone:
            return  # (once the link gave up, what a closing connection still brings is not ours)
        if self._held is not None:
            self._held.append((channel, msg))
        else:
            self._on_message(channel, msg)

    def _ended(self, msg_id: str | None) -> None:
        """The kernel is idle after ``msg_id``: it ran, and so did every execute request
        sent before it (a kernel runs them in order)."""
        if msg_id in self._running:
            del self._running[:self._running.index(msg_id) + 1]

    def _on_host_notice(self, content: dict[str, Any]) -> None:
        if "replay" in content:
            if self._notice is not None and not self._notice.done():
                self._notice.set_result(content["replay"])
        elif "kernel" in content:
            self._death = dict(content["kernel"])

    # --- losing and finding the connection ---------------------------------------------------

    def _on_closed(self, conn: KernelConnection, frame: tuple[int, str] | None) -> None:
        if conn is not self.conn or self._closing or self._gone:
            return
        self._connected = False
        code = frame[0] if frame is not None else None
        if code == KERNEL_STOPPED:
            self._give_up(RemoteKernelDiedError(
                f"The remote kernel {self.kernel_id} was stopped.", shut_down=True))
        elif code == KERNEL_DIED:
            self._give_up(RemoteKernelDiedError(self._death_text()))
        elif code == TOO_BIG:
            self._give_up(HostConnectionError(
                f"The host closed the connection to kernel {self.kernel_id}: a message was "
                f"bigger than it accepts ({frame[1] if frame else ''})."))
        elif code in (REPLACED, CONFUSED):
            self._give_up(HostConnectionError(
                f"The host ended the connection to kernel {self.kernel_id}: "
                f"{frame[1] if frame else ''}."))
        elif self._reconnecting is not None and not self._reconnecting.done():
            # The new connection broke during the handshake: let that attempt fail now.
            if self._notice is not None and not self._notice.done():
                self._notice.set_exception(HostConnectionError("closed during the handshake"))
                self._notice.exception()  # retrieved: the attempt awaiting it raises it
        else:
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    def _death_text(self) -> str:
        how = self._death or {}
        text = f"The remote kernel {self.kernel_id} died: {how.get('reason', 'it stopped')}"
        memory = how.get("gpu_memory_used_mb")
        if memory is not None:
            text += f"; it held {memory:,.0f} MiB of GPU memory at the end"
        return text + "."

    async def _reconnect(self) -> None:
        started = time.monotonic()
        self._on_notice("the connection to the host dropped; reconnecting ...")
        delay = FIRST_DELAY
        while not self._gone and not self._closing:
            self._held = []  # the replay waits until the kernel is known to be ours still
            try:
                async with self._write:  # nothing new goes out before the host says what it has
                    conn = await self._connect()
                    self.conn, self._notice = conn, asyncio.get_running_loop().create_future()
                    replay = await asyncio.wait_for(asyncio.shield(self._notice), NOTICE_TIMEOUT)
                    # The kernel answers, but the pool may have ended its session while we
                    # were cut off (a host it judged lost): a kernel it will stop, whose
                    # time nobody pays for. Ask before anything more is sent to it.
                    why = await self._ask(CHECK_BEFORE_RESUMING)
                    if why:
                        self._stop_holding(deliver=False)  # not ours: sent after the end
                        self._give_up(self._pool_says(why))
                        await conn.close()
                        return
                    await self._resend(conn, int(replay.get("received", 0)))
                    self._connected = True
            except (AuthenticationError, RemoteKernelDiedError) as e:
                self._stop_holding()
                why = await self._ask()
                self._give_up(RemoteKernelDiedError(
                    f"The remote kernel {self.kernel_id} was stopped while the connection was "
                    f"down{f': {why}' if why else f' ({e})'}."))
                return
            except _CannotResend as e:
                self._stop_holding()
                self._give_up(HostConnectionError(str(e)))
                return
            except (HostConnectionError, asyncio.TimeoutError, OSError) as e:
                self._stop_holding()  # counted as received: the next replay starts after it
                log.info("Reconnecting to kernel %s failed: %s", self.kernel_id, e)
                why = await self._ask()
                if why:
                    self._give_up(self._pool_says(why))
                    return
                waited = time.monotonic() - started
                if waited > self.reconnect_timeout:
                    if not self._runs_on_without_us():
                        self._give_up(HostConnectionError(
                            f"The connection to the host of kernel {self.kernel_id} dropped "
                            f"and could not be made again within "
                            f"{self.reconnect_timeout:.0f} s (last: {e})."))
                        return
                    if self._waiting_since is None:
                        self._waiting_since = started
                        self._on_notice(
                            f"still reconnecting after {waited:.0f} s; a cell was running (or "
                            f"on its way to the remote kernel) when the connection dropped, "
                            f"and goes on there without us, so cloudgpu keeps trying for as "
                            f"long as the pool keeps the session (interrupt to stop waiting)")
                await asyncio.sleep(random.uniform(delay / 2, delay))  # jitter
                delay = min(delay * 2, MAX_DELAY)
                continue
            self.reconnects += 1
            self._waiting_since = None
            lost = int(replay.get("lost", 0))
            self._on_notice(
                f"reconnected after {time.monotonic() - started:.1f} s; "
                + (f"{lost} message{'s' if lost != 1 else ''} from the kernel were lost (the "
                   f"outage outlasted the host's replay buffer)" if lost else "nothing was lost"))
            self._stop_holding()
            return

    def _stop_holding(self, deliver: bool = True) -> None:
        """Deliver what the new connection held back (or drop it), and hold no more."""
        held, self._held = self._held, None
        for channel, msg in held if deliver and held else ():
            self._on_message(channel, msg)

    async def stop_waiting(self) -> bool:
        """Give up a reconnection that goes on past ``reconnect_timeout`` for a running cell
        (the user interrupted, and the host cannot be reached to interrupt it); whether
        there was one. The cell fails saying so; the remote kernel may still run it."""
        if self._waiting_since is None or self._gone or self._closing:
            return False
        self._give_up(HostConnectionError(
            f"The connection to the host of kernel {self.kernel_id} dropped "
            f"{time.monotonic() - self._waiting_since:.0f} s ago and could not be made "
            f"again, and you stopped waiting for it. The cell may still be running there, "
            f"without us."))
        task = self._reconnecting
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        if self.conn is not None:
            await self.conn.close()  # one opened as the attempt was cancelled
        return True

    def _runs_on_without_us(self) -> bool:
        """Whether the kernel was running something (or had an execute request of ours
        not yet ended) when the connection dropped, and a provider watches the session: it
        ends one that runs on without a client for too long, and the link hears of that
        from it."""
        return self._check is not None and (self._kernel_busy or bool(self._running))

    async def _resend(self, conn: KernelConnection, host_received: int) -> None:
        """Send again what the host did not get, in order.

        Raises:
            _CannotResend: some of it is no longer in the log.
            HostConnectionError: the new connection broke too.
        """
        missing = [(n, frame) for n, frame in self._log if n > host_received]
        first = missing[0][0] if missing else self.sent + 1
        if host_received < self.sent and first != host_received + 1:
            raise _CannotResend(
                f"The connection to kernel {self.kernel_id} dropped while "
                f"{self.sent - host_received} message(s) to it were on their way, and some "
                f"are too old to send again; the running cell may have lost inputs. Run it "
                f"again.")
        for number, frame in missing:
            self.written = max(self.written, number)
            await conn.send_frame(frame)

    async def _ask(self, timeout: float | None = None) -> str | None:
        if self._check is None:
            return None
        try:
            return await asyncio.wait_for(self._check(), timeout)
        except (CloudGPUError, asyncio.TimeoutError):
            return None  # the provider cannot say either: keep trying the host

    def _pool_says(self, why: str) -> RemoteKernelDiedError:
        return RemoteKernelDiedError(
            f"The connection to the cloudgpu host at {self.host.url} was lost (remote "
            f"kernel {self.kernel_id}), and the pool says: {why}.")

    def _give_up(self, error: CloudGPUError) -> None:
        if self._gone:
            return
        self._gone = True
        self._connected = False
        self._on_gone(error)

    async def close(self) -> None:
        """Close the connection for good (not a loss: ``on_gone`` is not called)."""
        self._closing = True
        if self._reconnecting is not None and not self._reconnecting.done():
            self._reconnecting.cancel()
        if self.conn is not None:
            await self.conn.close()
