"""Kernelspecs for the Cloud GPU kernel: one per hardware choice, found by Jupyter like any other.

``cloudgpu-h100`` runs ``python -m cloudgpu.kernel -f {connection_file} --hardware H100``;
the hardware also sits in the spec's ``metadata`` so a notebook saved with a Cloud GPU
kernel asks for the same hardware when it is opened again.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from cloudgpu.hardware import Catalog, HardwareSpec, parse_spec

__all__ = [
    "DEFAULT_HARDWARE",
    "InstalledKernel",
    "display_name",
    "hardware_from_name",
    "install_kernelspecs",
    "kernel_json",
    "kernelspec_name",
    "list_kernelspecs",
    "remove_kernelspecs",
]

PREFIX = "cloudgpu-"
DEFAULT_HARDWARE = ("cpu",)
"""What ``cloudgpu kernel install`` installs when no ``--hardware`` is given."""


@dataclass(frozen=True)
class InstalledKernel:
    """A Cloud GPU kernelspec found on disk.

    Attributes:
        name: the kernelspec name (``cloudgpu-h100``).
        display_name: what the launcher shows (``Cloud GPU (H100)``).
        hardware: the canonical hardware spec it asks for.
        path: its resource directory.
    """

    name: str
    display_name: str
    hardware: str
    path: str


def kernelspec_name(spec: HardwareSpec) -> str:
    """The kernelspec name for ``spec``: ``cloudgpu-a100-80gb-x2``, ``cloudgpu-cpu``."""
    parts = []
    for choice in spec.choices:
        part = choice.type.lower()
        parts.append(part if choice.count == 1 else f"{part}-x{choice.count}")
    return PREFIX + re.sub(r"[^a-z0-9._-]", "-", "-or-".join(parts))


def display_name(spec: HardwareSpec) -> str:
    """The launcher's name for ``spec``: ``Cloud GPU (A100-80GB x2)``, ``Cloud GPU (CPU)``."""
    words = []
    for choice in spec.choices:
        word = "CPU" if choice.is_cpu else "any GPU" if choice.is_any else choice.type
        words.append(word if choice.count == 1 else f"{word} x{choice.count}")
    return f"Cloud GPU ({' or '.join(words)})"


def hardware_from_name(name: str, catalog: Catalog | None = None) -> str | None:
    """The hardware a Cloud GPU kernelspec name stands for (``cloudgpu-a100-80gb-x2`` ->
    ``A100-80GB:2``), so a notebook saved with a kernel that is not installed here still
    says what it needs; None for other names."""
    if not name.startswith(PREFIX):
        return None
    catalog = catalog or Catalog.default()
    by_part = {kernelspec_name(parse_spec(t.name, catalog))[len(PREFIX):]: t.name
               for t in catalog}
    by_part.update(any="any", cpu="cpu")
    choices = []
    for part in name[len(PREFIX):].split("-or-"):
        found = re.fullmatch(r"(.+)-x(\d+)", part)
        type_part, count = (found.group(1), int(found.group(2))) if found else (part, 1)
        if type_part not in by_part:
            return None
        choices.append(by_part[type_part] if count == 1 else f"{by_part[type_part]}:{count}")
    return "|".join(choices)


def kernel_json(spec: HardwareSpec, environment: list[str] | None = None) -> dict[str, object]:
    """The ``kernel.json`` of the Cloud GPU kernel on ``spec``, its remote kernel in an
    environment with the pip requirements ``environment`` when given."""
    requirements = [arg for req in environment or [] for arg in ("--requirement", req)]
    return {
        "argv": [sys.executable, "-m", "cloudgpu.kernel", "-f", "{connection_file}",
                 "--hardware", str(spec), *requirements],
        "display_name": display_name(spec),
        "language": "python",
        # Our process relays interrupts to the host; a signal would also hit the
        # embedded host that shares our process group.
        "interrupt_mode": "message",
        "metadata": {"cloudgpu": {"hardware": str(spec)}, "debugger": True},
    }


def install_kernelspecs(hardware: list[str] | None = None, *, user: bool = False,
                        prefix: str | None = None) -> list[InstalledKernel]:
    """Install one kernelspec per hardware spec (``cpu`` when none is given).

    Args:
        hardware: specs such as ``H100``, ``A100-80GB:2``; ``cpu`` is always included.
        user: install for this user (Jupyter's data dir).
        prefix: install under ``PREFIX/share/jupyter/kernels`` (``sys.prefix`` for a venv).
            Neither ``user`` nor ``prefix``: the system-wide Jupyter path.

    Raises:
        UnknownHardwareError: a spec names hardware the catalog does not know.
    """
    specs = [parse_spec(text) for text in [*DEFAULT_HARDWARE, *(hardware or [])]]
    unique = list(dict.fromkeys(specs))
    manager = KernelSpecManager()
    installed = []
    for spec in unique:
        name = kernelspec_name(spec)
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / name
            source.mkdir()
            (source / "kernel.json").write_text(json.dumps(kernel_json(spec), indent=1))
            _copy_logos(source)
            path = manager.install_kernel_spec(str(source), name, user=user, prefix=prefix)
        installed.append(InstalledKernel(name, display_name(spec), str(spec), path))
    return installed


def _copy_logos(target: Path) -> None:
    """Reuse ipykernel's Python logos so launchers show a familiar icon."""
    try:
        from ipykernel.kernelspec import RESOURCES
    except ImportError:  # pragma: no cover - ipykernel is a dependency
        return
    for logo in Path(RESOURCES).glob("logo-*"):
        shutil.copy(logo, target / logo.name)


def list_kernelspecs() -> list[InstalledKernel]:
    """Every Cloud GPU kernelspec Jupyter can find, by name."""
    manager = KernelSpecManager()
    found = []
    for name, path in sorted(manager.find_kernel_specs().items()):
        try:
            spec = manager.get_kernel_spec(name)
        except (NoSuchKernel, ValueError, OSError):
            continue
        hardware = spec.metadata.get("cloudgpu", {}).get("hardware")
        if hardware is not None:
            found.append(InstalledKernel(name, spec.display_name, hardware, path))
    return found


def remove_kernelspecs(names: list[str] | None = None, hardware: list[str] | None = None,
                       *, remove_all: bool = False) -> list[InstalledKernel]:
    """Remove Cloud GPU kernelspecs by name, by hardware, or all of them.

    Raises:
        LookupError: a name or hardware has no Cloud GPU kernelspec installed.
        UnknownHardwareError: a hardware spec is not one the catalog knows.
    """
    installed = {k.name: k for k in list_kernelspecs()}
    wanted = list(names or []) + [kernelspec_name(parse_spec(h)) for h in hardware or []]
    if remove_all:
        wanted = list(installed)
    missing = [n for n in wanted if n not in installed]
    if missing:
        known = ", ".join(installed) or "none"
        raise LookupError(f"No Cloud GPU kernel named {', '.join(f'`{n}`' for n in missing)} "
                          f"is installed. Installed: {known}.")
    manager = KernelSpecManager()
    removed = []
    for name in dict.fromkeys(wanted):
        manager.remove_kernel_spec(name)
        removed.append(installed[name])
    return removed
