"""Where sessions come from: the seam between the client and whatever hands out kernels.

A provider turns a hardware spec into a :class:`Grant` (a host, a kernel on it and a
token) and takes it back, and answers what front-ends show about it: the hardware on
offer, the user's sessions, what they cost, why one ended. The pool provider
(``cloudgpu.pool_client.PoolProvider``) is the one cloudgpu ships; the local pool is the
embedded default. Front-ends (the magic, the Cloud GPU kernel, the Python API) only ever
call this interface, through :class:`cloudgpu.client.Client`.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .hardware import Catalog, HardwareSpec, HardwareType

__all__ = ["Grant", "SessionProvider", "StatusCallback"]

#: Receives human-readable progress while a session is being granted:
#: ``waiting for H100: 2 ahead of you``, ``starting on 1x H100 ...``.
StatusCallback = Callable[[str], None]


@dataclass
class Grant:
    """What a provider hands out: where a kernel is and the right to drive it.

    Attributes:
        host_url: the host's base URL.
        token: a token for that host (scoped to this kernel when a pool grants it).
        kernel_id: the kernel on that host.
        hardware: the hardware spec granted, canonical (``H100:2``, ``cpu``).
        gpus: the devices the kernel holds, as the host reports them.
        simulated: True when those GPUs are simulated.
        session_id: the pool's session id, when a pool granted it.
        rate_per_hour: dollars per hour this hardware costs (count x price).
        started: when billing started (epoch seconds).
        environment: the pip requirements the kernel runs with ([]: the host's own).
    """

    host_url: str
    token: str
    kernel_id: str
    hardware: str
    gpus: list[dict[str, Any]] = field(default_factory=list)
    simulated: bool = False
    session_id: str | None = None
    rate_per_hour: float = 0.0
    started: float = 0.0
    environment: list[str] = field(default_factory=list)

    def cost(self, now: float | None = None) -> float:
        """Dollars billed so far, computed here (no round trip)."""
        if not self.started:
            return 0.0
        return max((now or time.time()) - self.started, 0.0) / 3600 * self.rate_per_hour

    @property
    def display(self) -> str:
        """Human text for the hardware: ``1x H100 (simulated)``, ``CPU``."""
        if not self.gpus:
            return "CPU"
        names = list(dict.fromkeys(g["type"] for g in self.gpus))
        text = f"{len(self.gpus)}x {'/'.join(names)}"
        return f"{text} (simulated)" if self.simulated else text


class SessionProvider(abc.ABC):
    """Hands out kernels on the hardware asked for, and reports on them."""

    #: Shown to users: where their cells run (``local pool``, a pool URL).
    description: str = ""

    @abc.abstractmethod
    async def acquire(self, spec: HardwareSpec, *, on_status: StatusCallback | None = None,
                      options: Mapping[str, Any] | None = None) -> Grant:
        """Start (or wait for) a kernel on ``spec``, reporting progress to ``on_status``.

        ``options`` may hold ``max_cost`` (dollars), ``idle_timeout`` (seconds),
        ``notebook`` (a name to group cost by) and ``environment`` (pip requirement strings
        the kernel needs); providers ignore what they do not support.

        Raises:
            CloudGPUError: a subclass saying why none can be had.
        """

    @abc.abstractmethod
    async def release(self, grant: Grant) -> None:
        """Give a kernel back: stop it and free its hardware."""

    @abc.abstractmethod
    async def ended_reason(self, grant: Grant) -> str | None:
        """Why a granted session ended (budget, idleness, ...), or None if it did not."""

    @abc.abstractmethod
    async def warnings(self, grant: Grant) -> list[str]:
        """Current warnings about a session, such as a budget nearly spent."""

    async def news(self, grant: Grant) -> tuple[list[str], str | None]:
        """A session's warnings, and why the provider ended it if it did while its kernel
        still answers (None: it runs), in one question."""
        return await self.warnings(grant), None

    @abc.abstractmethod
    async def hardware(self) -> list[dict[str, Any]]:
        """Every hardware type on offer: ``type``, ``aliases``, ``memory_gb``,
        ``price_per_hour``, ``free``/``total`` (None for CPU), ``queued``, ``simulated``."""

    @abc.abstractmethod
    async def sessions(self) -> list[dict[str, Any]]:
        """The user's active sessions, as the pool's REST API shows them."""

    @abc.abstractmethod
    async def cost(self) -> dict[str, Any]:
        """Today's spending: ``today``, ``daily_limit``, ``by_notebook``, ``sessions``."""

    async def metrics(self) -> dict[str, dict[str, Any]]:
        """Live readings of the user's running sessions, by session id: ``utilization``,
        ``memory_used_gb``/``memory_total_gb``, per-device ``gpus``, ``simulated`` and the
        ``source`` of the figures. A provider that cannot read them returns ``{}``."""
        return {}

    async def hold(self, spec: HardwareSpec, seconds: float) -> Grant | None:
        """A ready kernel on ``spec`` kept for a first cell that may come, unbilled until
        :meth:`claim`, and given back by the provider after ``seconds`` unclaimed; None
        when the provider has none ready to hold (or holds nothing, as by default)."""
        return None

    async def claim(self, grant: Grant, options: Mapping[str, Any] | None = None) -> None:
        """A cell takes a held kernel (see :meth:`hold`): billing starts now, with the cell's
        ``max_cost`` and ``idle_timeout`` options; ``grant.started`` is set.

        Raises:
            CloudGPUError: a subclass saying why it cannot be taken (the hold ended, a budget).
        """
        raise NotImplementedError(f"{type(self).__name__} holds nothing to claim.")

    async def session(self, session_id: str) -> dict[str, Any]:
        """One of the user's sessions by id, active or ended (``state``, ``stop_reason``),
        as the pool's REST API shows it.

        Raises:
            SessionNotFoundError: no such session of this user.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot look sessions up by id.")

    async def stop(self, session_id: str) -> dict[str, Any]:
        """Stop one of the user's sessions by id, whoever holds it; returns it as it ended.

        Raises:
            SessionNotFoundError: no such session of this user.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot stop sessions by id.")

    async def catalog(self) -> Catalog:
        """The hardware types this provider knows (its operator may have added some)."""
        return Catalog(HardwareType(t["type"], aliases=tuple(t.get("aliases", ())),
                                    memory_gb=t["memory_gb"], price_per_hour=t["price_per_hour"])
                       for t in await self.hardware())

    async def aclose(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release whatever the provider itself holds (a host process, connections)."""
