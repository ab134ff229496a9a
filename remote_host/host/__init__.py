"""The host: a Jupyter Server that runs kernels with their own GPUs for remote clients.

- ``app``: ``cloudgpu host``, the server application;
- ``auth``: the host token and per-kernel scoped tokens;
- ``handlers``: the REST endpoints added to Jupyter's kernel API;
- ``kernels``: the kernel manager, the one kernelspec and the low-latency websocket;
- ``inventory``: the GPUs (NVML or simulated) and which kernel holds each;
- ``sandbox``: how each kernel is isolated from the others (``--isolation``) and limited;
- ``agent``: the IPython extension inside each kernel that moves variables.

Names are imported lazily: the agent imports this package inside every remote kernel,
which must not import Jupyter Server.
"""

from __future__ import annotations

from cloudgpu import _lazy

__all__ = [
    "HOST_HANDLERS",
    "Agent",
    "AgentKernelSpecManager",
    "Device",
    "GPUKernelManager",
    "HostApp",
    "HostIdentityProvider",
    "HostWebsocketConnection",
    "Inventory",
]

__getattr__ = _lazy.lazy_attributes(__name__, {
    "HOST_HANDLERS": ".handlers",
    "Agent": ".agent",
    "AgentKernelSpecManager": ".kernels",
    "Device": ".inventory",
    "GPUKernelManager": ".kernels",
    "HostApp": ".app",
    "HostIdentityProvider": ".auth",
    "Inventory": ".inventory",
    "HostWebsocketConnection": ".websocket",
})
