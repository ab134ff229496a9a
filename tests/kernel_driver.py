"""Driving a real kernel through jupyter_client, as a notebook frontend does.

Shared by the tests of the ``%%remote`` magic (test_magic.py, test_pool.py: a local
ipykernel with ``%load_ext cloudgpu``) and of the Cloud GPU kernel (test_kernel.py: the
proxy kernel): start a kernel by name, send a cell, collect everything it publishes on
iopub for that cell (``status`` included) with arrival times, read its reply. And a
client that goes away without a word (``vanish``), as a notebook whose laptop shut does.
"""

from __future__ import annotations

import ast
import os
import queue
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel

#: The magic object and the client, as expressions to evaluate in the local kernel.
MAGIC = "get_ipython().magics_manager.registry['RemoteMagics']"
CLIENT = "__import__('cloudgpu.client', fromlist=['get_client']).get_client()"
#: A remote kernel's process id on its host, as an expression to evaluate in it: inside a
#: sandbox (``--isolation``) its own PID namespace numbers it differently, and the host
#: writes the host's number down for it.
HOST_PID = ("(lambda os: int(open(os.environ['CLOUDGPU_HOST_PID_FILE']).read()) "
            "if 'CLOUDGPU_HOST_PID_FILE' in os.environ else os.getpid())(__import__('os'))")


@dataclass
class Message:
    """One iopub message of an execution, with when it arrived (time.monotonic())."""

    at: float
    msg_type: str
    content: dict[str, Any]


@dataclass
class Execution:
    """Everything one execute request produced, as a frontend sees it."""

    code: str
    started: float
    messages: list[Message] = field(default_factory=list)
    reply: dict[str, Any] = field(default_factory=dict)
    reply_at: float = 0.0

    @property
    def status(self) -> str:
        """The reply's status: ``ok``, ``error`` or ``aborted``."""
        return str(self.reply.get("status"))

    def of(self, *types: str) -> list[Message]:
        """The messages of these types, in order."""
        return [m for m in self.messages if m.msg_type in types]

    def stream(self, name: str = "stdout") -> str:
        """Everything written to one stream."""
        return "".join(m.content["text"] for m in self.of("stream") if m.content["name"] == name)

    def arrivals(self) -> dict[str, float]:
        """When each stream message's text (stripped) arrived; texts that are only
        whitespace are left out (a kernel's timed flush can send a print's newline alone)."""
        return {text: m.at for m in self.of("stream") if (text := m.content["text"].strip())}

    def tracebacks(self) -> str:
        """The text of the error messages' tracebacks, and nothing else."""
        return "\n".join(self._tracebacks())

    def error_text(self) -> str:
        """All the error text the user sees: error tracebacks and stderr."""
        return "\n".join([*self._tracebacks(), self.stream("stderr")])

    def _tracebacks(self) -> list[str]:
        return ["\n".join(m.content["traceback"]) for m in self.of("error")]

    def states(self) -> list[str]:
        """The kernel's execution states (``busy``, ``idle``) during this execution."""
        return [m.content["execution_state"] for m in self.of("status")]

    def displays(self) -> list[Message]:
        """display_data/update_display_data that are not cloudgpu's own status line."""
        return [m for m in self.of("display_data", "update_display_data")
                if "cloudgpu" not in m.content.get("metadata", {})]

    def status_lines(self) -> list[str]:
        """cloudgpu's quiet status lines, in order."""
        return [m.content["data"]["text/plain"]
                for m in self.of("display_data", "update_display_data")
                if "cloudgpu" in m.content.get("metadata", {})]

    def describe(self) -> str:
        """The code, the reply and every message, for an assertion's message."""
        lines = [f"code: {self.code!r}", f"reply: {self.reply}"]
        lines += [f"  {m.at - self.started:6.3f} {m.msg_type}: {m.content}" for m in self.messages]
        return "\n".join(lines)


def start_kernel(kernel_name: str = "python3", **env: str,
                 ) -> tuple[KernelManager, BlockingKernelClient]:
    """Start a kernel by kernelspec name, with this process's environment plus ``env``."""
    km, kc = start_new_kernel(kernel_name=kernel_name, env={**os.environ, **env},
                              startup_timeout=60)
    return km, kc


def stop_kernel(km: KernelManager, kc: BlockingKernelClient) -> None:
    """Shut the kernel down as a frontend does, and close the client."""
    kc.stop_channels()
    if km.is_alive():
        km.shutdown_kernel(now=False)
    km.cleanup_resources()


def run(kc: BlockingKernelClient, code: str, timeout: float = 60,
        on_message: Callable[[Message], None] | None = None, **execute: Any) -> Execution:
    """Execute ``code``; collect its iopub messages up to ``idle``, then its execute_reply.

    Args:
        kc: the kernel's client.
        code: the cell.
        timeout: seconds until the reply, at most.
        on_message: called with each iopub message of the cell as it arrives.
        execute: more arguments of ``kc.execute`` (``allow_stdin=True``, ...).
    """
    msg_id = kc.execute(code, **execute)
    ex = Execution(code, started=time.monotonic())
    deadline = ex.started + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no idle within {timeout} s:\n{ex.describe()}")
        try:
            msg = kc.get_iopub_msg(timeout=left)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        m = Message(time.monotonic(), msg["msg_type"], msg["content"])
        ex.messages.append(m)
        if on_message is not None:
            on_message(m)
        if m.msg_type == "status" and m.content["execution_state"] == "idle":
            break
    ex.reply = shell_reply(kc, msg_id, deadline)["content"]
    ex.reply_at = time.monotonic()
    return ex


def shell_reply(kc: BlockingKernelClient, msg_id: str, deadline: float) -> dict[str, Any]:
    """The shell reply to ``msg_id`` (others are skipped), waiting until ``deadline`` (+1 s)."""
    while True:
        reply = kc.get_shell_msg(timeout=max(deadline - time.monotonic(), 1))
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply  # type: ignore[no-any-return]


def ok(kc: BlockingKernelClient, code: str, timeout: float = 60) -> Execution:
    """Execute ``code`` and require that it succeeded."""
    ex = run(kc, code, timeout)
    assert ex.status == "ok", ex.describe()
    return ex


def value(kc: BlockingKernelClient, expr: str, timeout: float = 60) -> Any:
    """Evaluate ``expr`` in the kernel's namespace; its repr must be a Python literal.

    A silent request with a user expression: nothing runs as a cell, nothing is printed.
    """
    msg_id = kc.execute("", silent=True, user_expressions={"v": f"repr({expr})"})
    reply = shell_reply(kc, msg_id, time.monotonic() + timeout)
    result = reply["content"]["user_expressions"]["v"]
    assert result["status"] == "ok", result
    return ast.literal_eval(ast.literal_eval(result["data"]["text/plain"]))


CLIENT_THAT_VANISHES = """\
import asyncio, os, sys
from pathlib import Path
from cloudgpu import _loop
from cloudgpu.client import Client
from cloudgpu.hardware import parse_spec
from cloudgpu.pool_client import PoolProvider

pool_url, token, hardware = sys.argv[1:4]
work = Path(sys.argv[4]) if len(sys.argv) > 4 else None
CELL = f'''
import pathlib, time
work = pathlib.Path({str(work)!r})
(work / "started").write_text("1")
while not (work / "release").exists():
    time.sleep(0.05)
(work / "done").write_text("1")
'''

async def main() -> None:
    client = Client(PoolProvider(pool_url, token))
    session = await client.session(parse_spec(hardware))
    await session.ready()
    print(session.grant.session_id, flush=True)
    if work is not None:  # the laptop shuts mid-cell
        asyncio.ensure_future(session.run_cell(CELL, {}, [], lambda kind, content: None))
        while not (work / "started").exists():
            await asyncio.sleep(0.05)
    os._exit(0)  # gone: no release, no goodbye

_loop.run_sync(main())
"""


def vanish(pool_url: str, token: str, work: Path, mid_cell: bool = False,
           hardware: str = "H100") -> str:
    """The session id of a client that opened a session on ``hardware`` at the pool and
    exited without a word; with ``mid_cell``, while a cell of its ran, which ends once
    ``work / "release"`` appears (and then writes ``work / "done"``)."""
    script = work / "vanish.py"
    script.write_text(CLIENT_THAT_VANISHES)
    args = [str(work)] if mid_cell else []
    out = subprocess.run([sys.executable, str(script), pool_url, token, hardware, *args],
                         capture_output=True, text=True, timeout=90, check=True)
    return out.stdout.split()[0]
