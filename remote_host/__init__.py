"""Everything that runs on the remote side.

- ``host``: the host server (Jupyter kernels with GPUs) and the agent inside each kernel;
- ``pool``: the pool service (scheduling, metering, the ledger) and its backends.

Names are imported lazily so that the agent, which runs inside every remote kernel,
does not pull Jupyter Server into it.
"""

from __future__ import annotations

from cloudgpu import _lazy

__all__ = ["Device", "HostApp", "Inventory", "PoolApp"]

__getattr__ = _lazy.lazy_attributes(__name__, {
    "Device": ".host.inventory",
    "HostApp": ".host.app",
    "Inventory": ".host.inventory",
    "PoolApp": ".pool.app",
})
