"""Client configuration: which pool to use. Zero configuration means the local pool.

Set in ``cloudgpu_config.py`` (or ``.json``) in a Jupyter config folder
(``jupyter --paths``)::

    c.ClientConfig.pool_url = "https://gpus.example.com"
    c.ClientConfig.token = "..."

or with the environment variables ``CLOUDGPU_POOL`` and ``CLOUDGPU_TOKEN``, which win
(``CLOUDGPU_WARM_HOLD``, ``CLOUDGPU_VERIFY_UNCHANGED``, ``CLOUDGPU_SIDE_CHANNEL`` and
``CLOUDGPU_CA_FILE`` likewise).
"""

from __future__ import annotations

import os

from jupyter_core.paths import jupyter_config_path
from traitlets import Bool, Float, Unicode
from traitlets.config import Configurable
from traitlets.config.loader import (
    Config,
    ConfigFileNotFound,
    JSONFileConfigLoader,
    PyFileConfigLoader,
)

from .errors import InvalidRequestError

__all__ = ["ClientConfig", "load_client_config"]


class ClientConfig(Configurable):
    """Where notebooks get their hardware from."""

    pool_url = Unicode(
        "", help="The pool to use (env CLOUDGPU_POOL). Empty: the per-user local pool, "
        "started on first use."
    ).tag(config=True)
    token = Unicode("", help="Your token for that pool (env CLOUDGPU_TOKEN).").tag(config=True)
    reconnect_timeout = Float(
        120.0, help="Seconds to keep reconnecting to a host after the connection dropped, "
        "before the running cell fails (the host replays what was missed). While the remote "
        "kernel runs a cell, a pool's session is waited for as long as the pool keeps it."
    ).tag(config=True)
    verify_unchanged = Bool(
        False, help="Fingerprint every big input on both sides before each cell. By default "
        "a fingerprint is trusted until code ran that could change the value (cells, widget "
        "callbacks); a thread of your own writing an input between cells is not seen "
        "(env CLOUDGPU_VERIFY_UNCHANGED=1)."
    ).tag(config=True)
    warm_hold = Float(
        120.0, help="Seconds `%load_ext cloudgpu` holds the pool's warm cpu kernel, connected, "
        "for the first `%%remote gpu=cpu` cell to take, so that it costs one round trip (env "
        "CLOUDGPU_WARM_HOLD). Nothing is billed while it is held: billing starts when a cell "
        "takes it. It is given back unused after this long, or as soon as the first session "
        "asks for other hardware or an environment. 0: hold nothing."
    ).tag(config=True)
    side_channel = Bool(
        True, help="Move big values (frames of 1 MiB and more) on a connection of their own "
        "to the remote kernel's agent, authenticated like the kernel websocket, instead of "
        "through it: no websocket masking, no relay through the host's Python. Falls back "
        "to the websocket by itself when the host refuses it or does not have it. "
        "Env CLOUDGPU_SIDE_CHANNEL=0 turns it off."
    ).tag(config=True)
    ca_file = Unicode(
        "", help="A CA certificate (PEM) to trust beside the system's, for hosts and pools "
        "with a private or self-signed certificate (env CLOUDGPU_CA_FILE)."
    ).tag(config=True)


def load_client_config() -> ClientConfig:
    """Read ``cloudgpu_config.{json,py}`` from Jupyter's config path, then the environment."""
    config = Config()
    for folder in reversed(jupyter_config_path()):  # later (user) folders win
        for loader_cls, name in ((JSONFileConfigLoader, "cloudgpu_config.json"),
                                 (PyFileConfigLoader, "cloudgpu_config.py")):
            try:
                config.merge(loader_cls(name, path=folder).load_config())
            except ConfigFileNotFound:
                continue
    settings = ClientConfig(config=config)
    settings.pool_url = os.environ.get("CLOUDGPU_POOL", settings.pool_url)
    settings.token = os.environ.get("CLOUDGPU_TOKEN", settings.token)
    settings.ca_file = os.environ.get("CLOUDGPU_CA_FILE", settings.ca_file)
    verify = os.environ.get("CLOUDGPU_VERIFY_UNCHANGED", "")
    if verify:
        settings.verify_unchanged = verify.lower() not in ("0", "false", "no", "off")
    hold = os.environ.get("CLOUDGPU_WARM_HOLD", "")
    if hold:
        try:
            settings.warm_hold = float(hold)
        except ValueError:
            raise InvalidRequestError(f"CLOUDGPU_WARM_HOLD must be seconds (120, or 0 for "
                                      f"none), not {hold!r}.") from None
    if "CLOUDGPU_SIDE_CHANNEL" in os.environ:
        settings.side_channel = os.environ["CLOUDGPU_SIDE_CHANNEL"].strip().lower() not in (
            "0", "false", "no", "off", "")
    return settings
