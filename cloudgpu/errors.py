"""The exceptions cloudgpu raises, one per failure a user can act on."""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BudgetExceededError",
    "CloudGPUError",
    "HardwareUnavailableError",
    "HostConnectionError",
    "HostStartError",
    "RemoteExecutionError",
    "RemoteKernelDiedError",
    "SerializationError",
    "UnknownHardwareError",
    "VersionSkewWarning",
]


class CloudGPUError(Exception):
    """Raised when cloudgpu cannot do what was asked; the root of every cloudgpu error."""


class UnknownHardwareError(CloudGPUError, ValueError):
    """Raised when a hardware spec names a GPU type the catalog does not know or is malformed."""


class BudgetExceededError(CloudGPUError):
    """Raised when a budget (a session's max_cost or a daily limit) is spent."""


class HardwareUnavailableError(CloudGPUError):
    """Raised when the hardware asked for exists in the catalog but none is free or present."""


class SerializationError(CloudGPUError):
    """Raised when a variable cannot be pickled or unpickled on its way between the two sides."""


class HostConnectionError(CloudGPUError):
    """Raised when the remote host cannot be reached or the connection to it drops."""


class HostStartError(CloudGPUError):
    """Raised when a local pool or host process fails to start."""


class AuthenticationError(CloudGPUError):
    """Raised when a host or pool refuses our token."""


class RemoteKernelDiedError(CloudGPUError):
    """Raised when the remote kernel dies or is stopped while a cell runs on it."""


class RemoteExecutionError(CloudGPUError):
    """Raised when the remote cell itself raised; carries the remote traceback."""

    def __init__(self, ename: str, evalue: str, traceback: list[str],
                 host: str | None = None) -> None:
        super().__init__(f"{ename}: {evalue}")
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback
        self.host = host


class VersionSkewWarning(UserWarning):
    """Warned when the local and remote Python or cloudpickle versions differ in a way that can break unpickling."""
