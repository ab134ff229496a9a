"""The remote kernel's launcher: ipykernel's own, with shell messages received where cells run.

ipykernel 7 reads every shell message on a thread of its own, the shell channel thread,
which serves subshells (code run concurrently on other threads) and hands each message for
the main shell on to the main thread through an inproc socket; each reply goes back the
same way. Those two hand-offs cost an empty cell 0.3 ms on the 2-core VM of
``bench/RESULTS.md`` (medians of 3.57 and 4.32 ms against 3.34 and 3.91 without them, two
runs of 300 alternating cells). So this kernel receives shell messages on its main
thread, as ipykernel 6 did, and offers no subshells: cloudgpu's clients never ask for one,
and the Cloud GPU kernel's ``kernel_info`` does not advertise them to its frontends.

Two things ipykernel does on that main-thread path are done exactly here: after a failed
cell it skips the cells that were sent before the failure was seen (see
:meth:`RemoteKernel._abort_queues`), and SIGINT wakes the kernel (see
:func:`_wake_on_interrupt`). With ipykernel 6 this launcher is ipykernel's, but for the
waking.

Run as ``python -m cloudgpu.remote_host.host.launcher -f CONNECTION_FILE [ipykernel's
options]``; the host's kernelspec does (``kernels.py``). It imports only ipykernel and
pyzmq.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from typing import TYPE_CHECKING, Any

import zmq
from ipykernel.ipkernel import IPythonKernel
from ipykernel.kernelapp import IPKernelApp
from traitlets import Type

if TYPE_CHECKING:
    from zmq.eventloop.zmqstream import ZMQStream

__all__ = ["RemoteKernel", "RemoteKernelApp", "main"]


class _NoShellChannelThread:
    """Where ipykernel 7 keeps its shell channel thread, when there is none.

    False, as ``None`` is, for the checks that choose the main-thread paths; and it names
    the thread cells run on (``parent_thread``), which ipykernel's path for cells with a
    top-level ``await`` reads without checking for a shell channel thread first.
    """

    def __init__(self) -> None:
        self.parent_thread = threading.current_thread()

    def __bool__(self) -> bool:
        return False


class _Received(list):
    """A shell message's frames, with its place in the order the kernel received them."""

    number = 0


class RemoteKernel(IPythonKernel):
    """ipykernel's kernel, saying it has no subshells, skipping after a failure exactly."""

    #: Shell messages received so far; the last one's number.
    shell_received = 0
    #: Execute requests numbered up to this one are skipped (a failed cell's followers).
    _skip_through = 0
    #: The shell stream whose messages are numbered (None: ipykernel's own ways stand).
    _numbered: ZMQStream | None = None

    @property
    def _supports_kernel_subshells(self) -> bool:
        return False

    def start(self) -> None:
        """ipykernel's start; each shell message is numbered as it is received."""
        super().start()
        stream = self.shell_stream
        handle = getattr(stream, "_recv_callback", None)
        if not self.has_trait("shell_channel_thread") or self.shell_channel_thread or \
                stream is None or handle is None:
            return  # ipykernel 6, or a shell channel thread: its own ways stand

        def receive(msg: list[Any]) -> Any:
            self.shell_received += 1
            numbered = _Received(msg)
            numbered.number = self.shell_received
            return handle(numbered)

        stream.on_recv(receive, copy=False)
        self._numbered = stream

    async def dispatch_shell(self, msg: Any, /, subshell_id: str | None = None, *,
                             concurrent: bool = False) -> None:
        """ipykernel's dispatch; an execute request is skipped if it came before the last
        failed cell answered."""
        if isinstance(msg, _Received):
            self._aborting = msg.number <= self._skip_through
        await super().dispatch_shell(msg, subshell_id, concurrent=concurrent)

    def _abort_queues(self, subshell_id: str | None = None) -> None:
        """After a failed cell (with ``stop_on_error``): skip the cells already sent.

        ipykernel skips every execute request until a callback it schedules on its loop
        has run, a few loop turns later; a cell sent as soon as the failure is seen could
        come sooner, and was skipped too: over loopback through the Cloud GPU kernel 1
        time in 5 after an interrupt, and most times while one of the user's threads kept
        the interpreter busy. Here the failure's reply has not left yet (it is queued on
        the shell stream), so what can be received now was sent before it was seen:
        exactly those cells are skipped, and every later one runs.
        """
        stream = self._numbered
        if stream is None or subshell_id is not None or self.stop_on_error_timeout:
            super()._abort_queues(subshell_id)  # a subshell, or a window asked for
            return
        stream.flush(zmq.POLLIN)  # numbers what arrived while the cell ran
        self._skip_through = self.shell_received
        self.log.info("Skipping the cells received before the failed one answered")


class RemoteKernelApp(IPKernelApp):
    """ipykernel's application, without the shell channel thread (ipykernel 7)."""

    kernel_class = Type(RemoteKernel, klass=IPythonKernel,
                        help="The kernel: ipykernel's, receiving on its main thread.").tag(
        config=True)

    def init_sockets(self, *args: Any, **kwargs: Any) -> None:
        """ipykernel's sockets; the shell socket is read on the main thread."""
        super().init_sockets(*args, **kwargs)
        unused = getattr(self, "shell_channel_thread", None)
        if unused is not None:  # ipykernel 7 made one; it is never started
            unused.io_loop.close()
            self.shell_channel_thread = None

    def init_kernel(self) -> None:
        """ipykernel's kernel, told that it has no shell channel thread."""
        super().init_kernel()
        if self.kernel.has_trait("shell_channel_thread"):
            self.kernel.shell_channel_thread = _NoShellChannelThread()
        _wake_on_interrupt(self.kernel.shell_stream.io_loop.asyncio_loop)


def _wake_on_interrupt(loop: asyncio.AbstractEventLoop) -> None:
    """Have SIGINT itself wake ``loop``, the loop the kernel's cells run on.

    ipykernel interrupts a cell awaiting at its top level (``await asyncio.sleep(60)``)
    from its SIGINT handler, by scheduling the cell's cancellation on this loop; but the
    handler runs while the loop waits in its selector, and a callback scheduled from the
    loop's own thread wakes nothing. So the cell went on until some other message
    happened to arrive, with ipykernel's launcher as with this one. A signal wakeup fd
    (the loop's own, as ``add_signal_handler`` sets it) wakes the loop for every signal
    that is handled; at rest SIGINT stays ignored, as ipykernel has it.
    """
    at_rest = signal.getsignal(signal.SIGINT)
    try:
        loop.add_signal_handler(signal.SIGINT, lambda: None)  # the waking is all it is for
    except (NotImplementedError, RuntimeError, ValueError):  # not Unix or not the main thread
        return
    signal.signal(signal.SIGINT, at_rest)


def main() -> None:
    """Start the kernel, as ``python -m ipykernel_launcher`` does."""
    RemoteKernelApp.launch_instance()


if __name__ == "__main__":
    main()
