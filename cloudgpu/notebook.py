"""What a notebook records about its hardware: ``metadata.cloudgpu``, schema 1.

::

    "cloudgpu": {
      "schema": 1,
      "hardware": "H100",                      # requested: a hardware spec
      "environment": ["tabulate==0.9.0"],      # optional: pip requirements, remotely
      "ran_on": {                              # what the last run ran on, said by the agent
        "at": "2026-12-02T19:22:46Z", "hardware": "H100:1", "host": "gpu-7",
        "python": "3.11.7", "executable": "...",
        "gpus": {"type": "H100", "model": "NVIDIA H100 80GB HBM3", "count": 1,
                 "memory_gb": 79.6, "driver": "550.54.15", "cuda": "12.4",
                 "simulated": false},
        "packages": {"numpy": "2.1.3"},
        "environment": ["tabulate==0.9.0"]
      }
    }

A notebook of ``%%remote`` cells (each carries its spec) has no ``hardware``; its
``ran_on`` holds ``at`` and ``remote_cells``: one such record per spec its cells used.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

from .environment import check_requirements
from .errors import InvalidRequestError, NotebookMetadataError, UnknownHardwareError
from .hardware import Catalog, HardwareSpec, parse_spec

__all__ = [
    "KEY",
    "SCHEMA",
    "NotebookRecord",
    "availability",
    "differences",
    "kernelspec_hardware",
    "now",
    "read_record",
    "write_record",
]

KEY = "cloudgpu"
SCHEMA = 1


@dataclass
class NotebookRecord:
    """``metadata.cloudgpu`` of one notebook.

    Attributes:
        hardware: the hardware spec the notebook asks for (None: its own kernel, or
            ``%%remote`` cells that carry their own).
        environment: pip requirement strings the remote kernel needs.
        ran_on: what the last run ran on, or None before any run.
        schema: the version of this layout.
    """

    hardware: str | None = None
    environment: list[str] = field(default_factory=list)
    ran_on: dict[str, Any] | None = None
    schema: int = SCHEMA

    def to_json(self) -> dict[str, Any]:
        """As stored in the notebook (empty fields left out)."""
        body: dict[str, Any] = {"schema": self.schema}
        if self.hardware:
            body["hardware"] = self.hardware
        if self.environment:
            body["environment"] = self.environment
        if self.ran_on is not None:
            body["ran_on"] = self.ran_on
        return body


def read_record(nb: Any) -> NotebookRecord:
    """The notebook's ``metadata.cloudgpu`` (an empty record when it has none).

    Raises:
        NotebookMetadataError: it is malformed, or written by a newer cloudgpu.
    """
    data = nb.metadata.get(KEY)
    if data is None:
        return NotebookRecord()
    where = "metadata.cloudgpu"
    if not isinstance(data, dict):
        raise NotebookMetadataError(f"{where} must be an object; found {data!r}.")
    schema = data.get("schema", SCHEMA)
    if not isinstance(schema, int) or schema < 1:
        raise NotebookMetadataError(f"{where}.schema must be a whole number; found {schema!r}.")
    if schema > SCHEMA:
        raise NotebookMetadataError(
            f"{where}.schema is {schema}, newer than this cloudgpu knows ({SCHEMA}): upgrade "
            f"cloudgpu (`pip install -U cloudgpu`).")
    hardware = data.get("hardware")
    if hardware is not None and (not isinstance(hardware, str) or not hardware.strip()):
        raise NotebookMetadataError(
            f"{where}.hardware must be a hardware spec such as \"H100\"; found {hardware!r}.")
    try:
        environment = check_requirements(data.get("environment"), f"{where}.environment")
    except InvalidRequestError as e:
        raise NotebookMetadataError(str(e)) from None
    ran_on = data.get("ran_on")
    if ran_on is not None and not isinstance(ran_on, dict):
        raise NotebookMetadataError(f"{where}.ran_on must be an object; found {ran_on!r}.")
    return NotebookRecord(hardware.strip() if hardware else None, environment, ran_on, schema)


def write_record(nb: Any, record: NotebookRecord) -> None:
    """Store ``record`` as the notebook's ``metadata.cloudgpu`` (at the current schema)."""
    record.schema = SCHEMA
    nb.metadata[KEY] = record.to_json()


def kernelspec_hardware(nb: Any) -> str | None:
    """The hardware of the Cloud GPU kernelspec the notebook was saved with, if it was: from
    the installed kernelspec's own metadata, else from its name (``cloudgpu-h100``)."""
    name = str(nb.metadata.get("kernelspec", {}).get("name") or "")
    if not name.startswith("cloudgpu-"):
        return None
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    from .kernel.kernelspec import hardware_from_name

    try:
        spec = KernelSpecManager().get_kernel_spec(name)
        hardware = spec.metadata.get("cloudgpu", {}).get("hardware")
        if hardware:
            return str(hardware)
    except (NoSuchKernel, ValueError, OSError):
        pass  # not installed here: the name says it
    return hardware_from_name(name)


def now() -> str:
    """The current time as ``ran_on`` records it (UTC, ISO 8601, seconds)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def availability(spec: HardwareSpec, offered: list[dict[str, Any]],
                 ) -> tuple[str | None, float, str]:
    """Whether a pool offering ``offered`` (``Client.hardware()``) can serve ``spec``.

    Returns:
        The first choice it has (``None`` when it has none), that choice's price per hour,
        and a sentence for users: what is free now, or what the pool has instead.
    """
    by_type = {t["type"]: t for t in offered}
    for choice in spec.choices:
        if choice.is_cpu:
            entry = by_type.get("cpu", {})
            return str(choice), float(entry.get("price_per_hour") or 0.0) * choice.count, \
                "CPU is always available"
        candidates = [t for t in offered if t.get("total")] if choice.is_any else \
            [by_type[choice.type]] if by_type.get(choice.type, {}).get("total") else []
        candidates = [t for t in candidates if t["total"] >= choice.count]
        if candidates:
            best = min(candidates, key=lambda t: t["price_per_hour"])
            simulated = " (simulated)" if best.get("simulated") else ""
            queue = f", {best['queued']} waiting" if best.get("queued") else ""
            return str(choice), float(best["price_per_hour"]) * choice.count, (
                f"{best['free']} of {best['total']} {best['type']}{simulated} free now{queue}")
    has = [f"{t['total']}x {t['type']}{' (simulated)' if t.get('simulated') else ''}"
           for t in offered if t.get("total")]
    return None, 0.0, (f"the pool has no {spec.display}; it has "
                       f"{', '.join(['CPU', *has])}")


def differences(record: NotebookRecord, catalog: Catalog | None = None,
                local: dict[str, str] | None = None) -> list[str]:
    """Where the last run (``ran_on``) differs from what the notebook asks for: another GPU
    type or count, package versions outside the environment's requirements; with ``local``
    (``{distribution: version}`` installed here), packages whose version differs from the
    remote one (they matter where values move between the two sides)."""
    ran = record.ran_on or {}
    found = []
    runs = [("", ran)] if "gpus" in ran else \
        [(f"`%%remote gpu={spec}` cells: ", r) for spec, r in ran.get("remote_cells", {}).items()]
    if record.hardware and "gpus" in ran:
        found += _hardware_differences(record.hardware, ran, catalog)
    for prefix, one in runs:
        packages = one.get("packages", {})
        for text in record.environment:
            requirement = Requirement(text)
            have = packages.get(requirement.name) or _find(packages, requirement.name)
            if have is None:
                continue
            try:
                ok = requirement.specifier.contains(Version(have), prereleases=True)
            except InvalidVersion:
                ok = True
            if not ok:
                found.append(f"{prefix}the last run had {requirement.name} {have}, but the "
                             f"environment asks for `{text}`")
        for name, version in sorted((local or {}).items()):
            theirs = packages.get(name)
            if theirs is not None and theirs != version:
                found.append(f"{prefix}{name} is {version} here but was {theirs} remotely")
    return found


def _hardware_differences(requested: str, ran: dict[str, Any],
                          catalog: Catalog | None) -> list[str]:
    try:
        spec = parse_spec(requested, catalog)
    except UnknownHardwareError:
        return [f"the notebook asks for unknown hardware `{requested}`"]
    gpus = ran.get("gpus", {})
    count, gpu_type = int(gpus.get("count") or 0), gpus.get("type") or "cpu"
    got = "CPU" if not count else f"{count}x {gpu_type}"
    for position, choice in enumerate(spec.choices):
        same = (choice.is_cpu and not count) or (
            count == choice.count and (choice.is_any or choice.type == gpu_type))
        if same:
            return [] if position == 0 else [
                f"the last run got the fallback {got}, not the first choice "
                f"{spec.primary.display}"]
    return [f"the notebook asks for {spec.display}, but the last run was on {got}"]


def _find(packages: dict[str, str], name: str) -> str | None:
    """A distribution's version by its name, whatever its case and separators."""
    wanted = name.lower().replace("_", "-").replace(".", "-")
    for key, version in packages.items():
        if key.lower().replace("_", "-").replace(".", "-") == wanted:
            return version
    return None
