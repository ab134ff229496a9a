"""IPython magics: ``%%remote`` runs a cell on remote hardware, ``%remote`` manages sessions."""

from __future__ import annotations

import typing

if typing.TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

from .remote import RemoteMagics

__all__ = ["RemoteMagics", "load_ipython_extension"]


def load_ipython_extension(ipython: InteractiveShell) -> None:
    """Register the magics and the renderer for remote tracebacks."""
    from cloudgpu._http import prewarm
    from cloudgpu.client import get_client

    from .remote import install_error_display

    # The first %%remote cell should not wait for TLS setup, for finding the pool, or (with
    # the pool's warm cpu kernel held and connected, unbilled) for the websocket upgrade.
    prewarm()
    get_client().prepare(hold=True)
    ipython.register_magics(RemoteMagics)
    install_error_display(ipython)
