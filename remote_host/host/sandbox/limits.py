"""Resource limits on one kernel's processes, and whether a kernel that died ran into one.

Where the host may, each kernel gets cgroups of its own under the host's own
(``.../cloudgpu-HOSTPID/KERNEL``): cgroup v2 (``memory.max``, ``cpu.max``, ``pids.max``)
when the unified hierarchy lets this host use those controllers, else cgroup v1's
``memory``, ``cpu`` and ``pids`` controllers (which takes root). A limit no cgroup can
carry falls back to a per-process one: memory to ``RLIMIT_AS`` (for CPU kernels only:
CUDA reserves far more address space than it uses), CPU count to an affinity mask,
processes to ``RLIMIT_NPROC`` (only where the kernel has a user id of its own, since it
counts per user). :meth:`Enforcer.describe` says which applies on this machine.

Limits are applied while the kernel's sandbox is stopped before it runs anything, so
every byte the kernel allocates is counted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

from .base import Limits

__all__ = ["Enforcer"]

_V1_CONTROLLERS = ("memory", "cpu", "pids")
_PERIOD_US = 100_000


@dataclass
class _Hierarchy:
    """Where this host may make cgroups for one controller (or all of them, for v2)."""

    version: int
    base: Path  # the host's own cgroup in this hierarchy
    controllers: set[str]

    @property
    def parent(self) -> Path:
        return self.base / f"cloudgpu-{os.getpid()}"


@dataclass
class _Applied:
    """What was applied to one kernel, and where."""

    cgroups: list[Path] = field(default_factory=list)
    memory_cgroup: tuple[int, Path] | None = None  # (version, the kernel's memory cgroup)


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """``(mount point, root, fstype, super options)`` of the cgroup filesystems."""
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            before, _, after = line.partition(" - ")
            fields, tail = before.split(), after.split()
            if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
                found.append((fields[4], fields[3], tail[0], set(tail[2].split(","))))
    return found


def _own_paths() -> dict[str, str]:
    """This process's cgroup path per v1 controller, and ``""`` for the v2 hierarchy."""
    paths = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                paths[name] = path
    return paths


def _inside(mount: str, root: str, own: str) -> Path:
    """The folder of cgroup ``own`` in a hierarchy mounted at ``mount`` from ``root``."""
    relative = os.path.relpath(own, root) if own.startswith(root) else own.lstrip("/")
    return Path(mount) / ("" if relative == "." else relative)


def _write(path: Path, value: str) -> None:
    path.write_text(value)


class Enforcer:
    """How one host limits its kernels' resources."""

    def __init__(self, log: logging.Logger | None = None) -> None:
        self.log = log or logging.getLogger("cloudgpu.host")
        self.hierarchies: list[_Hierarchy] = []
        self.why_not: list[str] = []
        self._applied: dict[str, _Applied] = {}
        self._leftovers: list[Path] = []

    # -- what this machine allows ----------------------------------------------------------

    def discover(self) -> None:
        """Find where this host may make cgroups, and make its own there (``close`` removes
        them); until then only per-process limits apply."""
        mounts, own = _mounts(), _own_paths()
        v2 = [m for m in mounts if m[2] == "cgroup2"]
        if v2 and "" in own:
            mount, root, _, _ = v2[0]
            self._try_v2(_inside(mount, root, own[""]))
        if self.hierarchies:
            return
        for name in _V1_CONTROLLERS:
            found = next((m for m in mounts if m[2] == "cgroup" and name in m[3]), None)
            if found is None or name not in own:
                self.why_not.append(f"no cgroup v1 {name} controller mounted")
                continue
            base = _inside(found[0], found[1], own[name])
            hierarchy = _Hierarchy(1, base, {name})
            try:
                hierarchy.parent.mkdir(exist_ok=True)
            except OSError as e:
                self.why_not.append(f"cgroup v1 {name}: cannot create {hierarchy.parent} ({e})")
                continue
            self._sweep(base)
            self.hierarchies.append(hierarchy)

    def _try_v2(self, base: Path) -> None:
        try:
            available = set((base / "cgroup.controllers").read_text().split())
        except OSError as e:
            self.why_not.append(f"cgroup v2: cannot read {base} ({e})")
            return
        wanted = {"memory", "cpu", "pids"} & available
        if "memory" not in wanted:
            self.why_not.append(f"cgroup v2: the memory controller is not available in {base}")
            return
        hierarchy = _Hierarchy(2, base, wanted)
        enable = " ".join(f"+{c}" for c in sorted(wanted))
        try:
            # A v2 cgroup with processes in it cannot hand controllers to children (the host
            # itself is one): this fails unless the host runs in a cgroup of its own.
            _write(base / "cgroup.subtree_control", enable)
            hierarchy.parent.mkdir(exist_ok=True)
            _write(hierarchy.parent / "cgroup.subtree_control", enable)
        except OSError as e:
            self.why_not.append(f"cgroup v2: cannot delegate {enable} under {base} ({e})")
            with contextlib.suppress(OSError):
                hierarchy.parent.rmdir()
            return
        self._sweep(base)
        self.hierarchies.append(hierarchy)

    def _sweep(self, base: Path) -> None:
        """Remove the empty cgroups of hosts that died without removing theirs."""
        for stale in base.glob("cloudgpu-*"):
            pid = stale.name.rpartition("-")[2]
            if not pid.isdigit() or int(pid) == os.getpid() or Path(f"/proc/{pid}").exists():
                continue
            for child in [p for p in stale.iterdir() if p.is_dir()]:
                with contextlib.suppress(OSError):
                    child.rmdir()
            with contextlib.suppress(OSError):
                stale.rmdir()

    def _by(self, controller: str) -> _Hierarchy | None:
        return next((h for h in self.hierarchies if controller in h.controllers), None)

    def describe(self) -> dict[str, str]:
        """How each limit is applied here, in words."""
        def how(controller: str, fallback: str) -> str:
            hierarchy = self._by(controller)
            if hierarchy is None:
                return fallback
            return f"cgroup v{hierarchy.version} {controller} controller"
        return {
            "memory": how("memory", "RLIMIT_AS (CPU kernels only; GPU kernels unlimited)"),
            "cpu": how("cpu", "CPU affinity"),
            "processes": how("pids", "RLIMIT_NPROC (where each kernel has its own user id)"),
            "scratch": "the size of its tmpfs",
        }

    # -- one kernel ---------------------------------------------------------------------------

    def apply(self, kernel_id: str, limits: Limits, pids: list[int], *, gpu: bool,
              own_uid: bool, slot: int) -> None:
        """Limit ``pids`` (a stopped sandbox's processes) and everything they start.

        Args:
            kernel_id: names the kernel's cgroups.
            limits: what it may use.
            pids: its processes so far; their children inherit the limits.
            gpu: it holds GPUs (no address-space limit then).
            own_uid: it runs as a user id no other kernel has (per-user limits are then its).
            slot: a small number of its own, to spread affinity masks over the cores.

        Raises:
            OSError: a limit could not be set where this host said it could set it.
        """
        applied = self._applied.setdefault(kernel_id, _Applied())
        for hierarchy in self.hierarchies:
            cgroup = hierarchy.parent / kernel_id
            cgroup.mkdir(exist_ok=True)
            if cgroup not in applied.cgroups:
                applied.cgroups.append(cgroup)
            self._set(hierarchy, cgroup, limits)
            if "memory" in hierarchy.controllers:
                applied.memory_cgroup = (hierarchy.version, cgroup)
            for pid in pids:
                _write(cgroup / "cgroup.procs", str(pid))
        for pid in pids:
            self._fallbacks(pid, limits, gpu=gpu, own_uid=own_uid, slot=slot)

    def _set(self, hierarchy: _Hierarchy, cgroup: Path, limits: Limits) -> None:
        has = hierarchy.controllers
        if hierarchy.version == 2:
            if limits.memory_bytes and "memory" in has:
                _write(cgroup / "memory.max", str(limits.memory_bytes))
                if (cgroup / "memory.swap.max").exists():
                    _write(cgroup / "memory.swap.max", "0")
            if limits.cpus and "cpu" in has:
                _write(cgroup / "cpu.max", f"{int(limits.cpus * _PERIOD_US)} {_PERIOD_US}")
            if limits.processes and "pids" in has:
                _write(cgroup / "pids.max", str(limits.processes))
            return
        if limits.memory_bytes and "memory" in has:
            _write(cgroup / "memory.limit_in_bytes", str(limits.memory_bytes))
            if (cgroup / "memory.memsw.limit_in_bytes").exists():  # no way round it by swap
                _write(cgroup / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
        if limits.cpus and "cpu" in has:
            _write(cgroup / "cpu.cfs_period_us", str(_PERIOD_US))
            _write(cgroup / "cpu.cfs_quota_us", str(int(limits.cpus * _PERIOD_US)))
        if limits.processes and "pids" in has:
            _write(cgroup / "pids.max", str(limits.processes))

    def _fallbacks(self, pid: int, limits: Limits, *, gpu: bool, own_uid: bool,
                   slot: int) -> None:
        if limits.memory_bytes and not gpu and self._by("memory") is None:
            resource.prlimit(pid, resource.RLIMIT_AS, (limits.memory_bytes,) * 2)
        if limits.processes and own_uid and self._by("pids") is None:
            resource.prlimit(pid, resource.RLIMIT_NPROC, (limits.processes,) * 2)
        if limits.cpus and self._by("cpu") is None:
            cores = sorted(os.sched_getaffinity(0))
            count = min(max(int(limits.cpus), 1), len(cores))
            start = slot * count
            os.sched_setaffinity(pid, {cores[(start + i) % len(cores)] for i in range(count)})

    def memory_limit_hit(self, kernel_id: str) -> bool:
        """Whether the kernel's memory cgroup killed a process for going over its limit."""
        applied = self._applied.get(kernel_id)
        if applied is None or applied.memory_cgroup is None:
            return False
        version, cgroup = applied.memory_cgroup
        try:
            if version == 2:
                events = (cgroup / "memory.events").read_text()
            else:
                events = (cgroup / "memory.oom_control").read_text()
                if "oom_kill " not in events:  # kernels before 4.13: only a failure count
                    return int((cgroup / "memory.failcnt").read_text()) > 0
        except OSError as e:
            self.log.info("Cannot read the memory cgroup of kernel %s: %s", kernel_id, e)
            return False
        counts = dict(line.split() for line in events.splitlines() if len(line.split()) == 2)
        return int(counts.get("oom_kill", "0")) > 0

    def release(self, kernel_id: str) -> None:
        """Remove the kernel's cgroups (those still busy are tried again later)."""
        applied = self._applied.pop(kernel_id, None)
        self._leftovers.extend(applied.cgroups if applied else [])
        left = []
        for cgroup in self._leftovers:
            try:
                cgroup.rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:  # its last processes are still exiting
                self.log.debug("Cgroup %s not removed yet: %s", cgroup, e)
                left.append(cgroup)
        self._leftovers = left

    def close(self, within: float = 5.0) -> None:
        """Remove every cgroup this host made, waiting up to ``within`` seconds for the last
        processes of its kernels to leave them (what stays is removed by the next host)."""
        for kernel_id in list(self._applied):
            self.release(kernel_id)
        deadline = time.monotonic() + within
        while self._leftovers and time.monotonic() < deadline:
            time.sleep(0.05)  # the kernel's processes are gone; the cgroup empties behind them
            self.release("")
        for cgroup in self._leftovers:
            self.log.warning("Could not remove cgroup %s: it still has processes", cgroup)
        for hierarchy in self.hierarchies:
            try:
                hierarchy.parent.rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:
                self.log.warning("Could not remove cgroup %s: %s", hierarchy.parent, e)
