"""The cloudgpu agent inside each remote kernel: receives and sends variables over a comm.

Loaded by the host's kernels with ``--ext=cloudgpu.remote_host.host.agent``. The comm target
``cloudgpu.agent`` understands three operations, each a comm message whose binary
buffers carry the frames (see ``cloudgpu._transfer``):

- ``push``: values to bind in the user namespace; a value that fails to load is
  reported, and the next cell is rejected before it runs so it never sees stale inputs;
  a ``keep`` in place of a value is honoured only while the value held is still the one
  recorded (``held.py``; ``verify`` makes each be fingerprinted then), else it is
  answered ``stale`` and the client sends it again;
- ``pull``: names to send back, skipped when the cell just run failed;
- ``snapshot``: every user variable that can move, for moving a session to other
  hardware; what cannot move is named with the reason;
- ``ran_on``: what the kernel runs on (GPUs, driver, CUDA, Python) and the versions of
  the packages the notebook imported, for ``metadata.cloudgpu.ran_on``;
- ``hello`` (on comm open): both sides' Python and cloudpickle versions, and whether
  this agent serves the side channel (``side``) and reads kept inputs, pushes and pulls
  from an execute request (``keep_on_execute``, ``push_on_execute``, ``pull_on_execute``).

A cell whose inputs are all kept needs no ``push``: its execute request names them in its
metadata (``{"cloudgpu": {"keep": [...], "id", "comm", "verify"}}``), and the agent checks
them as the request starts, before any code of it runs. Only if one changed does it answer
``pushed`` (with ``stale``) for the batch ``id`` on the comm ``comm``, and reject the cell,
as for a push. This saves a comm message, and the kernel's handling of it, per cell.
Likewise a cell's inputs and outputs: the request may carry the ``push`` (its small
frames as the request's buffers; big ones came by the side channel) and the ``pull`` the
client would have sent (``{"cloudgpu": {"push": {...}, "pull": {...}, "comm"}}``), which
the agent handles exactly as those comm messages, on the comm ``comm``: the push before
the cell's code runs, the pull as it ends (``push_on_execute``, ``pull_on_execute`` in the
hello). Each saves a message each way, and an execution in the kernel. cloudgpu's clients
also ask for no echo of the cell (``{"cloudgpu": {"echo": false}}``): they ignore
``execute_input``, so the agent publishes none for such a request.

Big frames may come and go by the side channel instead of the comm (``cloudgpu._side``,
``agent_side.py``): a ``push`` or ``pull`` naming a channel (``side``) moves the frames
its headers list under ``side`` there. If that channel broke, a push's values are
answered ``stale`` (the client sends them again). A pull's answer goes on the comm first
and its big frames after it, so that the two travel at once; if the channel broke, a
``side_failed`` message for the batch follows (the client asks again). A pull skipped
because its cell failed sends an empty side message first and says ``side_failed`` in
its answer, since the client forgets the batch once that answer arrives.

``pushed`` and ``pulled`` answers also carry ``versions``: for each value whose type an
installed package defines, that package and its version here, so that the client can name
a value that moves between two versions of its package.
In a sandboxed kernel (``--isolation``), a cell that runs out of memory or scratch space
fails with a last line naming the session's limit (``CLOUDGPU_LIMITS``).
"""

from __future__ import annotations

import ast
import errno
import functools
import io
import json
import logging
import os
import platform
import sys
import types
from collections.abc import Callable
from typing import Any

from IPython.core.error import InputRejected
from IPython.core.interactiveshell import InteractiveShell

from cloudgpu import __version__
from cloudgpu._output import holds_unsent
from cloudgpu._side import pick
from cloudgpu._spares import SPARES
from cloudgpu._transfer import Assembler, pack
from cloudgpu.errors import SerializationError
from cloudgpu.packages import type_versions
from cloudgpu.serialize import (
    Serialized,
    describe_type,
    dumps,
    loads,
    versions,
)

from .agent_side import SideChannels, socket_path
from .held import HeldValues
from .ran_on import ran_on

__all__ = ["TARGET", "Agent", "limit_note", "load_ipython_extension"]

TARGET = "cloudgpu.agent"


class _RejectAfterFailedPush(ast.NodeTransformer):
    """Stops the next cell from running when its inputs did not arrive."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def visit_Module(self, node: ast.Module) -> ast.Module:
        problems, self.agent.push_errors = self.agent.push_errors, {}
        if problems:
            lines = "\n".join(f"  {name}: {why}" for name, why in problems.items())
            raise InputRejected(f"cloudgpu: the cell did not run; these inputs could not be "
                                f"loaded on the remote side:\n{lines}")
        return node


class Agent:
    """Serves one kernel's ``cloudgpu.agent`` comms."""

    def __init__(self, shell: InteractiveShell) -> None:
        self.shell = shell
        self.push_errors: dict[str, str] = {}
        # Big values as this side pickles them, recorded when they arrived or left: a `keep`
        # is honoured only if the value is still the same (see held.py).
        self.held = HeldValues(shell.user_ns, later=_after_reply(getattr(shell, "kernel", None)))
        #: The comms of our clients, by id (an execute request's kept inputs are answered
        #: on the comm it names).
        self._comms: dict[str, Any] = {}
        #: Cells whose kept inputs came named on their execute request, for tests.
        self.kept_on_execute = 0
        #: Cells whose inputs and outputs came on their execute request, for tests.
        self.pushed_on_execute = 0
        self.pulled_on_execute = 0
        self._pushed_for = ""  # the execute request whose carried push was loaded
        # Before the held values' epoch moves on: the check after the last execution holds.
        shell.events.register("pre_execute", self._load_carried_push)
        shell.events.register("pre_execute", self._check_kept_inputs)
        shell.events.register("pre_execute", self.held.execution_starts)
        shell.events.register("post_execute", self.held.execution_ended)
        shell.events.register("post_run_cell", self._answer_carried_pull)
        self._incoming: dict[str, Assembler] = {}
        #: Where big frames come and go off the comm path; None where it could not listen.
        self.side: SideChannels | None = None
        # The packages the kernel itself uses (dill included, which the greeting imports),
        # so that only what the notebook imported counts as its packages.
        versions()
        self._baseline = frozenset(name.partition(".")[0] for name in sys.modules)
        shell.ast_transformers.append(_RejectAfterFailedPush(self))

    def imported(self) -> set[str]:
        """The modules the notebook imported: new since the agent loaded, or bound in the
        user namespace (``import numpy as np`` where the kernel had numpy already)."""
        found = {name for name in list(sys.modules)
                 if name.partition(".")[0] not in self._baseline}
        found |= {v.__name__ for v in list(self.shell.user_ns.values())
                  if isinstance(v, types.ModuleType)}
        return found

    def ran_on(self) -> dict[str, Any]:
        """What this kernel runs on, for ``metadata.cloudgpu.ran_on`` (see ``ran_on.py``)."""
        return ran_on(self.imported())

    def open(self, comm: Any, msg: dict[str, Any]) -> None:
        """A client connected: answer its hello with our versions."""
        comm.on_msg(lambda m: self.on_msg(comm, m))
        self._comms[comm.comm_id] = comm
        comm.on_close(lambda m: self._comms.pop(comm.comm_id, None))
        comm.send({"op": "hello", "versions": versions(), "cloudgpu": __version__,
                   "hostname": platform.node(), "pid": _host_pid(),
                   "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                   "simulated_gpus": os.environ.get("CLOUDGPU_SIMULATED_GPUS", ""),
                   "side": self.side is not None, "keep_on_execute": True,
                   "push_on_execute": True, "pull_on_execute": True})

    def _parent(self) -> dict[str, Any]:
        """The execute request running now; empty for a comm message, which the comm
        package runs as an execution."""
        kernel = getattr(self.shell, "kernel", None)
        parent = kernel.get_parent() if kernel is not None else {}
        if parent.get("header", {}).get("msg_type") != "execute_request":
            return {}
        return dict(parent)

    @staticmethod
    def _asked_by(parent: dict[str, Any]) -> dict[str, Any]:
        """What an execute request asks of the agent (its metadata's ``cloudgpu``); empty
        for other clients' requests."""
        asked = (parent.get("metadata") or {}).get("cloudgpu")
        return asked if isinstance(asked, dict) else {}

    def _asked(self) -> dict[str, Any]:
        """What the execute request running now asks of the agent."""
        return self._asked_by(self._parent())

    def _comm_asked(self, asked: dict[str, Any]) -> Any:
        """The comm of ours a request's answers go on (None: that client is gone)."""
        return self._comms.get(str(asked.get("comm")))

    def _load_carried_push(self) -> None:
        """``pre_execute`` (and ``post_run_cell`` for a cell IPython ran no
        ``pre_execute`` for): load the push the request carries, its small frames in the
        request's buffers, as the comm message would have been, before the code runs."""
        parent = self._parent()
        asked = self._asked_by(parent)
        comm = self._comm_asked(asked)
        msg_id = str(parent.get("header", {}).get("msg_id"))
        if not isinstance(asked.get("push"), dict) or comm is None or msg_id == self._pushed_for:
            return
        self._pushed_for = msg_id
        self.pushed_on_execute += 1
        self._on_push(comm, asked["push"], list(parent.get("buffers") or []))

    def _check_kept_inputs(self) -> None:
        """``pre_execute``: if the request about to run names kept inputs, check them; a
        changed one is answered ``stale`` and the cell is rejected before it runs."""
        asked = self._asked()
        if not asked.get("keep"):
            return
        self.kept_on_execute += 1
        verify = bool(asked.get("verify"))
        errors = {name: "changed here since it was sent; it is being sent again"
                  for name in asked["keep"] if not self.held.unchanged(name, verify)}
        if not errors:
            return
        self.push_errors.update(errors)
        comm = self._comm_asked(asked)
        if comm is not None:
            comm.send({"op": "pushed", "id": asked.get("id"), "errors": errors,
                       "stale": list(errors), "versions": {}})

    def _answer_carried_pull(self, result: Any) -> None:
        """``post_run_cell``: answer the pull the request that just ran carried, as the
        comm message would have been (skipped if the cell failed). Read here, not before
        the cell: IPython runs no ``pre_execute`` for a cell that is only whitespace, so
        such a cell's push is loaded here too. Whatever inputs failed were this cell's:
        one that ran no code (only whitespace, or not Python) must not reject the next."""
        self._load_carried_push()
        self.push_errors = {}
        asked = self._asked()
        pull, comm = asked.get("pull"), self._comm_asked(asked)
        if isinstance(pull, dict) and comm is not None:
            self.pulled_on_execute += 1
            self._on_pull(comm, pull)

    def on_msg(self, comm: Any, msg: dict[str, Any]) -> None:
        """Dispatch one comm message."""
        self.held.not_code()  # the comm package counted this message as an execution
        data = msg["content"]["data"]
        op = data.get("op")
        if op == "push":
            self._on_push(comm, data, msg.get("buffers") or [])
        elif op == "pull":
            self._on_pull(comm, data)
        elif op == "snapshot":
            self._on_snapshot(comm, data)
        elif op == "ran_on":
            comm.send({"op": "ran_on", "id": data.get("id"), "ran_on": self.ran_on()})
        else:
            comm.send({"op": "error", "id": data.get("id"), "error": f"unknown op {op!r}"})

    def _on_push(self, comm: Any, data: dict[str, Any], buffers: list[Any]) -> None:
        batch = data["id"]
        assembler = self._incoming.setdefault(batch, Assembler())
        try:
            assembler.feed(data, buffers)
            if not assembler.done:
                return
            del self._incoming[batch]
            answer = self._load(assembler, data)
        except Exception as e:  # a fault of ours: say so, and run no cell without its inputs
            self._incoming.pop(batch, None)
            why = self._own_fault(e, f"loading push {batch}", "load it")
            names = [str(h.get("name")) for h in assembler.headers] or ["the cell's inputs"]
            answer = {"errors": dict.fromkeys(names, why), "stale": [], "versions": {}}
        self.push_errors.update(answer["errors"])
        comm.send({"op": "pushed", "id": batch, **answer})

    def _load(self, assembler: Assembler, data: dict[str, Any]) -> dict[str, Any]:
        """Bind a whole push's values: the ``pushed`` answer's errors, stale and versions."""
        batch = data["id"]
        errors: dict[str, str] = {}
        stale: list[str] = []
        loaded: dict[str, Any] = {}
        verify = bool(data.get("verify"))
        lost = self._take_side(assembler, data.get("side"), batch)
        for name in lost:
            stale.append(name)
            errors[name] = "its side channel broke before it arrived; it is being sent again"
        for name, value in assembler.values(skip=lost).items():
            if value.codec == "keep":
                if not self.held.unchanged(name, verify):
                    stale.append(name)
                    errors[name] = "changed here since it was sent; it is being sent again"
                continue
            try:
                self.shell.user_ns[name] = loaded[name] = loads(value.codec, value.frames, name)
            except SerializationError as e:
                errors[name] = str(e)
                continue
            self.held.received(name, value)
        return {"errors": errors, "stale": stale, "versions": type_versions(loaded)}

    def _on_pull(self, comm: Any, data: dict[str, Any]) -> None:
        batch = data["id"]
        channel = data.get("side") if self.side is not None else None
        if data.get("only_if_ok", True) and not self.shell.last_execution_succeeded:
            self._answer_no_values(comm, batch, channel, skipped="the cell failed")
            return
        try:
            values, answer = self._pickle(list(data["names"]))
        except Exception as e:  # a fault of ours: say so, rather than leave the client waiting
            why = self._own_fault(e, f"pickling pull {batch}", "send it")
            self._answer_no_values(comm, batch, channel,
                                   errors=dict.fromkeys(data["names"], why))
            return
        picked = pick(values) if channel is not None else []
        for part, buffers in pack(values, extra={"op": "pulled", "id": batch}, side=picked):
            if part.get("final"):
                part.update(answer)
            comm.send(part, buffers=buffers)
        if channel is not None:
            frames = list(values.values())
            failed = self._send_side([frames[vi].frames[fi] for vi, fi in picked], channel,
                                     batch)
            if failed:
                comm.send({"op": "side_failed", "id": batch, "side": channel, "why": failed})

    def _pickle(self, names: list[str]) -> tuple[dict[str, Serialized], dict[str, Any]]:
        """The values a pull asked for, and its ``pulled`` answer's errors, missing and
        versions."""
        values: dict[str, Serialized] = {}
        errors: dict[str, str] = {}
        missing = []
        for name in names:
            if name not in self.shell.user_ns:
                missing.append(name)
                continue
            value = self.shell.user_ns[name]
            try:
                values[name] = dumps(value, name)
            except SerializationError:
                errors[name] = f"{describe_type(value)} cannot be pickled; it stays remote"
                continue
            self.held.sent(name, values[name])  # its fingerprint goes in the header
        moved = {name: self.shell.user_ns[name] for name in values}
        return values, {"errors": errors, "missing": missing, "versions": type_versions(moved)}

    def _answer_no_values(self, comm: Any, batch: str, channel: str | None,
                          **answer: Any) -> None:
        """Answer a pull with no values (the client waits for its side message too)."""
        failed = self._send_side([], channel, batch)
        comm.send({"op": "pulled", "id": batch, "vars": [], "pieces": [], "final": True,
                   **answer, **({"side_failed": failed} if failed else {})})

    def _take_side(self, assembler: Assembler, channel: str | None, batch: str) -> list[str]:
        """Fill in the frames that came by side channel ``channel``; the names of the values
        whose frames did not (the channel broke)."""
        wanted = assembler.side()
        if not wanted:
            return []
        try:
            if self.side is None or channel is None:
                raise OSError("this agent has no side channel")
            assembler.fill_side(self.side.take(channel, batch))
        except (OSError, ValueError) as e:
            self.shell.log.warning("cloudgpu: batch %s did not come by the side channel: %s",
                                   batch, e)
            return assembler.side_names()
        return []

    def _send_side(self, frames: list[memoryview], channel: str | None, batch: str
                   ) -> str | None:
        """Send ``frames`` by side channel ``channel`` as ``batch``: why they did not go.

        When the channel broke, the client is told so and asks again, by a new side
        channel if it can, rather than have them all sent at once into a websocket that
        may be reconnecting too.
        """
        if channel is None or self.side is None:
            return None
        try:
            self.side.send(channel, batch, frames)
        except OSError as e:
            self.shell.log.warning("cloudgpu: the side channel broke sending %s: %s", batch, e)
            return str(e)
        return None

    def _on_snapshot(self, comm: Any, data: dict[str, Any]) -> None:
        """Send every user variable that can be pickled; name the others and say why.

        IPython's own names (``In``, ``Out``, ``_i1``, ...) and hidden names are left out;
        modules travel by name. Replies like ``pull``, as ``op: snapshot``, with ``errors``
        in the final part; a fault of the agent's own is answered as ``failed``, with no
        values, so that the switch fails and leaves the session where it was.
        """
        batch = data.get("id")
        try:
            values, errors = self._snapshot()
        except Exception as e:  # a fault of ours: say so, rather than leave the client waiting
            why = self._own_fault(e, f"snapshot {batch}", "take the variables")
            comm.send({"op": "snapshot", "id": batch, "vars": [], "pieces": [], "final": True,
                       "failed": why})
            return
        for part, buffers in pack(values, extra={"op": "snapshot", "id": batch}):
            if part.get("final"):
                part["errors"] = errors
            comm.send(part, buffers=buffers)

    def _own_fault(self, e: Exception, doing: str, failed_to: str) -> str:
        """Log a fault of the agent's own while ``doing`` (its traceback goes to the
        kernel's log); the reason the client is given."""
        self.shell.log.exception("cloudgpu: %s failed", doing)
        return f"the cloudgpu agent failed to {failed_to} ({type(e).__name__}: {e})"

    def _snapshot(self) -> tuple[dict[str, Serialized], dict[str, str]]:
        """Every user variable that can move, pickled, and why each of the others cannot."""
        ns = self.shell.user_ns
        hidden = self.shell.user_ns_hidden
        values: dict[str, Serialized] = {}
        errors: dict[str, str] = {}
        for name, value in list(ns.items()):
            if name.startswith("_") or (name in hidden and hidden[name] is value):
                continue
            reason = _cannot_move(value)
            if reason is None:
                try:
                    values[name] = dumps(value, name)
                    continue
                except SerializationError:
                    reason = (f"{describe_type(value)} cannot be pickled; "
                              f"create it again on the new kernel")
            errors[name] = reason
        return values, errors


def _after_reply(kernel: Any) -> Callable[[Callable[[], None]], None] | None:
    """What runs a function once the execution running now has answered: a callback on
    the kernel's event loop, which the execution holds until its reply and idle are sent.
    None (at once) outside a kernel.

    ipykernel 7 sets the kernel's loop when the kernel starts, after the extensions
    loaded, so the loop is looked up at each call. Taken when the agent loaded, there was
    none: the check after each execution started a thread at ``post_execute``, before the
    reply, and an empty cell's answer waited 0.3-0.5 ms for it wherever a value was held.
    """
    if kernel is None:
        return None

    def later(fn: Callable[[], None]) -> None:
        loop = getattr(kernel, "io_loop", None)
        if loop is None:  # not started: nothing is waiting for an answer
            fn()
        else:
            loop.add_callback(fn)

    return later


def _host_pid() -> int:
    """This kernel's process id on its host (in a sandbox, the host writes it down for us:
    inside its own PID namespace the kernel is a small number)."""
    path = os.environ.get("CLOUDGPU_HOST_PID_FILE")
    if path:
        try:
            with open(path) as f:
                return int(f.read())
        except (OSError, ValueError):
            pass  # not written (yet): the pid we know is the next best thing
    return os.getpid()


def limit_note(error: BaseException, limits: dict[str, str]) -> str | None:
    """The line that says which of the session's ``limits`` a cell's ``error`` ran into."""
    if isinstance(error, MemoryError) and "memory" in limits:
        return (f"cloudgpu: this session's memory limit is {limits['memory']}; use less, "
                f"or ask the host's operator for more (Sandbox.memory_limit).")
    if isinstance(error, OSError) and error.errno == errno.ENOSPC and "scratch" in limits:
        return (f"cloudgpu: this session's scratch space is full: its home, /tmp and "
                f"/dev/shm hold {limits['scratch']} each (Sandbox.scratch_size).")
    return None


def memory_room(limit: int) -> int | None:
    """Bytes this process may still take while keeping an eighth of its memory ``limit``
    free (for its children and the page cache, which the limit counts too); None when its
    resident size cannot be read."""
    try:
        with open("/proc/self/statm") as statm:
            resident = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
    return limit - limit // 8 - resident


def _explain_limits(shell: InteractiveShell, limits: dict[str, str]) -> None:
    """Show errors from hitting a limit as usual, with a last line naming the limit."""
    def explain(self: InteractiveShell, etype: type[BaseException], value: BaseException,
                tb: Any, tb_offset: int | None = None) -> list[str]:
        stb: list[str] = self.InteractiveTB.structured_traceback(etype, value, tb,
                                                                 tb_offset=tb_offset)
        note = limit_note(value, limits)
        if note:
            stb = [*stb, note]
        self._showtraceback(etype, value, stb)  # IPython leaves showing it to the handler
        return stb

    shell.set_custom_exc((MemoryError, OSError), explain)


def _cannot_move(value: Any) -> str | None:
    """Why ``value`` must stay behind, for what pickles but would not be the same thing there.

    cloudpickle turns a text file open for reading into an ``io.StringIO`` of its contents,
    and dill reopens files by path: neither is the open file the user had.
    """
    if isinstance(value, io.IOBase) and not isinstance(value, (io.StringIO, io.BytesIO)):
        if value.closed:
            return f"{describe_type(value)} is a closed file"
        where = getattr(value, "name", "?")
        return (f"an open file ({where!r}, mode {getattr(value, 'mode', '?')!r}) is tied to "
                f"the old kernel's machine; open it again on the new one")
    return None


def load_ipython_extension(shell: InteractiveShell) -> None:
    """Register the ``cloudgpu.agent`` comm target in this kernel."""
    kernel = getattr(shell, "kernel", None)
    if kernel is None:  # plain IPython: nothing to serve
        return
    interval = float(os.environ.get("CLOUDGPU_FLUSH_INTERVAL", "0.02"))
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "flush_interval"):  # ipykernel's OutStream holds output back
            stream.flush_interval = interval
    agent = Agent(shell)
    kernel.comm_manager.register_target(TARGET, agent.open)
    _echo_only_when_asked(kernel)
    _skip_unwritten_debug_records(kernel.log)
    _reply_without_waiting(kernel)
    limits = json.loads(os.environ.get("CLOUDGPU_LIMITS") or "{}")
    if limits:
        _explain_limits(shell, limits)
    if limits.get("memory_bytes"):
        SPARES.room = functools.partial(memory_room, int(limits["memory_bytes"]))
    agent.side = _listen_side(shell)
    shell.cloudgpu_agent = agent  # type: ignore[attr-defined]


def _reply_without_waiting(kernel: Any) -> None:
    """Send each ``execute_reply`` as soon as the cell's output has gone.

    Before each reply ipykernel flushes stdout and stderr, each flush a round trip to its
    IOPub thread even when nothing is buffered, and then sleeps 0.5 ms, lest a frontend
    that ends the cell at its reply miss output still on the way. cloudgpu's clients end a
    cell at its ``idle``, which the IOPub thread sends after every output of the cell, and
    the Cloud GPU kernel passes each message on as it comes to a frontend that does the
    same (JupyterLab and nbclient wait for the idle too). So here the sleep is dropped and
    a flush with nothing to send returns at once. What was written is flushed as ever.
    """
    if isinstance(getattr(kernel, "_execute_sleep", None), float):
        kernel._execute_sleep = 0.0
    for stream in (sys.stdout, sys.stderr):
        # A stream that is not ipykernel's, or also writes elsewhere, always holds_unsent.
        def flush(stream: Any = stream, flush: Any = stream.flush) -> None:
            if holds_unsent(stream):
                flush()

        stream.flush = flush  # type: ignore[method-assign]


def _echo_only_when_asked(kernel: Any) -> None:
    """Publish no ``execute_input`` for a request whose metadata says ``{"cloudgpu":
    {"echo": false}}``: cloudgpu's clients ignore it, and on an empty cell it is one of
    the four messages that cross the host. Other clients (the Cloud GPU kernel, which
    shows the input to its frontend) ask nothing and get it as ever."""
    publish = getattr(kernel, "_publish_execute_input", None)
    if publish is None:  # another ipykernel: it echoes every input, which is only slower
        return

    def publish_unless_asked(code: str, parent: dict[str, Any], execution_count: int) -> None:
        asked = (parent.get("metadata") or {}).get("cloudgpu")
        if isinstance(asked, dict) and asked.get("echo") is False:
            return
        publish(code, parent, execution_count)

    kernel._publish_execute_input = publish_unless_asked


def _skip_unwritten_debug_records(logger: logging.Logger) -> None:
    """Raise ``logger``'s level to the lowest its handlers write.

    traitlets leaves an application's logger at DEBUG and filters in its handlers, so
    ipykernel builds four debug records per message that no handler writes (4% of an
    empty cell's CPU in the remote kernel). A change of ``log_level`` configures logging
    again, which puts the level back."""
    levels: list[int] = []
    node: logging.Logger | None = logger
    while node is not None:
        levels += [h.level for h in node.handlers]
        node = node.parent if node.propagate else None
    if levels and min(levels) > logger.level:
        logger.setLevel(min(levels))


def _listen_side(shell: InteractiveShell) -> SideChannels | None:
    """The side channel's listener beside the kernel's connection file, where it can be."""
    from ipykernel.kernelapp import IPKernelApp

    if not IPKernelApp.initialized():
        return None
    try:
        return SideChannels(socket_path(IPKernelApp.instance().abs_connection_file))
    except OSError as e:  # a read-only folder, a path too long: the comm path still works
        shell.log.warning("cloudgpu: no side channel for big values: %s", e)
        return None
