"""``%cloudgpu`` in a Cloud GPU kernel: the cells the proxy answers itself.

``%cloudgpu switch gpu=A100-80GB`` moves the session to other hardware and
``%cloudgpu status`` says where it runs; neither ever reaches the remote kernel.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cloudgpu._core import SessionInfo
from cloudgpu._format import duration, money, uptime
from cloudgpu.errors import CommandError, UnknownHardwareError
from cloudgpu.hardware import HardwareSpec, parse_spec

__all__ = ["USAGE", "Command", "parse_command", "status_text"]

USAGE = """\
%cloudgpu status                  where this notebook runs: hardware, kernel, uptime, cost, warnings
%cloudgpu switch gpu=A100-80GB    move the session to other hardware, variables included
    [max_cost=5] [idle_timeout=600]   and stop it once it cost $5, or sat idle 600 s (from then
                                      on, for this kernel's sessions)"""

_MAGIC = re.compile(r"^\s*%cloudgpu(?:\s|\?|$)")


@dataclass(frozen=True)
class Command:
    """One ``%cloudgpu`` line.

    Attributes:
        action: ``status``, ``switch`` or ``help``.
        spec: the hardware to switch to.
        options: ``max_cost`` and ``idle_timeout`` given with a switch.
    """

    action: str
    spec: HardwareSpec | None = None
    options: Mapping[str, float] = field(default_factory=dict)


def parse_command(code: str) -> Command | None:
    """The command in a cell, or None when the cell is ordinary code for the remote kernel.

    Raises:
        CommandError: the cell starts with ``%cloudgpu`` but is not a valid command.
    """
    if not _MAGIC.match(code):
        return None
    first, *rest = code.strip().splitlines()
    if any(line.strip() for line in rest):
        raise CommandError("`%cloudgpu` must be alone in its cell; move the other lines to the "
                           "next cell.")
    words = first.replace("%cloudgpu?", "%cloudgpu help", 1).split()[1:]
    action, args = (words[0], words[1:]) if words else ("help", [])
    if action in ("help", "-h", "--help", "?"):
        return Command("help")
    if action == "status" and not args:
        return Command("status")
    if action == "switch":
        options = _options([a for a in args if a.split("=")[0] in _OPTIONS])
        return Command("switch", _switch_spec([a for a in args if a.split("=")[0] not in
                                               _OPTIONS]), options)
    raise CommandError(f"Unknown `%cloudgpu {' '.join(words)}`. Known commands:\n{USAGE}")


_OPTIONS = ("max_cost", "idle_timeout")


def _options(args: list[str]) -> dict[str, float]:
    """``max_cost=5 idle_timeout=600``: positive numbers (the pool checks them further)."""
    options = {}
    for arg in args:
        key, _, text = arg.partition("=")
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise CommandError(f"`{arg}`: {key} must be a positive number, e.g. "
                               f"`{key}={'5' if key == 'max_cost' else '600'}`.")
        options[key] = value
    return options


def _switch_spec(args: list[str]) -> HardwareSpec:
    text = None
    if len(args) == 1 and args[0].startswith("gpu="):
        text = args[0][4:]
    elif len(args) == 2 and args[0] in ("--gpu", "-g"):
        text = args[1]
    elif len(args) == 1 and "=" not in args[0] and not args[0].startswith("-"):
        text = args[0]
    if not text:
        raise CommandError(f"Say which hardware to switch to, e.g. `%cloudgpu switch gpu=H100`; "
                           f"found `{' '.join(args) or 'nothing'}`.")
    try:
        return parse_spec(text)
    except UnknownHardwareError as e:
        raise CommandError(str(e)) from None


def status_text(info: SessionInfo, options: Mapping[str, Any] | None = None) -> str:
    """What ``%cloudgpu status`` prints for a live session, opened with ``options``."""
    cost = "not metered by this provider"
    if info.rate_per_hour:
        cost = f"{money(info.cost)} so far, at {money(info.rate_per_hour)}/hour"
    options = options or {}
    limits = [f"max_cost {money(float(options['max_cost']))}"] if "max_cost" in options else []
    if "idle_timeout" in options:
        limits.append(f"idle_timeout {duration(float(options['idle_timeout']))}")
    return (f"hardware: {info.hardware}\n"
            f"kernel:   {info.kernel_id} on {info.host_url} ({info.provider})\n"
            f"uptime:   {uptime(info.uptime)}\n"
            f"cost:     {cost}\n"
            + (f"limits:   {', '.join(limits)}\n" if limits else "")
            + "".join(f"warning:  {text}\n" for text in info.warnings))
