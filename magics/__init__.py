"""IPython magics: ``%%remote`` runs a cell on remote hardware, ``%remote`` manages sessions."""

from __future__ import annotations

from typing import Any

from .remote import RemoteMagics

__all__ = ["RemoteMagics", "load_ipython_extension"]


def load_ipython_extension(ipython: Any) -> None:
    """Register the magics and the renderer for remote tracebacks."""
    from .remote import install_error_display  # noqa: PLC0415

    from cloudgpu._http import prewarm  # noqa: PLC0415

    prewarm()  # the first %%remote cell should not wait for TLS setup
    ipython.register_magics(RemoteMagics)
    install_error_display(ipython)
