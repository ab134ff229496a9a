"""What hardware a host has: real GPUs through NVML, a simulated inventory, or CPU only."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from cloudgpu.errors import HostStartError, NoCapacityError, UnknownHardwareError
from cloudgpu.hardware import Catalog, HardwareSpec, parse_spec

__all__ = ["Device", "Inventory"]


@dataclass(frozen=True)
class Device:
    """One GPU of a host, as a kernel can be given it.

    Attributes:
        index: the CUDA device index, what goes into ``CUDA_VISIBLE_DEVICES``.
        type: the catalog's canonical name (``H100``).
        name: the name the driver reports (``NVIDIA H100 80GB HBM3``).
        memory_gb: device memory.
        uuid: the driver's UUID, or a made-up one for a simulated device.
        simulated: True when this device does not exist (``--simulate``).
    """

    index: int
    type: str
    name: str
    memory_gb: float
    uuid: str
    simulated: bool


class Inventory:
    """The devices of one host and which kernel holds each."""

    def __init__(self, devices: list[Device], *, driver: str | None = None,
                 cuda: str | None = None, cpu_count: int | None = None) -> None:
        self.devices = devices
        self.driver = driver
        self.cuda = cuda
        self.cpu_count = cpu_count or os.cpu_count() or 1
        self._holder: dict[int, str] = {}

    @property
    def simulated(self) -> bool:
        """True when the GPUs listed are simulated."""
        return any(d.simulated for d in self.devices)

    @classmethod
    def simulate(cls, spec: str, catalog: Catalog | None = None) -> Inventory:
        """Build a simulated inventory from a spec such as ``H100:2,A100-80GB:4``.

        Raises:
            UnknownHardwareError: when a part names no known GPU.
        """
        catalog = catalog or Catalog.default()
        devices: list[Device] = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            parsed = parse_spec(part, catalog)
            if len(parsed.choices) != 1 or parsed.choices[0].type in ("any", "cpu"):
                raise UnknownHardwareError(
                    f"Simulated inventory part `{part}` must name one GPU type with an optional "
                    f"count, like `H100:2`."
                )
            choice = parsed.choices[0]
            hw = catalog.get(choice.type)
            for _ in range(choice.count):
                i = len(devices)
                devices.append(Device(i, hw.name, f"simulated {hw.name}", hw.memory_gb,
                                      f"SIM-{hw.name}-{i}", True))
        return cls(devices, driver="simulated", cuda="simulated")

    @classmethod
    def from_nvml(cls, catalog: Catalog | None = None) -> Inventory:
        """Read the real GPUs through NVML; CPU only when there is no driver."""
        catalog = catalog or Catalog.default()
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # no libnvidia-ml or no driver: this host is CPU only
            return cls([])
        try:
            driver = _text(pynvml.nvmlSystemGetDriverVersion())
            cuda_v = pynvml.nvmlSystemGetCudaDriverVersion_v2()
            devices = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = _text(pynvml.nvmlDeviceGetName(handle))
                hw = catalog.from_nvml_name(name)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30
                devices.append(Device(i, hw.name if hw else name, name, round(memory, 1),
                                      _text(pynvml.nvmlDeviceGetUUID(handle)), False))
            return cls(devices, driver=driver, cuda=f"{cuda_v // 1000}.{cuda_v % 1000 // 10}")
        finally:
            pynvml.nvmlShutdown()

    @classmethod
    def discover(cls, simulate: str | None = None) -> Inventory:
        """The simulated inventory when asked for, else what NVML finds."""
        return cls.simulate(simulate) if simulate else cls.from_nvml()

    def restrict(self, visible: str) -> Inventory:
        """Only the devices ``visible`` names, as ``CUDA_VISIBLE_DEVICES`` does: indices or
        UUIDs, comma-separated (``1,3``); ``none`` (or nothing) leaves a CPU-only host.

        A host that shares its machine (a Ray node, a container scheduler) owns only the GPUs
        it was given; NVML lists them all.

        Raises:
            HostStartError: naming a device this host does not have.
        """
        wanted = [] if visible.strip().lower() in ("", "none") else \
            [v.strip() for v in visible.split(",") if v.strip()]
        kept = []
        for name in wanted:
            device = next((d for d in self.devices if name in (str(d.index), d.uuid)), None)
            if device is None:
                raise HostStartError(
                    f"This host was given GPU `{name}`, which it does not have; it has "
                    f"{', '.join(f'{d.index} ({d.uuid})' for d in self.devices) or 'none'}."
                )
            kept.append(device)
        return Inventory(kept, driver=self.driver, cuda=self.cuda, cpu_count=self.cpu_count)

    def free_count(self, gpu_type: str) -> int:
        """How many devices of ``gpu_type`` no kernel holds."""
        return sum(1 for d in self.devices if d.type == gpu_type and d.index not in self._holder)

    def allocate(self, spec: HardwareSpec, kernel_id: str, catalog: Catalog) -> list[Device]:
        """Reserve devices for a kernel: the first choice of ``spec`` that fits.

        Raises:
            NoCapacityError: when no choice fits into what is free.
        """
        for choice in spec.choices:
            if choice.type == "cpu":
                return []
            candidates = self._candidate_types(choice.type, catalog)
            for gpu_type in candidates:
                free = [d for d in self.devices
                        if d.type == gpu_type and d.index not in self._holder]
                if len(free) >= choice.count:
                    picked = free[: choice.count]
                    for d in picked:
                        self._holder[d.index] = kernel_id
                    return picked
        have = ", ".join(f"{t}: {self.free_count(t)} free" for t in self.types())
        raise NoCapacityError(
            f"This host cannot give `{spec}` now: it has {have or 'no GPUs, CPU only'}."
        )

    def _candidate_types(self, gpu_type: str, catalog: Catalog) -> list[str]:
        if gpu_type != "any":
            return [gpu_type]
        prices = {t.name: t.price_per_hour for t in catalog}
        return sorted(self.types(), key=lambda t: prices.get(t, float("inf")))

    def release(self, kernel_id: str) -> None:
        """Free every device ``kernel_id`` held."""
        for index in [i for i, k in self._holder.items() if k == kernel_id]:
            del self._holder[index]

    def held_by(self, kernel_id: str) -> list[Device]:
        """The devices a kernel holds."""
        return [d for d in self.devices if self._holder.get(d.index) == kernel_id]

    def types(self) -> list[str]:
        """The GPU types present, in device order."""
        return list(dict.fromkeys(d.type for d in self.devices))

    def to_json(self) -> dict[str, object]:
        """The inventory as ``GET /api/cloudgpu/host`` returns it."""
        return {
            "simulated": self.simulated,
            "driver": self.driver,
            "cuda": self.cuda,
            "cpu_count": self.cpu_count,
            "gpus": [dict(asdict(d), kernel_id=self._holder.get(d.index)) for d in self.devices],
        }


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
