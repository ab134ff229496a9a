"""Moving a session's variables from one remote kernel to another (``%cloudgpu switch``).

The old kernel's agent pickles every variable it can (``snapshot``); the frames go
straight to the new kernel's agent (``push``) without being unpickled here, so the
proxy needs none of the user's libraries.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cloudgpu.serialize import Serialized
from cloudgpu.session import Grant, RemoteSession

__all__ = ["MoveReport", "move_variables"]


@dataclass
class MoveReport:
    """What a switch carried over and what it left behind.

    Attributes:
        moved: bytes per variable that arrived on the new kernel.
        failed: why each other variable did not.
        note: why nothing was even tried (the old kernel was gone).
    """

    moved: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    note: str = ""

    def summary(self) -> list[str]:
        """Lines for the cell's output: what came along."""
        if self.note:
            return [f"cloudgpu: {self.note}"]
        if not self.moved:
            return ["cloudgpu: no variables to carry over."]
        size = sum(self.moved.values())
        return [(f"cloudgpu: carried over {len(self.moved)} variable"
                f"{'s' if len(self.moved) != 1 else ''} ({_size(size)}): "
                f"{', '.join(sorted(self.moved))}")]

    def failures(self) -> str:
        """Lines naming each variable left behind and why."""
        lines = [(f"cloudgpu: could not carry over {len(self.failed)} variable"
                 f"{'s' if len(self.failed) != 1 else ''}:")]
        lines += [f"  {name}: {why}" for name, why in sorted(self.failed.items())]
        return "\n".join(lines)


async def move_variables(values: dict[str, Serialized], failed: dict[str, str], new: Grant,
                         old_gone: bool, say: Callable[[str], None]) -> MoveReport:
    """Push the old kernel's ``snapshot`` into the kernel of ``new``.

    Args:
        values: what the old kernel's agent sent, as frames.
        failed: what it could not send, and why.
        new: the kernel to copy into.
        old_gone: there was no old kernel to take a snapshot of.
        say: shows a line of progress under the cell.
    """
    if old_gone:
        return MoveReport(note="nothing to carry over: the previous remote kernel was gone.")
    report = MoveReport(failed=dict(failed))
    if not values:
        return report
    session = await RemoteSession.open(new)
    try:
        for warning in session.version_warnings:
            say(f"cloudgpu warning: {warning}\n")
        result = await session.run_cell("", values, [], _progress(say))
        if result.push_errors:
            report.failed.update(result.push_errors)
            # The agent rejects the next cell after a failed push; let it reject this one.
            await session.run_cell("pass", {}, [], _progress(say))
    finally:
        await session.close(shutdown=False)
    report.moved = {n: v.nbytes for n, v in values.items() if n not in report.failed}
    return report


def _progress(say: Callable[[str], None]) -> Callable[[str, dict[str, Any]], None]:
    last = [0.0]

    def sink(kind: str, info: dict[str, Any]) -> None:
        now = time.monotonic()
        if kind != "progress" or (now - last[0] < 1.0 and info["done"] < info["total"]):
            return
        last[0] = now
        say(f"cloudgpu: moving variables: {_size(info['done'])} / {_size(info['total'])}\n")

    return sink


def _size(nbytes: float) -> str:
    if nbytes < 1024:
        return f"{nbytes:.0f} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        nbytes /= 1024
        if nbytes < 1024 or unit == "GiB":
            break
    return f"{nbytes:.1f} {unit}"
