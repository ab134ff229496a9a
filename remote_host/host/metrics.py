"""Live readings per kernel: GPU utilization and memory from NVML, or, for simulated GPUs,
the kernel process's own CPU use and resident memory, labelled as such.

A simulated GPU has nothing to read. Rather than invent numbers, its readings are the
kernel process's CPU utilization and resident set size from ``/proc``: real figures that
move when the cell works, shown with ``simulated: true`` and a ``source`` that says what
they are.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from .inventory import Device

__all__ = ["GPUReading", "KernelReadings", "ProcessSampler", "kernel_readings", "read_nvml"]

NVML_SOURCE = "NVML"
SIMULATED_SOURCE = ("the kernel process's CPU use and resident memory (/proc); its GPUs are "
                    "simulated")
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass
class GPUReading:
    """One device at one moment.

    Attributes:
        index: the host's device index.
        type: the catalog name (``H100``).
        utilization: percent busy over the last sample period (0-100).
        memory_used_gb: device memory in use (for a simulated device: the kernel's RSS).
        memory_total_gb: device memory.
    """

    index: int
    type: str
    utilization: float | None
    memory_used_gb: float | None
    memory_total_gb: float


@dataclass
class KernelReadings:
    """What ``GET /api/cloudgpu/metrics`` says about one kernel.

    Attributes:
        kernel_id: the kernel.
        simulated: True when the GPU figures stand in for simulated devices.
        source: where the GPU figures come from, in words.
        gpus: one reading per device the kernel holds (none for a CPU kernel).
        utilization: the mean utilization of those devices, or None without any.
        memory_used_gb: device memory in use, summed.
        memory_total_gb: device memory, summed.
        cpu_percent: the kernel process's CPU use (100 = one core), or None if unreadable.
        rss_gb: the kernel process's resident memory, or None if unreadable.
    """

    kernel_id: str
    simulated: bool
    source: str
    gpus: list[GPUReading]
    utilization: float | None
    memory_used_gb: float | None
    memory_total_gb: float
    cpu_percent: float | None
    rss_gb: float | None

    def to_json(self) -> dict[str, Any]:
        """The readings as JSON."""
        return asdict(self)


class ProcessSampler:
    """CPU use of processes between two readings, from ``/proc/PID/stat``.

    The first reading of a process averages over its whole life; later ones cover the time
    since the previous reading.
    """

    def __init__(self) -> None:
        self._last: dict[int, tuple[float, float]] = {}  # pid: (cpu seconds, monotonic)

    def read(self, pid: int | None) -> tuple[float | None, float | None]:
        """``(cpu_percent, rss_gb)`` of ``pid``; Nones when it cannot be read."""
        if pid is None:
            return None, None
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            with open("/proc/uptime") as f:
                uptime = float(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            self._last.pop(pid, None)
            return None, None
        # Fields after the command name, counted from 3: utime 14, stime 15, start 22, rss 24.
        cpu = (int(fields[11]) + int(fields[12])) / _TICKS
        rss_gb = int(fields[21]) * _PAGE / 2**30
        now = time.monotonic()
        previous = self._last.get(pid)
        self._last[pid] = (cpu, now)
        if previous is not None and now > previous[1]:
            return 100 * max(cpu - previous[0], 0.0) / (now - previous[1]), rss_gb
        lived = uptime - int(fields[19]) / _TICKS
        return (100 * cpu / lived if lived > 0 else 0.0), rss_gb

    def forget(self, alive: Iterable[int]) -> None:
        """Drop what is kept about processes not in ``alive``."""
        keep = set(alive)
        for pid in [p for p in self._last if p not in keep]:
            del self._last[pid]


def read_nvml(devices: list[Device]) -> list[GPUReading]:
    """Utilization and memory of real devices through NVML.

    Raises:
        RuntimeError: NVML cannot be read (no driver), with its message.
    """
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        raise RuntimeError(f"NVML cannot be read: {e}") from e
    try:
        out = []
        for device in devices:
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index)
            rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            out.append(GPUReading(device.index, device.type, float(rates.gpu),
                                  memory.used / 2**30, memory.total / 2**30))
        return out
    except pynvml.NVMLError as e:
        raise RuntimeError(f"NVML failed reading the kernel's GPUs: {e}") from e
    finally:
        pynvml.nvmlShutdown()


def kernel_readings(kernel_id: str, devices: list[Device], pid: int | None,
                    sampler: ProcessSampler) -> KernelReadings:
    """The readings of one kernel holding ``devices``, running as process ``pid``."""
    cpu_percent, rss_gb = sampler.read(pid)
    simulated = any(d.simulated for d in devices)
    if devices and not simulated:
        try:
            gpus, source = read_nvml(devices), NVML_SOURCE
        except RuntimeError as e:  # shown as the source, with no figures: never made up
            gpus = [GPUReading(d.index, d.type, None, None, d.memory_gb) for d in devices]
            source = str(e)
    else:
        # One process drives every simulated device it holds: each shows its figures.
        share = None if cpu_percent is None else min(cpu_percent, 100.0)
        gpus = [GPUReading(d.index, d.type, share, rss_gb, d.memory_gb) for d in devices]
        source = SIMULATED_SOURCE if devices else "no GPU: the kernel process (/proc)"
    used = [g.memory_used_gb for g in gpus if g.memory_used_gb is not None]
    busy = [g.utilization for g in gpus if g.utilization is not None]
    return KernelReadings(
        kernel_id=kernel_id, simulated=simulated, source=source, gpus=gpus,
        utilization=sum(busy) / len(busy) if busy else None,
        memory_used_gb=(rss_gb if simulated else sum(used)) if used else None,
        memory_total_gb=sum(g.memory_total_gb for g in gpus),
        cpu_percent=cpu_percent, rss_gb=rss_gb,
    )
