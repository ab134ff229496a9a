"""cloudgpu: run notebook cells and whole sessions on remote GPUs.

In a notebook::

    %load_ext cloudgpu

    %%remote gpu=H100
    y = model(x)        # x goes there, y comes back
"""

from __future__ import annotations

import typing

if typing.TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

__version__ = "0.1.0"

from .errors import (
    AuthenticationError,
    BudgetExceededError,
    CloudGPUError,
    EnvironmentBuildError,
    HardwareUnavailableError,
    HostConnectionError,
    HostStartError,
    RemoteExecutionError,
    RemoteKernelDiedError,
    SerializationError,
    UnknownHardwareError,
    VersionSkewWarning,
)
from .hardware import Catalog, HardwareSpec, parse_spec

__all__ = [
    "AuthenticationError",
    "BudgetExceededError",
    "Catalog",
    "CloudGPUError",
    "EnvironmentBuildError",
    "HardwareSpec",
    "HardwareUnavailableError",
    "HostConnectionError",
    "HostStartError",
    "RemoteExecutionError",
    "RemoteKernelDiedError",
    "SerializationError",
    "UnknownHardwareError",
    "VersionSkewWarning",
    "__version__",
    "load_ipython_extension",
    "parse_spec",
]


def load_ipython_extension(ipython: InteractiveShell) -> None:
    """``%load_ext cloudgpu``: register ``%%remote`` and ``%remote``."""
    from .magics import load_ipython_extension as load

    load(ipython)
