"""Everything that runs on the remote side.

- ``host``: the host server (Jupyter kernels with GPUs) and the agent inside each kernel;
- ``pool``: the pool service (scheduling, metering, the ledger) and its backends.

Names are imported lazily so that the agent, which runs inside every remote kernel,
does not pull Jupyter Server into it.
"""

from __future__ import annotations

from cloudgpu._lazy import lazy_attributes

__all__ = ["Device", "HostApp", "Inventory", "NoCapacityError", "PoolApp"]

__getattr__ = lazy_attributes(__name__, {
    "Device": ".host.inventory",
    "HostApp": ".host.app",
    "Inventory": ".host.inventory",
    "NoCapacityError": ".host.inventory",
    "PoolApp": ".pool.app",
})
