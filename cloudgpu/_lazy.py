"""Package attributes imported on first use (PEP 562).

The remote side's packages re-export their public names this way: the agent runs inside
every remote kernel and imports ``cloudgpu.remote_host.host`` on its way, which must not
pull Jupyter Server (or the pool's web stack) into that kernel.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports each name from its module when first asked for.

    Args:
        package: the package's ``__name__``.
        where: public name -> the module that defines it, relative to ``package`` (``".app"``).
    """

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module, package), name)

    return __getattr__
