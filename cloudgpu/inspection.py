"""``cloudgpu inspect NOTEBOOK``: what a notebook needs, whether the pool can serve it now,
what it costs, and where its last run differs from what it asks for."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ._format import money
from .errors import CloudGPUError, UnknownHardwareError
from .notebook import NotebookRecord, availability, differences, kernelspec_hardware, read_record

__all__ = ["inspect_notebook", "main"]


def _ran_on_line(ran: dict[str, Any]) -> str:
    gpus = ran.get("gpus", {})
    if gpus.get("count"):
        what = f"{gpus['count']}x {gpus.get('model') or gpus.get('type')}"
        if gpus.get("memory_gb"):
            what += f" ({gpus['memory_gb']:g} GB each)"
        what += f", driver {gpus.get('driver')}, CUDA {gpus.get('cuda')}"
    else:
        what = "CPU"
    return f"{what}; Python {ran.get('python', '?')} on {ran.get('host', '?')}"


def _packages_line(ran: dict[str, Any]) -> str:
    packages = ran.get("packages", {})
    return ", ".join(f"{k} {v}" for k, v in packages.items()) or "none"


async def inspect_notebook(path: str) -> str:
    """The report ``cloudgpu inspect`` prints for the notebook at ``path``.

    Raises:
        NotebookMetadataError: its ``metadata.cloudgpu`` is malformed.
        CloudGPUError: the pool cannot be reached.
    """
    import nbformat

    from .client import get_client
    from .hardware import parse_spec

    nb = nbformat.read(path, as_version=4)
    record = read_record(nb)
    hardware = record.hardware or kernelspec_hardware(nb)
    source = "metadata.cloudgpu.hardware" if record.hardware else "its Cloud GPU kernel"
    client = get_client()
    where = (await client.get_provider()).description
    lines = [f"{path}"]
    catalog = await client.catalog()
    if hardware:
        lines.append(f"  hardware:    {hardware} (from {source})")
    else:
        lines.append("  hardware:    none recorded: runs in its own kernel "
                     f"({nb.metadata.get('kernelspec', {}).get('name', 'python3')}); "
                     f"%%remote cells carry their own")
    environment = ", ".join(record.environment) or "none asked for (the host's packages)"
    lines.append(f"  environment: {environment}")
    if hardware:
        try:
            spec = parse_spec(hardware, catalog)
        except UnknownHardwareError as e:
            lines.append(f"  available:   no: {e}")
        else:
            served, price, note = availability(spec, await client.hardware())
            if served is None:
                lines.append(f"  available:   NO: {note} ({where})")
            else:
                lines.append(f"  available:   yes, as {served}: {note} ({where})")
                lines.append(f"  price:       {money(price)}/hour")
    ran = record.ran_on
    if not ran:
        lines.append("  last run:    never run with cloudgpu run")
    else:
        lines.append(f"  last run:    {ran.get('at', '?')}")
        if "gpus" in ran:
            lines.append(f"    ran on:    {_ran_on_line(ran)}")
            lines.append(f"    packages:  {_packages_line(ran)}")
        for spec_text, one in ran.get("remote_cells", {}).items():
            lines.append(f"    %%remote gpu={spec_text}: {_ran_on_line(one)}")
            lines.append(f"      packages: {_packages_line(one)}")
    # Values move between this kernel and the remote one only with %%remote cells.
    local = _local_versions(record) if not hardware else None
    found = differences(record, catalog, local)
    if ran:
        lines.append("  differences: " + ("none: the last run matches what it asks for"
                                          if not found else ""))
        lines += [f"    - {text}" for text in found]
    return "\n".join(lines)


def _local_versions(record: NotebookRecord) -> dict[str, str]:
    """The versions installed here of the packages the last run's %%remote cells used."""
    from importlib.metadata import PackageNotFoundError, version

    names = {n for one in (record.ran_on or {}).get("remote_cells", {}).values()
             for n in one.get("packages", {})}
    found: dict[str, str] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``cloudgpu inspect``."""
    parser = argparse.ArgumentParser(
        prog="cloudgpu inspect",
        description="Show what a notebook needs (hardware, environment), whether the pool "
        "(the configured one, or your local pool) can serve it now and at what price per "
        "hour, what its last `cloudgpu run` ran on, and where that differs from what it asks "
        "for (another GPU, other package versions). Runs nothing.",
    )
    parser.add_argument("notebook", help="path of the .ipynb to inspect")
    args = parser.parse_args(argv)
    if not Path(args.notebook).is_file():
        parser.error(f"no notebook at {args.notebook}")
    from ._loop import run_sync

    try:
        print(run_sync(inspect_notebook(args.notebook)))
    except CloudGPUError as e:
        print(f"cloudgpu inspect: {e}", file=sys.stderr)
        raise SystemExit(1) from None
