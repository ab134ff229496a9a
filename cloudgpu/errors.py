"""The exceptions cloudgpu raises, one per failure a user can act on, and how they cross the wire.

Hosts and pools answer a failed request with the same JSON body::

    {"error": "BudgetExceededError", "message": "Your daily budget ...", "status": 402}

:func:`error_body` and :func:`http_status` build it on the server side, and
:func:`error_from_wire` turns it back into the same exception on the client side, so a
user sees one exception type with the server's own message wherever it was raised.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "AuthenticationError",
    "BackendUnavailableError",
    "BudgetExceededError",
    "CloudGPUError",
    "CommandError",
    "EnvironmentBuildError",
    "HardwareUnavailableError",
    "HostConnectionError",
    "HostStartError",
    "InvalidRequestError",
    "IsolationUnavailableError",
    "NoCapacityError",
    "NotebookMetadataError",
    "PoolConnectionError",
    "RemoteExecutionError",
    "RemoteKernelDiedError",
    "RemoteTimeoutError",
    "RequestTooLargeError",
    "SerializationError",
    "SessionNotFoundError",
    "TooManyAttemptsError",
    "UnisolatedHostError",
    "UnknownHardwareError",
    "VersionSkewWarning",
    "error_body",
    "error_from_wire",
    "http_status",
]


class CloudGPUError(Exception):
    """Raised when cloudgpu cannot do what was asked; the root of every cloudgpu error."""


class UnknownHardwareError(CloudGPUError, ValueError):
    """Raised when a hardware spec names a GPU type the catalog does not know or is malformed."""


class InvalidRequestError(CloudGPUError, ValueError):
    """Raised when a host or pool refuses a request as malformed (bad JSON, a wrong field)."""


class RequestTooLargeError(InvalidRequestError):
    """Raised when a request to a host or pool is bigger than it accepts."""


class BudgetExceededError(CloudGPUError):
    """Raised when a budget (a session's max_cost or a daily limit) is spent."""


class HardwareUnavailableError(CloudGPUError):
    """Raised when the hardware asked for exists in the catalog but none is free or present."""


class NoCapacityError(HardwareUnavailableError):
    """Raised when a host has no free devices of the kind a kernel asked for."""


class SessionNotFoundError(CloudGPUError, LookupError):
    """Raised when a pool session id is unknown or belongs to another user."""


class SerializationError(CloudGPUError):
    """Raised when a variable cannot be pickled or unpickled on its way between the two sides."""


class HostConnectionError(CloudGPUError):
    """Raised when the remote host cannot be reached or the connection to it drops."""


class PoolConnectionError(CloudGPUError):
    """Raised when the pool cannot be reached (it is not running, or the network is down)."""


class HostStartError(CloudGPUError):
    """Raised when a local pool or host process fails to start."""


class BackendUnavailableError(CloudGPUError):
    """Raised when a pool backend cannot start: it is not installed, or what it runs on (a Ray
    cluster) cannot be reached."""
class IsolationUnavailableError(CloudGPUError):
    """Raised when a host's kernel sandbox (``--isolation``) cannot run on this machine: its
    tool is missing or refused, or it needs configuration (a container image)."""


class UnisolatedHostError(CloudGPUError):
    """Raised when a shared host or pool would run kernels without isolation and its operator
    has not said that is intended."""


class AuthenticationError(CloudGPUError):
    """Raised when a host or pool refuses our token."""


class TooManyAttemptsError(AuthenticationError):
    """Raised when a host or pool refuses wrong tokens from this address for a while."""


class RemoteKernelDiedError(CloudGPUError):
    """Raised when the remote kernel dies or is stopped while a cell runs on it.

    ``shut_down`` is True when its host said it shut the kernel down (its owner or the
    pool stopped it), rather than that it died by itself or could not be reached.
    """

    def __init__(self, message: str, shut_down: bool = False) -> None:
        super().__init__(message)
        self.shut_down = shut_down


class RemoteTimeoutError(CloudGPUError, TimeoutError):
    """Raised when remote work runs past its ``timeout`` and is interrupted (or stopped)."""


class CommandError(CloudGPUError):
    """Raised when a ``%cloudgpu`` line in a Cloud GPU kernel is not one the proxy understands."""


class RemoteExecutionError(CloudGPUError):
    """Raised when the remote cell itself raised; carries the remote traceback."""

    def __init__(self, ename: str, evalue: str, traceback: list[str],
                 host: str | None = None) -> None:
        super().__init__(f"{ename}: {evalue}")
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback
        self.host = host


class EnvironmentBuildError(CloudGPUError):
    """Raised when a host cannot prepare the environment a session asks for (a requirement
    cannot be met); the message is the installer's own."""


class NotebookMetadataError(CloudGPUError, ValueError):
    """Raised when a notebook's ``metadata.cloudgpu`` is malformed or of a newer schema."""


class VersionSkewWarning(UserWarning):
    """Warned when the two sides' Python or cloudpickle differ enough to break unpickling, or
    when a value moves between different versions of the package that defines its type."""


# --- the wire convention -------------------------------------------------------------------

#: HTTP status per error class; a subclass takes its nearest listed ancestor's.
_STATUS: tuple[tuple[type[CloudGPUError], int], ...] = (
    (UnknownHardwareError, 400),
    (RequestTooLargeError, 413),
    (InvalidRequestError, 400),
    (BudgetExceededError, 402),
    (TooManyAttemptsError, 429),
    (EnvironmentBuildError, 422),
    (AuthenticationError, 403),
    (SessionNotFoundError, 404),
    (HardwareUnavailableError, 409),
    (CloudGPUError, 400),
)

#: What a status means when the body names no cloudgpu error (Jupyter Server's own 403, say).
_BY_STATUS: dict[int, type[CloudGPUError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    402: BudgetExceededError,
    403: AuthenticationError,
    413: RequestTooLargeError,
    409: HardwareUnavailableError,
    429: TooManyAttemptsError,
    422: EnvironmentBuildError,
}


def http_status(error: CloudGPUError) -> int:
    """The HTTP status a server answers ``error`` with."""
    return next(code for cls, code in _STATUS if isinstance(error, cls))


def error_body(error: CloudGPUError) -> dict[str, Any]:
    """The JSON body a server answers ``error`` with: class name, message, status."""
    return {"error": type(error).__name__, "message": str(error), "status": http_status(error)}


def _named(name: object) -> type[CloudGPUError] | None:
    cls = globals().get(str(name)) if name in __all__ else None
    return cls if isinstance(cls, type) and issubclass(cls, CloudGPUError) else None


def error_from_wire(status: int, body: Mapping[str, Any] | None, fallback: str) -> CloudGPUError:
    """The exception a failed request stands for, carrying the server's message.

    Args:
        status: the HTTP status code (400 or more).
        body: the decoded JSON body, if it was a JSON object.
        fallback: the message to use when the body has none (a status line, a text body).
    """
    body = body or {}
    message = str(body.get("message") or body.get("reason") or fallback)
    cls = _named(body.get("error")) or _BY_STATUS.get(status, CloudGPUError)
    if cls is RemoteExecutionError:  # never sent over HTTP; its constructor differs
        cls = CloudGPUError
    return cls(message)
