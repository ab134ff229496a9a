"""Where sessions come from: the seam between the client and whatever hands out kernels.

A provider turns a hardware spec into a ``Grant`` (a host, a kernel on it and a token)
and takes it back. The pool provider (``cloudgpu.pool_client.PoolProvider``) is the one
cloudgpu ships; the local pool is the embedded default.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any

from .hardware import HardwareSpec
from .session import Grant

__all__ = ["SessionProvider", "StatusCallback"]

#: Receives human-readable progress while a session is being granted:
#: ``waiting for H100: 2 ahead of you``, ``starting on 1x H100 ...``.
StatusCallback = Callable[[str], None]


class SessionProvider(abc.ABC):
    """Hands out kernels on the hardware asked for."""

    #: Shown to users: where their cells run (``local pool``, a pool URL).
    description: str = ""

    @abc.abstractmethod
    async def acquire(self, spec: HardwareSpec, *, on_status: StatusCallback | None = None,
                      options: Mapping[str, Any] | None = None) -> Grant:
        """Start (or wait for) a kernel on ``spec``, reporting progress to ``on_status``.

        ``options`` may hold ``max_cost`` (dollars), ``idle_timeout`` (seconds) and
        ``notebook`` (a name to group cost by); providers ignore what they do not support.

        Raises:
            CloudGPUError: a subclass saying why none can be had.
        """

    @abc.abstractmethod
    async def release(self, grant: Grant) -> None:
        """Give a kernel back: stop it and free its hardware."""

    async def ended_reason(self, grant: Grant) -> str | None:
        """Why a granted session ended (budget, idleness, ...), or None if unknown."""
        return None

    async def warnings(self, grant: Grant) -> list[str]:
        """Current warnings about a session, such as a budget nearly spent."""
        return []

    async def aclose(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release whatever the provider itself holds (a host process, connections)."""
