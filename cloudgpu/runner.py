"""``cloudgpu run NOTEBOOK``: execute a notebook headless on the hardware it records.

A notebook that records ``metadata.cloudgpu.hardware`` (or is given ``--hardware``, or
was saved with a Cloud GPU kernel) runs in the Cloud GPU kernel on that hardware, started
here without any kernelspec installed; any other notebook runs in its own kernel, where
``%%remote`` cells work as they do interactively. Either way the cells run on the
configured pool, or on this user's local pool. The outputs and ``metadata.cloudgpu``
(``ran_on``, what the remote agent says it ran on) are written back into the notebook.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._progress import CellProgress
from .errors import CloudGPUError, HardwareUnavailableError, UnknownHardwareError
from .hardware import HardwareSpec
from .notebook import (
    NotebookRecord,
    availability,
    kernelspec_hardware,
    now,
    read_record,
    write_record,
)

__all__ = ["RunResult", "main", "run_notebook"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
RUN_KERNEL = "cloudgpu-run"
#: Asked of the remote kernel (the Cloud GPU kernel relays it there): its agent's record.
_RAN_ON_REMOTE = "__import__('json').dumps(get_ipython().cloudgpu_agent.ran_on())"
#: Asked of a notebook's own kernel: what its %%remote sessions ran on, by spec.
_RAN_ON_MAGIC = ("__import__('json').dumps(get_ipython().magics_manager.registry"
                 "['RemoteMagics'].ran_on_report())")


@dataclass
class RunResult:
    """How a run went.

    Attributes:
        nb: the executed notebook, outputs and ``metadata.cloudgpu`` included.
        record: its ``metadata.cloudgpu`` after the run.
        failed: the index of the cell that failed, or None.
        error: that cell's error, as text.
    """

    nb: Any
    record: NotebookRecord
    failed: int | None = None
    error: str = ""


def _describe(output: dict[str, Any]) -> str:
    kind = output["output_type"]
    if kind == "stream":
        # A terminal cannot rewrite a line under our prefix: keep what `\r` left standing.
        return "\n".join(line.rsplit("\r", 1)[-1] for line in
                         str(output["text"]).rstrip("\n").split("\n"))
    if kind == "error":
        return _ANSI.sub("", "\n".join(output["traceback"]))
    data = output.get("data", {})
    text = str(data["text/plain"]) if "text/plain" in data else ""
    binary = [f"[{mime}, {len(str(v)) * 3 // 4 // 1024} KiB]" for mime, v in data.items()
              if mime.startswith("image/")]
    return "\n".join(filter(None, [text, *binary]))


def resolve_hardware(nb: Any, record: NotebookRecord, override: str | None) -> str | None:
    """The hardware a run uses: ``--hardware``, else ``metadata.cloudgpu.hardware``, else the
    Cloud GPU kernelspec the notebook was saved with; None: the notebook's own kernel."""
    return override or record.hardware or kernelspec_hardware(nb)


async def check_hardware(text: str) -> tuple[HardwareSpec, float, str]:
    """Parse ``text`` with the pool's catalog and make sure the pool can serve it now.

    Returns:
        The spec, its price per hour, and what the pool has free of it.

    Raises:
        UnknownHardwareError: no such hardware.
        HardwareUnavailableError: the pool has none of it.
    """
    from .client import get_client
    from .hardware import parse_spec

    client = get_client()
    spec = parse_spec(text, await client.catalog())
    served, price, note = availability(spec, await client.hardware())
    where = (await client.get_provider()).description
    if served is None:
        raise HardwareUnavailableError(
            f"Cannot run on {spec.display}: {note} ({where}). Nothing ran. Run it on what "
            f"the pool has with `--hardware SPEC` (`cloudgpu inspect` shows the options), or, "
            f"on the local pool, simulate it: CLOUDGPU_SIMULATE={_simulatable(spec)} and "
            f"`cloudgpu pool stop`, so that the next run starts the pool again with it.")
    return spec, price, note


def _simulatable(spec: HardwareSpec) -> str:
    """A ``CLOUDGPU_SIMULATE`` inventory that has ``spec``'s first GPU choice."""
    choice = next((c for c in spec.choices if not c.is_cpu and not c.is_any), None)
    return str(choice) if choice is not None else "H100:1"


def _kernel_manager(spec: HardwareSpec, environment: list[str], config: Any) -> Any:
    """A kernel manager for the Cloud GPU kernel on ``spec``, no kernelspec installed."""
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
    from jupyter_client.manager import AsyncKernelManager

    from .kernel.kernelspec import kernel_json

    class OneKernel(KernelSpecManager):
        def find_kernel_specs(self) -> dict[str, str]:
            return {RUN_KERNEL: ""}

        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
            if kernel_name != RUN_KERNEL:
                raise NoSuchKernel(kernel_name)
            return KernelSpec(**kernel_json(spec, environment))

    return AsyncKernelManager(kernel_name=RUN_KERNEL, kernel_spec_manager=OneKernel(),
                              config=config)


def run_notebook(path: str, *, output: str | None = None, hardware: str | None = None,
                 timeout: int = 600, stream: bool = False, progress: bool = True,
                 kernel_name: str | None = None) -> RunResult:
    """Execute the notebook at ``path`` and write it, run, to ``output`` (default: in place).

    Args:
        path: the ``.ipynb``.
        output: where the executed notebook goes; ``path`` itself by default.
        hardware: run on this hardware, whatever the notebook records.
        timeout: seconds each cell may run.
        stream: print each cell and its output live (to stdout).
        progress: draw the progress bar over cells (to stderr).
        kernel_name: the local kernel for notebooks that record no hardware.

    Raises:
        NotebookMetadataError: ``metadata.cloudgpu`` is malformed.
        UnknownHardwareError: the hardware is not one the pool knows.
        HardwareUnavailableError: the pool has none of it; nothing ran.
    """
    import nbformat
    from traitlets.config import Config

    from ._loop import run_sync

    nb = nbformat.read(path, as_version=4)
    record = read_record(nb)
    wanted = resolve_hardware(nb, record, hardware)
    config = Config()
    config.KernelManager.transport = "ipc"  # local only, and no plain-TCP warning from the kernel
    # Absolute socket paths: the kernel runs in the notebook's folder, not ours. Short ones:
    # a Unix socket path may not exceed 107 bytes.
    sockets = tempfile.TemporaryDirectory(prefix="cgr-")
    config.KernelManager.ip = os.path.join(sockets.name, "kernel")
    km = None
    if wanted:
        spec, _, _ = run_sync(check_hardware(wanted))
        record.hardware = wanted
        km = _kernel_manager(spec, record.environment, config)
    elif record.environment and progress:
        print("cloudgpu run: metadata.cloudgpu.environment applies to the Cloud GPU kernel, and "
              "this notebook records no hardware; its %%remote cells take `--env` instead.",
              file=sys.stderr)
    cells = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    bar = CellProgress(len(cells), enabled=progress)
    client = _client_class()(nb, km=km, kernel_name=kernel_name or "", timeout=timeout,
                             config=config, bar=bar, stream=stream,
                             resources={"metadata": {"path": str(Path(path).parent)}})
    client.owns_km = True  # shut the kernel down at the end, also one we made here
    result = RunResult(nb, record)
    try:
        ran_on = asyncio.run(_execute(client, result, _RAN_ON_REMOTE if wanted else _RAN_ON_MAGIC))
    finally:
        bar.clear()
        sockets.cleanup()
    if wanted and ran_on:
        gpus = ran_on.get("gpus", {})
        granted = f"{gpus.get('type')}:{gpus['count']}" if gpus.get("count") else "cpu"
        record.ran_on = {"hardware": granted, **ran_on, "environment": record.environment}
    elif ran_on:
        record.ran_on = {"at": now(), "remote_cells": ran_on}
    if wanted or ran_on or nb.metadata.get("cloudgpu"):
        write_record(nb, record)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, output or path)
    if result.failed is None:
        bar.end(f"cloudgpu run: {path} ran to the end, {len(cells)} cells")
    return result


async def _execute(client: Any, result: RunResult, ran_on_expression: str) -> dict[str, Any]:
    """Run every cell (the first failure stops the run), then ask what it ran on."""
    from jupyter_core.utils import ensure_async
    from nbclient.exceptions import CellExecutionError

    ran_on: dict[str, Any] = {}
    async with client.async_setup_kernel():
        info = await client.async_wait_for_reply(await ensure_async(client.kc.kernel_info()))
        if info is not None and "language_info" in info["content"]:
            client.nb.metadata["language_info"] = info["content"]["language_info"]
        try:
            for index, cell in enumerate(client.nb.cells):
                await client.async_execute_cell(
                    cell, index, execution_count=client.code_cells_executed + 1)
        except CellExecutionError as e:
            result.failed, result.error = index, _ANSI.sub("", str(e))
        ran_on = await _ask_ran_on(client, ran_on_expression)
    client.set_widgets_metadata()
    return ran_on


async def _ask_ran_on(client: Any, expression: str) -> dict[str, Any]:
    """Evaluate ``expression`` (JSON text) in the kernel, silently; {} when it has no answer
    (a notebook of plain cells, whose kernel never loaded cloudgpu)."""
    from jupyter_core.utils import ensure_async

    msg_id = await ensure_async(client.kc.execute("", silent=True, store_history=False,
                                                  user_expressions={"ran_on": expression}))
    reply = await client.async_wait_for_reply(msg_id)
    found = (reply or {}).get("content", {}).get("user_expressions", {}).get("ran_on", {})
    if found.get("status") != "ok":
        return {}
    return dict(json.loads(ast.literal_eval(found["data"]["text/plain"])))


def _client_class() -> type:
    """nbclient's client, drawing the progress bar and, with ``stream``, the live output."""
    from nbclient import NotebookClient

    class RunClient(NotebookClient):
        def __init__(self, nb: Any, *, bar: CellProgress, stream: bool, **kw: Any) -> None:
            super().__init__(nb, **kw)
            self.bar, self.stream = bar, stream
            self.number = 0

        async def async_execute_cell(self, cell: Any, cell_index: int,
                                     execution_count: int | None = None,
                                     store_history: bool = True) -> Any:
            if cell.cell_type != "code" or not cell.source.strip():
                return await super().async_execute_cell(cell, cell_index, execution_count,
                                                        store_history)
            self.number += 1
            self.bar.start(self.number, cell.source)
            if self.stream:
                self.bar.clear()
                print(f"\n── cell {self.number}/{self.bar.total} " + "─" * 40)
                print(cell.source)
                sys.stdout.flush()
            try:
                return await super().async_execute_cell(cell, cell_index, execution_count,
                                                        store_history)
            finally:
                self.bar.finish()

        def output(self, outs: Any, msg: Any, display_id: Any, cell_index: int) -> Any:
            out = super().output(outs, msg, display_id, cell_index)
            if out is not None and out["output_type"] == "stream" and len(outs) > 1 and \
                    outs[-1] is out and outs[-2]["output_type"] == "stream" and \
                    outs[-2]["name"] == out["name"]:
                # One print can arrive in several stream messages (the kernel flushes on
                # a timer): the saved notebook holds one run of text, as a frontend shows.
                outs[-2]["text"] += out["text"]
                outs.pop()
            if self.stream and out is not None:
                self.bar.clear()
                if out["output_type"] == "stream":
                    sys.stdout.write(str(out["text"]))
                else:
                    text = _describe(out)
                    if text:
                        print(text)
                sys.stdout.flush()
            return out

    return RunClient


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``cloudgpu run``."""
    parser = argparse.ArgumentParser(
        prog="cloudgpu run",
        description="Execute a notebook headless (nbclient) on the hardware it records "
        "(metadata.cloudgpu.hardware, or its Cloud GPU kernel), on the configured pool or "
        "this user's local pool (started on first use). A notebook that records no hardware "
        "runs in its own kernel, where %%remote cells work as usual. Writes the outputs and "
        "metadata.cloudgpu.ran_on (what it ran on) back, and exits 1 on a failing cell, "
        "showing it.",
    )
    parser.add_argument("notebook", help="path of the .ipynb to run")
    parser.add_argument("--output", "-o", metavar="OUT",
                        help="write the executed notebook here (default: in place)")
    parser.add_argument("--hardware", "-g", metavar="SPEC",
                        help="run on this hardware (H100, A100-80GB:2, cpu), in the Cloud GPU "
                             "kernel, whatever the notebook records; recorded in OUT")
    parser.add_argument("--timeout", type=int, default=600, metavar="S",
                        help="seconds each cell may run (default 600)")
    parser.add_argument("--stream", action="store_true",
                        help="print each cell and its output live, as it runs")
    parser.add_argument("--kernel", help="the local kernel for a notebook that records no "
                                         "hardware (default: the notebook's own)")
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    args = parser.parse_args(argv)
    if not Path(args.notebook).is_file():
        parser.error(f"no notebook at {args.notebook}")
    try:
        result = run_notebook(args.notebook, output=args.output, hardware=args.hardware,
                              timeout=args.timeout, stream=args.stream, progress=not args.quiet,
                              kernel_name=args.kernel)
    except UnknownHardwareError as e:
        print(f"cloudgpu run: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except CloudGPUError as e:
        print(f"cloudgpu run: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    if result.failed is not None:
        print(f"\ncloudgpu run: cell {result.failed + 1} of {args.notebook} failed; the notebook "
              f"with its outputs is in {args.output or args.notebook}.\n{result.error}",
              file=sys.stderr)
        raise SystemExit(1)
