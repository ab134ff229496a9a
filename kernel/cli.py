"""``cloudgpu kernel install|list|remove``: manage the Cloud GPU kernelspecs."""

from __future__ import annotations

import argparse
import sys

from cloudgpu.errors import UnknownHardwareError

from .kernelspec import DEFAULT_HARDWARE, install_kernelspecs, list_kernelspecs, remove_kernelspecs

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloudgpu kernel",
        description="Install, list and remove the Cloud GPU kernels: whole notebook sessions on "
                    "remote hardware, one kernel per hardware choice.",
    )
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)

    install = commands.add_parser(
        "install", help="install a kernel per hardware choice",
        description=f"Install one Cloud GPU kernel per --hardware, plus "
                    f"{', '.join(DEFAULT_HARDWARE)}. Reinstalling replaces.",
    )
    install.add_argument("--hardware", "-g", action="append", default=[], metavar="SPEC",
                         help="hardware for one kernel: H100, A100-80GB:2, H100|A100-80GB, cpu "
                              "(repeat for more)")
    where = install.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true",
                       help="install for this user (the default)")
    where.add_argument("--sys-prefix", action="store_true",
                       help=f"install into this Python's prefix ({sys.prefix})")
    where.add_argument("--prefix", metavar="P", help="install under P/share/jupyter/kernels")

    commands.add_parser("list", help="list the installed Cloud GPU kernels",
                        description="List the installed Cloud GPU kernels.")

    remove = commands.add_parser("remove", help="remove Cloud GPU kernels",
                                 description="Remove Cloud GPU kernels by name or hardware.")
    remove.add_argument("names", nargs="*", metavar="NAME", help="kernel names (cloudgpu-h100)")
    remove.add_argument("--hardware", "-g", action="append", default=[], metavar="SPEC",
                        help="remove the kernel for this hardware (repeatable)")
    remove.add_argument("--all", action="store_true", help="remove every Cloud GPU kernel")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run ``cloudgpu kernel ...``; a user's mistake exits 2 with a one-line reason."""
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "install":
            prefix = sys.prefix if args.sys_prefix else args.prefix
            for k in install_kernelspecs(args.hardware, user=prefix is None, prefix=prefix):
                print(f"Installed {k.display_name!r} as {k.name} in {k.path}")
        elif args.command == "list":
            kernels = list_kernelspecs()
            if not kernels:
                print("No Cloud GPU kernels installed. `cloudgpu kernel install --hardware H100` "
                      "installs one.")
            for k in kernels:
                print(f"{k.name:<28} {k.display_name:<30} {k.hardware:<16} {k.path}")
        else:
            if not (args.names or args.hardware or args.all):
                parser.error("say which kernels to remove: NAME, --hardware SPEC or --all")
            for k in remove_kernelspecs(args.names, args.hardware, remove_all=args.all):
                print(f"Removed {k.name} ({k.display_name}) from {k.path}")
    except (UnknownHardwareError, LookupError) as e:
        print(f"cloudgpu kernel: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except PermissionError as e:
        print(f"cloudgpu kernel: {e}. Use --user or --sys-prefix to install where you can write.",
              file=sys.stderr)
        raise SystemExit(1) from None
