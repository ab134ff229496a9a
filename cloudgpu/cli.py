"""The ``cloudgpu`` command: one entry point, a subcommand per job."""

from __future__ import annotations

import sys

__all__ = ["main"]

_USAGE = """\
usage: cloudgpu <command> [options]

Run notebook code on remote GPUs.

commands:
  host      run a cloudgpu host: Jupyter kernels with GPUs, for clients elsewhere
  pool      run a cloudgpu pool: hands out hosts' GPUs, meters cost, keeps the ledger
            (`cloudgpu pool stop` stops your local pool, e.g. to change CLOUDGPU_SIMULATE)
  kernel    install, list and remove the Cloud GPU kernels (whole notebooks remotely)
  run       execute a notebook headless on the hardware it records; writes what it ran on
  inspect   what a notebook needs, whether the pool can serve it now, how its last run differs
  version   print the cloudgpu version

`cloudgpu <command> --help` shows a command's options. In a notebook:
`%load_ext cloudgpu`, then `%%remote gpu=H100` above a cell.
"""


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``cloudgpu <command> ...``."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(_USAGE, end="")
        return
    command, rest = args[0], args[1:]
    if command == "host":
        from .remote_host.host.app import HostApp

        HostApp.launch_instance(rest)
    elif command == "pool" and rest[:1] == ["stop"]:
        from ._localpool import stop_local_pool

        pid = stop_local_pool()
        print(f"Stopped your local pool (pid {pid}), its sessions and its host."
              if pid else "No local pool is running.")
    elif command == "pool":
        from .remote_host.pool.app import PoolApp

        PoolApp.launch_instance(rest)
    elif command == "kernel":
        from .kernel.cli import main as kernel_main

        kernel_main(rest)
    elif command == "run":
        from .runner import main as run_main

        run_main(rest)
    elif command == "inspect":
        from .inspection import main as inspect_main

        inspect_main(rest)
    elif command in ("version", "--version"):
        from . import __version__

        print(__version__)
    else:
        print(f"cloudgpu: unknown command `{command}`.\n", file=sys.stderr)
        print(_USAGE, end="", file=sys.stderr)
        raise SystemExit(2)
