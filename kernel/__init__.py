"""The Cloud GPU kernel: a whole notebook session on remote hardware.

Pick "Cloud GPU (H100)" as a notebook's kernel and every cell runs remotely; the local
process is a proxy that speaks the Jupyter protocol to the frontend and relays it to a
remote kernel. ``cloudgpu kernel install --hardware H100`` installs the kernelspecs;
``%cloudgpu switch gpu=A100-80GB`` moves a running session, variables included.
"""

from __future__ import annotations

from .cli import main
from .kernelspec import (
    InstalledKernel,
    install_kernelspecs,
    kernelspec_name,
    list_kernelspecs,
    remove_kernelspecs,
)
from .proxy import ProxyKernel

__all__ = [
    "InstalledKernel",
    "ProxyKernel",
    "install_kernelspecs",
    "kernelspec_name",
    "list_kernelspecs",
    "main",
    "remove_kernelspecs",
]
