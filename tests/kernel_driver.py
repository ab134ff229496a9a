"""Driving a real local ipykernel through jupyter_client, as a notebook frontend does.

Shared by the tests of the ``%%remote`` magic (test_magic.py, test_pool.py): send a cell,
collect what the kernel publishes on iopub with arrival times, read the reply.
"""

from __future__ import annotations

import ast
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient

#: The magic object and the client, as expressions to evaluate in the local kernel.
MAGIC = "get_ipython().magics_manager.registry['RemoteMagics']"
CLIENT = "__import__('cloudgpu.client', fromlist=['get_client']).get_client()"


@dataclass
class Message:
    """One iopub message of an execution, with when it arrived (time.monotonic())."""

    at: float
    msg_type: str
    content: dict[str, Any]


@dataclass
class Execution:
    """Everything one execute request produced."""

    started: float
    messages: list[Message] = field(default_factory=list)
    reply: dict[str, Any] = field(default_factory=dict)
    reply_at: float = 0.0

    @property
    def status(self) -> str:
        return str(self.reply.get("status"))

    def of(self, *types: str) -> list[Message]:
        return [m for m in self.messages if m.msg_type in types]

    def stream(self, name: str = "stdout") -> str:
        return "".join(m.content["text"] for m in self.of("stream") if m.content["name"] == name)

    def error_text(self) -> str:
        """All the error text the user sees: error tracebacks and stderr."""
        parts = ["\n".join(m.content["traceback"]) for m in self.of("error")]
        return "\n".join([*parts, self.stream("stderr")])

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
        lines = [f"reply: {self.reply}"]
        lines += [f"  {m.at - self.started:6.3f} {m.msg_type}: {m.content}" for m in self.messages]
        return "\n".join(lines)


def run(kc: BlockingKernelClient, code: str, timeout: float = 60,
        on_message: Callable[[Message], None] | None = None) -> Execution:
    """Execute ``code``; collect its iopub messages until idle, then its execute_reply."""
    msg_id = kc.execute(code)
    ex = Execution(started=time.monotonic())
    deadline = ex.started + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no idle within {timeout} s for {code!r}:\n{ex.describe()}")
        try:
            msg = kc.get_iopub_msg(timeout=left)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        m = Message(time.monotonic(), msg["msg_type"], msg["content"])
        if m.msg_type == "status":
            if m.content["execution_state"] == "idle":
                break
            continue
        ex.messages.append(m)
        if on_message is not None:
            on_message(m)
    while True:
        reply = kc.get_shell_msg(timeout=max(deadline - time.monotonic(), 1))
        if reply["parent_header"].get("msg_id") == msg_id:
            ex.reply, ex.reply_at = reply["content"], time.monotonic()
            return ex


def ok(kc: BlockingKernelClient, code: str, timeout: float = 60) -> Execution:
    """Execute ``code`` and require that it succeeded."""
    ex = run(kc, code, timeout)
    assert ex.status == "ok", ex.describe()
    return ex


def value(kc: BlockingKernelClient, expr: str) -> Any:
    """Evaluate ``expr`` in the local kernel; its repr must be a Python literal."""
    msg_id = kc.execute("", silent=True, user_expressions={"v": f"repr({expr})"})
    while True:
        reply = kc.get_shell_msg(timeout=30)
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    result = reply["content"]["user_expressions"]["v"]
    assert result["status"] == "ok", result
    return ast.literal_eval(ast.literal_eval(result["data"]["text/plain"]))
