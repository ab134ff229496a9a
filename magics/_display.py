"""Showing cloudgpu errors under a cell: a remote exception as its remote traceback.

Outputs, status lines and progress are shown by ``cloudgpu._output``, the one renderer
the magics and the Python API share.
"""

from __future__ import annotations

import sys
from typing import Any

from cloudgpu.errors import RemoteExecutionError

__all__ = ["render_error"]


def render_error(shell: Any, etype: type, value: BaseException, tb: Any,
                 tb_offset: int | None = None) -> list[str]:
    """Show a remote exception as its remote traceback, any other cloudgpu error as one line.

    Installed with ``shell.set_custom_exc`` so that cloudgpu's own frames never show.
    """
    if isinstance(value, RemoteExecutionError):
        where = value.host or "the remote host"
        header = f"\x1b[1mRemote traceback\x1b[0m (on {where}):"
        stb = [header, *value.traceback] if value.traceback else \
            [header, f"{value.ename}: {value.evalue}"]
    else:
        stb = [f"\x1b[31m{etype.__name__}\x1b[0m: {value}"]
    showtraceback = getattr(shell, "_showtraceback", None)
    if showtraceback is not None:
        showtraceback(etype, value, stb)
    else:  # plain IPython
        print("\n".join(stb), file=sys.stderr)
    return stb
