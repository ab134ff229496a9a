"""The interface every kernel sandbox implements, and how a host finds one by name.

A sandbox wraps the launch of one kernel: the host's kernel provisioner hands it the
command Jupyter formatted (whatever interpreter it names), the environment, the connection
details and the kernel's GPUs, and gets back a running process it can signal. The sandbox
decides what that process can see and reach, and applies the session's resource limits.
Sandboxes register under the ``cloudgpu.isolation`` entry point group (``none``,
``bubblewrap``, ``podman``, ``docker``), so a package can add one.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

from traitlets import Float, Integer, Unicode
from traitlets.config import LoggingConfigurable

from cloudgpu.errors import IsolationUnavailableError

from ..inventory import Device, Inventory

__all__ = [
    "ENTRY_POINT_GROUP",
    "KernelLaunch",
    "Limit",
    "Limits",
    "Sandbox",
    "SandboxedKernel",
    "format_size",
    "kernel_env",
    "load_sandbox",
    "parse_size",
    "remove_folder",
    "write_connection_file",
]

ENTRY_POINT_GROUP = "cloudgpu.isolation"
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
#: Signals that end a sandbox as a whole; others go to the kernel inside it.
SIGNALS_THAT_END = (signal.SIGKILL, signal.SIGTERM)


def kill_group(pgid: int, signum: int) -> None:
    """Signal a process group; one that is already gone is not an error."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def parse_size(text: str, what: str) -> int | None:
    """Bytes from ``512M``, ``8G``, ``1.5GiB`` or a plain number; None for ``none`` or ``0``.

    Raises:
        IsolationUnavailableError: naming the setting and what it should look like.
    """
    if text.strip().lower() in ("none", "0"):
        return None
    match = _SIZE.fullmatch(text)
    if not match:
        raise IsolationUnavailableError(
            f"{what} must be a size like `512M`, `8G` or `none`; found {text!r}.")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(size: int) -> str:
    """``536870912`` as ``512 MiB``."""
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor:
            return f"{size / factor:.3g} {unit}"
    return f"{size} bytes"


@dataclass(frozen=True)
class Limits:
    """What one kernel may use; None where nothing is limited.

    Attributes:
        memory_bytes: memory, page cache and its RAM-backed scratch included.
        cpus: CPU time, in cores (``cpu:4`` is 4; a GPU kernel gets its GPUs' share).
        scratch_bytes: its home, ``/tmp`` and ``/dev/shm``, each.
        processes: processes and threads.
    """

    memory_bytes: int | None = None
    cpus: float | None = None
    scratch_bytes: int | None = None
    processes: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The limits as the host's kernel model shows them."""
        return asdict(self)


@dataclass(frozen=True)
class Limit:
    """A limit a kernel ran into, as the host tells its clients.

    Attributes:
        name: ``memory``, ``scratch``, ...
        text: what it was, for a person (``its memory limit of 512 MiB (cgroup v1 ...)``).
    """

    name: str
    text: str


@dataclass
class KernelLaunch:
    """One kernel about to start, as its sandbox is asked to start it.

    Attributes:
        kernel_id: the host's id for it.
        argv: the kernel's command as Jupyter formatted it, naming the host's copy of the
            connection file.
        env: its environment (the kernelspec's, the host's and the kernel's own variables).
        connection_file: the host's copy of the connection file.
        connection_info: what that file says (ports, key, transport, ip).
        devices: the GPUs it holds.
        limits: what it may use.
        popen: what Jupyter passes on to ``subprocess.Popen`` (streams, cwd).
    """

    kernel_id: str
    argv: list[str]
    env: dict[str, str]
    connection_file: str
    connection_info: dict[str, Any]
    devices: list[Device]
    limits: Limits
    popen: dict[str, Any] = field(default_factory=dict)


class SandboxedKernel:
    """A kernel process started by a sandbox: signalled and judged the sandbox's way.

    Args:
        process: what the host waits on (the sandbox's own process).
        kernel_pid: the kernel's process id on the host, once known.
        limits: what the kernel may use.
    """

    def __init__(self, process: subprocess.Popen[bytes], kernel_pid: int | None,
                 limits: Limits) -> None:
        self.process = process
        self.kernel_pid = kernel_pid
        self.limits = limits

    async def send_signal(self, signum: int) -> None:
        """Signal the kernel's process group (the default: as Jupyter's own launcher does)."""
        kill_group(self.process.pid, signum)

    def exit_status(self, code: int) -> tuple[int, Limit | None]:
        """The kernel's own exit status (negative: a signal) from the process's, and the
        limit that ended it, if one did."""
        return code, None


class Sandbox(LoggingConfigurable):
    """Where a host's kernels run, and what each may see, reach and use.

    The limits here are read by every sandbox that can enforce them (``none`` enforces
    nothing): ``--Sandbox.memory_limit=8G`` applies whichever ``--isolation`` is chosen.
    """

    name: ClassVar[str] = ""
    #: True when kernels cannot see or reach one another's processes, files and sockets.
    isolated: ClassVar[bool] = False

    memory_limit = Unicode(
        "", help="Memory per kernel: `8G`, `512M`, or `none`. Default: a fair share of this "
        "machine's memory, by the kernel's GPUs among the host's (by its cores among the "
        "machine's for CPU kernels). Going over it ends the kernel, saying so.",
    ).tag(config=True)
    cpus_per_gpu = Float(
        0.0, help="CPU cores per GPU a kernel holds (0: the machine's cores divided by its "
        "GPUs). A `cpu:N` kernel gets N cores.",
    ).tag(config=True)
    scratch_size = Unicode(
        "", help="Size of each of a kernel's private scratch spaces, its home, /tmp and "
        "/dev/shm (RAM-backed, so they count against the memory limit where a memory cgroup "
        "applies): `10G`, `none`. Default: half the memory limit.",
    ).tag(config=True)
    max_processes = Integer(
        4096, help="Processes and threads per kernel (0: no limit), so that a fork bomb "
        "in one session cannot starve the others.",
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: A private folder of the host's (0700) for the sandbox's per-kernel files.
        self.workdir = Path("/nonexistent")

    def check(self) -> None:
        """Make sure kernels can be started this way here (and the limits make sense).

        Raises:
            IsolationUnavailableError: saying what is missing and how to get it.
        """
        for name in ("memory_limit", "scratch_size"):
            value = getattr(self, name)
            if value.strip():
                parse_size(value, f"Sandbox.{name}")

    def describe(self) -> dict[str, Any]:
        """What ``GET /api/cloudgpu/host`` says about isolation: the mode, whether kernels
        are isolated from one another, and how each limit is applied here."""
        return {"mode": self.name, "isolated": self.isolated, "limits": {}}

    def limits_for(self, devices: list[Device], cores: int, inventory: Inventory) -> Limits:
        """The limits of a kernel holding ``devices`` (or, without GPUs, ``cores`` cores)."""
        machine_cores = inventory.cpu_count
        if devices:
            per_gpu = self.cpus_per_gpu or machine_cores / max(len(inventory.devices), 1)
            cpus = min(max(per_gpu * len(devices), 1.0), machine_cores)
            share = len(devices) / max(len(inventory.devices), 1)
        else:
            cpus = float(min(max(cores, 1), machine_cores))
            share = cpus / machine_cores
        if self.memory_limit.strip():
            memory = parse_size(self.memory_limit, "Sandbox.memory_limit")
        else:
            memory = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * share)
        if self.scratch_size.strip():
            scratch = parse_size(self.scratch_size, "Sandbox.scratch_size")
        else:
            scratch = memory // 2 if memory else None
        return Limits(memory, cpus, scratch, self.max_processes or None)

    def socket_dir(self, kernel_id: str) -> Path | None:
        """The folder holding this kernel's connection file and sockets, and nothing of any
        other kernel's; None where kernels share Jupyter's folder (no isolation)."""
        return None

    async def launch(self, launch: KernelLaunch) -> SandboxedKernel:
        """Start the kernel in its sandbox; return once it runs there.

        Raises:
            IsolationUnavailableError: the sandbox could not be set up.
        """
        raise NotImplementedError

    def release(self, kernel_id: str) -> None:
        """Free what the sandbox holds for a kernel that is gone (its files, cgroups)."""

    def close(self) -> None:
        """Free what the sandbox holds for the host as a whole."""



def kernel_env(env: dict[str, str], pass_env: list[str]) -> dict[str, str]:
    """What of ``env`` a sandboxed kernel gets: the variables the host set for it, and
    those of the host's own environment that match a ``pass_env`` pattern; never the
    host's other variables (an operator's credentials, Jupyter's folders)."""
    host = os.environ
    kept = {k: v for k, v in env.items()
            if host.get(k) != v or any(fnmatch.fnmatchcase(k, p) for p in pass_env)}
    kept.pop("JPY_PARENT_PID", None)  # its parent is the sandbox's, never the host
    return kept


def write_connection_file(folder: Path, info: dict[str, Any], ip: str,
                          owner: tuple[int, int] | None) -> Path:
    """The kernel's own copy of its connection file in ``folder``, naming its sockets by
    ``ip`` as the kernel sees them; readable by ``owner`` (uid, gid) alone."""
    path = folder / "kernel.json"
    inside = dict(info, ip=ip)
    path.write_text(json.dumps({k: v.decode() if isinstance(v, bytes) else v
                                for k, v in inside.items()}))
    path.chmod(0o600)
    if owner is not None:
        os.chown(path, *owner)
    return path


def remove_folder(path: Path, log: logging.Logger) -> None:
    """Remove a finished kernel's folder; what cannot be removed is logged, not hidden."""
    def failed(_function: Any, where: str, error: Any) -> None:
        log.warning("Could not remove %s of a finished kernel: %s", where, error)

    if not path.exists():
        return
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=failed)
    else:
        shutil.rmtree(path, onerror=failed)


def load_sandbox(name: str) -> type[Sandbox]:
    """The sandbox class registered under ``name`` in the ``cloudgpu.isolation`` group.

    Raises:
        IsolationUnavailableError: naming the modes that are installed.
    """
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in found:
        raise IsolationUnavailableError(
            f"Unknown isolation `{name}`. Installed: {', '.join(sorted(found)) or 'none'}. "
            f"(Sandboxes register under the `{ENTRY_POINT_GROUP}` entry point group.)")
    cls = found[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Sandbox)):
        raise IsolationUnavailableError(
            f"Isolation `{name}` ({found[name].value}) is not a Sandbox.")
    return cls
