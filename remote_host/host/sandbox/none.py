"""``none``: kernels are plain subprocesses of the host, as the same user, on the same
filesystem and in the same PID space. One user's own machine needs no more; a host that
others use does (see ``bubblewrap``)."""

from __future__ import annotations

from typing import Any

from .base import Sandbox

__all__ = ["NoSandbox"]


class NoSandbox(Sandbox):
    """No isolation: Jupyter's own local launch, and no limits."""

    name = "none"
    isolated = False

    def describe(self) -> dict[str, Any]:
        """Not isolated, and nothing limited."""
        return {"mode": self.name, "isolated": False, "limits": {},
                "note": "kernels are not isolated: each can see and reach the others"}
