"""What a remote kernel runs on, as a notebook records it in ``metadata.cloudgpu.ran_on``.

Computed inside the kernel by the agent (the ``ran_on`` op): the GPUs it was given
(``CUDA_VISIBLE_DEVICES``) as NVML describes them, or ``simulated`` for a simulated
inventory; the Python version; the versions of the packages the notebook imported.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from collections.abc import Iterable
from typing import Any

from cloudgpu.packages import imported_packages

__all__ = ["gpus", "ran_on"]


def ran_on(modules: Iterable[str]) -> dict[str, Any]:
    """The record: ``at`` (UTC), ``host``, ``python``, ``gpus`` and ``packages`` (the installed
    distributions among ``modules``, with their versions)."""
    return {
        "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace(
            "+00:00", "Z"),
        "host": platform.node(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "gpus": gpus(),
        "packages": imported_packages(modules),
    }


def gpus() -> dict[str, Any]:
    """The GPUs this kernel sees: ``type`` (the catalog's name), ``model`` (the driver's),
    ``count``, ``memory_gb`` (each), ``driver``, ``cuda`` and ``simulated``; ``count`` 0 on
    CPU."""
    simulated = [t for t in os.environ.get("CLOUDGPU_SIMULATED_GPUS", "").split(",") if t]
    if simulated:
        return _simulated(simulated)
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
               if d.strip()]
    if not visible:
        return {"type": "cpu", "model": None, "count": 0, "memory_gb": None, "driver": None,
                "cuda": None, "simulated": False}
    return _from_nvml(visible)


def _simulated(types: list[str]) -> dict[str, Any]:
    from cloudgpu.hardware import Catalog

    catalog = Catalog.default()
    memory = [catalog.get(t).memory_gb for t in types if t in catalog]
    return {"type": types[0], "model": f"simulated {'/'.join(dict.fromkeys(types))}",
            "count": len(types),
            "memory_gb": memory[0] if memory else None, "driver": "simulated",
            "cuda": "simulated", "simulated": True}


def _from_nvml(visible: list[str]) -> dict[str, Any]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as e:  # no driver: say so in the record rather than fail the run
        return {"type": None, "model": None, "count": len(visible), "memory_gb": None,
                "driver": None,
                "cuda": None, "simulated": False, "error": f"NVML: {e}"}
    try:
        names, memory = [], []
        for device in visible:
            handle = (pynvml.nvmlDeviceGetHandleByUUID(device) if device.startswith("GPU-")
                      else pynvml.nvmlDeviceGetHandleByIndex(int(device)))
            names.append(_text(pynvml.nvmlDeviceGetName(handle)))
            memory.append(round(pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30, 1))
        cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        from cloudgpu.hardware import Catalog

        known = Catalog.default().from_nvml_name(names[0])
        return {"type": known.name if known else names[0],
                "model": "/".join(dict.fromkeys(names)), "count": len(names),
                "memory_gb": memory[0], "driver": _text(pynvml.nvmlSystemGetDriverVersion()),
                "cuda": f"{cuda // 1000}.{cuda % 1000 // 10}", "simulated": False}
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
