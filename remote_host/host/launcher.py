"""The remote kernel's launcher: ipykernel's own, with shell messages received where cells run.

ipykernel 7 reads every shell message on a thread of its own, the shell channel thread,
which serves subshells (code run concurrently on other threads) and hands each message for
the main shell on to the main thread through an inproc socket; each reply goes back the
same way. Those two hand-offs cost an empty cell 0.3 ms on the 2-core VM of
``bench/RESULTS.md`` (medians of 3.57 and 4.32 ms against 3.34 and 3.91 without them, two
runs of 300 alternating cells). So this kernel receives shell messages on its main
thread, as ipykernel 6 did, and offers no subshells: cloudgpu's clients never ask for one,
and the Cloud GPU kernel's ``kernel_info`` does not advertise them to its frontends. With
ipykernel 6 this launcher is ipykernel's, and SIGINT wakes the kernel (see
:func:`_wake_on_interrupt`).

Run as ``python -m cloudgpu.remote_host.host.launcher -f CONNECTION_FILE [ipykernel's
options]``; the host's kernelspec does (``kernels.py``). It imports only ipykernel.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from typing import Any

from ipykernel.ipkernel import IPythonKernel
from ipykernel.kernelapp import IPKernelApp
from traitlets import Type

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


class RemoteKernel(IPythonKernel):
    """ipykernel's kernel, saying it has no subshells."""

    @property
    def _supports_kernel_subshells(self) -> bool:
        return False


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
