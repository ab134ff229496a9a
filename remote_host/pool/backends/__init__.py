"""The backends that ship with cloudgpu, registered under the ``cloudgpu.backends`` entry point.

- ``local``: the embedded default, a host subprocess on this machine;
- ``static``: a fixed list of hosts someone started with ``cloudgpu host``.
"""

from __future__ import annotations

from .local import LocalBackend
from .static import StaticBackend

__all__ = ["LocalBackend", "StaticBackend"]
