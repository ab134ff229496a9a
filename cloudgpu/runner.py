"""``cloudgpu run NOTEBOOK``: execute a notebook headless and print what each cell shows."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

__all__ = ["main", "run_notebook"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _describe(output: dict[str, Any]) -> str:
    kind = output["output_type"]
    if kind == "stream":
        # A terminal cannot rewrite a line under our prefix: keep what `\r` left standing.
        return "\n".join(line.rsplit("\r", 1)[-1] for line in
                         str(output["text"]).rstrip("\n").split("\n"))
    if kind == "error":
        return _ANSI.sub("", "\n".join(output["traceback"]))
    data = output.get("data", {})
    if "text/plain" in data:
        text = str(data["text/plain"])
    else:
        text = ""
    binary = [f"[{mime}, {len(str(v)) * 3 // 4 // 1024} KiB]" for mime, v in data.items()
              if mime.startswith("image/")]
    return "\n".join(filter(None, [text, *binary]))


def _merge_streams(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join consecutive stream outputs of one stream, as a notebook frontend shows them."""
    merged: list[dict[str, Any]] = []
    for out in outputs:
        last = merged[-1] if merged else None
        if last is not None and out["output_type"] == last["output_type"] == "stream" \
                and out["name"] == last["name"]:
            merged[-1] = dict(last, text=last["text"] + out["text"])
        else:
            merged.append(out)
    return merged


def run_notebook(path: str, *, timeout: int = 600, output: str | None = None,
                 kernel_name: str | None = None, echo: bool = True) -> Any:
    """Execute the notebook at ``path``, printing each cell's source and outputs as it goes.

    Returns the executed notebook. Raises ``nbclient.exceptions.CellExecutionError`` when a
    cell fails (after printing its error).
    """
    import nbformat
    from nbclient import NotebookClient
    from traitlets.config import Config

    nb = nbformat.read(path, as_version=4)
    config = Config()
    config.KernelManager.transport = "ipc"  # local only, and no plain-TCP warning from the kernel
    client = NotebookClient(nb, kernel_name=kernel_name or "", timeout=timeout, config=config,
                            resources={"metadata": {"path": "."}})
    if echo:
        _orig = client.async_execute_cell

        async def execute_cell(cell: Any, index: int, **kw: Any) -> Any:
            try:
                return await _orig(cell, index, **kw)
            finally:
                if cell.cell_type == "code":
                    print(f"\n── In [{index}] " + "─" * 50)
                    print(cell.source)
                    for out in _merge_streams(cell.get("outputs", [])):
                        text = _describe(out)
                        if text:
                            print("  │ " + text.replace("\n", "\n  │ "))
                    sys.stdout.flush()

        client.async_execute_cell = execute_cell  # type: ignore[method-assign,assignment]
    try:
        client.execute()
    finally:
        if output:
            nbformat.write(nb, output)
    return nb


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``cloudgpu run``."""
    parser = argparse.ArgumentParser(
        prog="cloudgpu run",
        description="Execute a notebook headless (nbclient) and print each cell's outputs. "
        "%%remote cells run on the configured pool; with nothing configured, on this user's "
        "local pool (started on first use).",
    )
    parser.add_argument("notebook", help="path of the .ipynb to run")
    parser.add_argument("--output", "-o", help="also save the executed notebook here")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    parser.add_argument("--kernel", help="kernel name (default: the notebook's own)")
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    args = parser.parse_args(argv)
    from nbclient.exceptions import CellExecutionError

    try:
        run_notebook(args.notebook, timeout=args.timeout, output=args.output,
                     kernel_name=args.kernel, echo=not args.quiet)
    except CellExecutionError as e:
        print(f"\ncloudgpu run: a cell failed in {args.notebook}:\n{_ANSI.sub('', str(e))}",
              file=sys.stderr)
        raise SystemExit(1) from None
    except FileNotFoundError as e:
        parser.error(str(e))
    print(f"\ncloudgpu run: {args.notebook} ran to the end.")
