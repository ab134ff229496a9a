"""Everything that runs on the remote side: the host server and the in-kernel agent.

Names are imported lazily so that the agent, which runs inside every remote kernel,
does not pull Jupyter Server into it.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Device", "HostApp", "Inventory", "NoCapacityError"]

_WHERE = {"HostApp": ".hostapp", "Device": ".inventory", "Inventory": ".inventory",
          "NoCapacityError": ".inventory"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
