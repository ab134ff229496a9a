"""The pool: hands out hosts' hardware to sessions, meters its cost, keeps the ledger.

- ``app``: ``cloudgpu pool``, the application and its HTTP server;
- ``handlers``: the REST API under ``/api/``;
- ``service``: the ``Pool`` itself: sessions from request to release, budgets, culling;
- ``scheduler``: who gets which GPUs (pure bookkeeping, no I/O);
- ``ledger``: every session and its cost, in SQLite;
- ``warm``: pre-started kernels;
- ``backend``: the interface backends implement, and how one is found by name;
- ``backends``: the ``local``, ``static`` and ``ray`` backends.

Names are imported lazily, so that the scheduler or the ledger can be used without the
pool's web stack.
"""

from __future__ import annotations

from cloudgpu import _lazy

__all__ = [
    "POOL_HANDLERS",
    "Backend",
    "BackendEvents",
    "Decision",
    "HostsBackend",
    "Ledger",
    "Placement",
    "Pool",
    "PoolApp",
    "Scheduler",
    "SessionRecord",
    "Slot",
    "WarmKernels",
    "load_backend",
]

__getattr__ = _lazy.lazy_attributes(__name__, {
    "POOL_HANDLERS": ".handlers",
    "Backend": ".backend",
    "BackendEvents": ".backend",
    "Decision": ".scheduler",
    "HostsBackend": ".backend",
    "Ledger": ".ledger",
    "Placement": ".backend",
    "Pool": ".service",
    "PoolApp": ".app",
    "Scheduler": ".scheduler",
    "SessionRecord": ".ledger",
    "Slot": ".scheduler",
    "WarmKernels": ".warm",
    "load_backend": ".backend",
})
