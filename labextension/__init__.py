"""The JupyterLab extension: a hardware picker, a cost and GPU status bar item, a sessions panel.

The server side (this package) serves ``<base_url>/cloudgpu/api/`` (see ``handlers``) and
is enabled on install through ``jupyter-config/``; the frontend is built from
``labextension/src/`` into ``labextension/static/``, which the wheel ships as the prebuilt
extension ``cloudgpu``.
"""

from __future__ import annotations

import typing

from .handlers import API_PREFIX, PoolLink, setup_handlers
from .views import session_view, status_view

__all__ = ["API_PREFIX", "PoolLink", "session_view", "setup_handlers", "status_view"]

_LINK = "cloudgpu_pool"


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """Where the built frontend is (for ``jupyter labextension develop``)."""
    return [{"src": "static", "dest": "cloudgpu"}]


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    """This module is the server extension."""
    return [{"module": "cloudgpu.labextension"}]


def _load_jupyter_server_extension(serverapp: typing.Any) -> None:
    """Add the REST API and start looking for the pool, so the first poll finds it ready."""
    link = PoolLink()
    setup_handlers(serverapp.web_app, link)
    link.prepare()
    serverapp.log.info("cloudgpu: the JupyterLab API is at %s%s/", serverapp.base_url, API_PREFIX)


async def _unload_jupyter_server_extension(serverapp: typing.Any) -> None:
    """Close the pool client (the server's sessions are the kernels', not ours)."""
    link = serverapp.web_app.settings.get(_LINK)
    if isinstance(link, PoolLink):
        await link.aclose()
