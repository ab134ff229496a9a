"""cloudgpu: run notebook cells, whole sessions and Python functions on remote GPUs.

In a notebook::

    %load_ext cloudgpu

    %%remote gpu=H100
    y = model(x)        # x goes there, y comes back

From Python (a script, a test, another library; IPython not needed)::

    import cloudgpu

    with cloudgpu.session("H100", max_cost=5.0) as s:
        s.push(x=x)
        s.run("y = x * 2")
        y = s.pull("y")

    @cloudgpu.function(gpu="H100", timeout=600)
    def train(cfg): ...

    metrics = train(cfg)
"""

from __future__ import annotations

import sys
import types
import typing

#: The Python API, imported on first use (PEP 562): ``import cloudgpu`` stays light, as
#: it must inside every remote kernel (the agent imports it) and for the CLI.
_API = {
    "AsyncSession": ".api", "Session": ".api", "asession": ".api", "cost": ".api",
    "hardware": ".api", "session": ".api", "sessions": ".api", "shutdown": ".api",
    "RemoteFunction": "._functions", "RemoteFuture": "._functions", "function": "._functions",
    "SessionInfo": "._core",
}


class _Package(types.ModuleType):
    """This package. ``cloudgpu.session`` and ``cloudgpu.hardware`` are API functions that
    share their names with submodules (session.py, hardware.py); Python binds a submodule
    on its package when it is first imported, which must not hide the function."""

    def __setattr__(self, name: str, value: typing.Any) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return  # the submodule stays importable by its full name (sys.modules)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

if typing.TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

    from ._core import SessionInfo
    from ._functions import RemoteFunction, RemoteFuture, function
    from .api import (
        AsyncSession,
        Session,
        asession,
        cost,
        hardware,
        session,
        sessions,
        shutdown,
    )

__version__ = "0.1.0"

from . import _lazy  # noqa: E402 - after the package is ready to keep its API names
from .errors import (  # noqa: E402
    AuthenticationError,
    BudgetExceededError,
    CloudGPUError,
    EnvironmentBuildError,
    HardwareUnavailableError,
    HostConnectionError,
    HostStartError,
    RemoteExecutionError,
    RemoteKernelDiedError,
    RemoteTimeoutError,
    SerializationError,
    UnknownHardwareError,
    VersionSkewWarning,
)
from .hardware import Catalog, HardwareSpec, parse_spec  # noqa: E402

__getattr__ = _lazy.lazy_attributes(__name__, _API)

__all__ = [
    "AsyncSession",
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
    "RemoteFunction",
    "RemoteFuture",
    "RemoteKernelDiedError",
    "RemoteTimeoutError",
    "SerializationError",
    "Session",
    "SessionInfo",
    "UnknownHardwareError",
    "VersionSkewWarning",
    "__version__",
    "asession",
    "cost",
    "function",
    "hardware",
    "load_ipython_extension",
    "parse_spec",
    "session",
    "sessions",
    "shutdown",
]


def load_ipython_extension(ipython: InteractiveShell) -> None:
    """``%load_ext cloudgpu``: register ``%%remote`` and ``%remote``."""
    from .magics import load_ipython_extension as load

    load(ipython)
