"""Starting the proxy kernel process: arguments, logging, signals, the loop it runs on."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from cloudgpu import _loop
from cloudgpu.environment import check_requirements
from cloudgpu.errors import InvalidRequestError, UnknownHardwareError
from cloudgpu.hardware import HardwareSpec, parse_spec

from .proxy import ProxyKernel

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """Serve one connection file until the frontend shuts the kernel down."""
    parser = argparse.ArgumentParser(
        prog="python -m cloudgpu.kernel",
        description="The Cloud GPU kernel: a Jupyter kernel whose cells run on remote hardware. "
                    "Jupyter starts it from a kernelspec (`cloudgpu kernel install`).",
    )
    parser.add_argument("-f", dest="connection_file", required=True,
                        help="the connection file Jupyter wrote for this kernel")
    parser.add_argument("--hardware", default="cpu", help="hardware spec: H100, A100-80GB:2, cpu")
    parser.add_argument("--requirement", "-r", action="append", default=[], metavar="REQ",
                        help="a pip requirement the remote kernel needs (repeat for more): the "
                             "host runs it in an environment with them, made once and cached")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="[cloudgpu kernel %(levelname)s] %(message)s")
    try:
        spec = parse_spec(args.hardware)
        environment = check_requirements(args.requirement, "--requirement")
    except (UnknownHardwareError, InvalidRequestError) as e:
        parser.error(str(e))
    info = json.loads(Path(args.connection_file).read_text())
    # The proxy runs on the process's cloudgpu loop, where the client and its provider live.
    loop = _loop.get_loop()
    kernel = _loop.run_sync(_create(info, spec, environment))

    def on_signal(signum: int, _frame: object) -> None:
        if signum == signal.SIGINT:
            _loop.submit(kernel.interrupt())
        else:
            loop.call_soon_threadsafe(kernel.stop)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    _loop.run_sync(kernel.run())


async def _create(info: dict[str, Any], spec: HardwareSpec,
                  environment: list[str]) -> ProxyKernel:
    return ProxyKernel(info, spec, environment=environment)
