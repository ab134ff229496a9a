"""The backends that ship with cloudgpu, registered under the ``cloudgpu.backends`` entry point.

- ``local``: the embedded default, a host subprocess on this machine;
- ``static``: a fixed list of hosts someone started with ``cloudgpu host``;
- ``ray``: a Ray cluster, one actor per session (Ray itself is imported only when it starts).
"""

from __future__ import annotations

from .local import LocalBackend
from .ray import RayBackend
from .static import StaticBackend

__all__ = ["LocalBackend", "RayBackend", "StaticBackend"]
