"""Kernel sandboxes: what each of a host's kernels can see, reach and use (``--isolation``).

- ``base``: the interface every sandbox implements, the limits, lookup by entry point;
- ``none``: no isolation (the per-user local pool's default);
- ``bubblewrap``: each kernel in its own namespaces, the host's Python read-only;
- ``container``: podman and docker, an image per hardware type;
- ``limits``: cgroups (v2, v1) and per-process fallbacks;
- ``pyenv``: which host folders a kernel's interpreter needs;
- ``provisioner``: the jupyter_client kernel provisioner that launches through a sandbox.
"""

from __future__ import annotations

from .base import (
    ENTRY_POINT_GROUP,
    KernelLaunch,
    Limit,
    Limits,
    Sandbox,
    SandboxedKernel,
    load_sandbox,
)
from .bubblewrap import BubblewrapSandbox
from .container import DockerSandbox, PodmanSandbox
from .none import NoSandbox
from .provisioner import PROVISIONER_NAME, SandboxProvisioner

__all__ = [
    "ENTRY_POINT_GROUP",
    "PROVISIONER_NAME",
    "BubblewrapSandbox",
    "DockerSandbox",
    "KernelLaunch",
    "Limit",
    "Limits",
    "NoSandbox",
    "PodmanSandbox",
    "Sandbox",
    "SandboxProvisioner",
    "SandboxedKernel",
    "load_sandbox",
]
