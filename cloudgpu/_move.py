"""Moving a session's variables from one remote kernel to another (switching hardware).

The old kernel's agent pickles every variable it can (``snapshot``); the frames go
straight to the new kernel's agent (``push``) without being unpickled here, so the
client needs none of the user's libraries.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._format import size
from .serialize import Serialized

if TYPE_CHECKING:
    from .session import RemoteSession

__all__ = ["MoveReport", "carry_over"]


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
        total = sum(self.moved.values())
        return [(f"cloudgpu: carried over {len(self.moved)} variable"
                f"{'s' if len(self.moved) != 1 else ''} ({size(total)}): "
                f"{', '.join(sorted(self.moved))}")]

    def failures(self) -> str:
        """Lines naming each variable left behind and why."""
        lines = [(f"cloudgpu: could not carry over {len(self.failed)} variable"
                 f"{'s' if len(self.failed) != 1 else ''}:")]
        lines += [f"  {name}: {why}" for name, why in sorted(self.failed.items())]
        return "\n".join(lines)


async def carry_over(session: RemoteSession, values: dict[str, Serialized],
                     failed: dict[str, str], say: Callable[[str], None]) -> MoveReport:
    """Push an old kernel's ``snapshot`` into ``session``'s kernel.

    Args:
        session: the kernel to copy into.
        values: what the old kernel's agent sent, as frames.
        failed: what it could not send, and why.
        say: shows a line of progress to the user.
    """
    report = MoveReport(failed=dict(failed))
    if not values:
        return report
    await session.ready()
    for warning in session.version_warnings:
        say(f"cloudgpu warning: {warning}\n")
    result = await session.run_cell("", values, [], _progress(say))
    if result.push_errors:
        report.failed.update(result.push_errors)
        # The agent rejects the next cell after a failed push; let it reject this one.
        await session.run_cell("pass", {}, [], _progress(say))
    report.moved = {n: v.nbytes for n, v in values.items() if n not in report.failed}
    return report


def _progress(say: Callable[[str], None]) -> Callable[[str, dict[str, Any]], None]:
    last = [0.0]

    def sink(kind: str, info: dict[str, Any]) -> None:
        now = time.monotonic()
        if kind != "progress" or (now - last[0] < 1.0 and info["done"] < info["total"]):
            return
        last[0] = now
        say(f"cloudgpu: moving variables: {size(info['done'])} / {size(info['total'])}\n")

    return sink
