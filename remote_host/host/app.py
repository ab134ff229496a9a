"""``cloudgpu host``: a Jupyter Server running kernels on this machine's GPUs for remote clients."""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

from jupyter_server.auth.identity import IdentityProvider
from jupyter_server.serverapp import ServerApp
from jupyter_server.services.kernels.handlers import MainKernelHandler
from jupyter_server.utils import url_path_join
from tornado.ioloop import PeriodicCallback
from traitlets import Integer, Unicode, default
from traitlets.config import Config

from cloudgpu import __version__
from cloudgpu._process import write_private_json
from cloudgpu.errors import IsolationUnavailableError, UnisolatedHostError
from cloudgpu.hardware import Catalog

from .auth import HostIdentityProvider
from .environments import Environments
from .handlers import HOST_HANDLERS, CheckedMainKernelHandler
from .inventory import Inventory
from .kernels import AgentKernelSpecManager, GPUKernelManager
from .sandbox import BubblewrapSandbox, DockerSandbox, NoSandbox, PodmanSandbox, Sandbox
from .sandbox import load_sandbox as _load_sandbox
from .side import HANDLERS as SIDE_HANDLERS
from .websocket import HostWebsocketConnection

__all__ = ["HostApp"]

_HOST_CONFIG_DEFAULTS = {
    # Our client coalesces output itself; Jupyter's iopub rate limit would drop a flood.
    "ZMQChannelsWebsocketConnection": {"limit_rate": False},
    # Kernels talk to the host over Unix sockets: nothing listens on TCP but the host itself.
    "KernelManager": {"transport": "ipc"},
    # Live remote kernels should not be culled by Jupyter; the pool culls sessions.
    "ServerApp": {"open_browser": False},
    # A kernel that dies is not restarted: its state is gone anyway, its GPUs must be
    # freed and its session ended (see GPUKernelManager._handle_kernel_died). Noticed
    # within a second.
    "KernelRestarter": {"restart_limit": 0, "time_to_dead": 1.0},
}


class HostApp(ServerApp):
    """A cloudgpu host: the Jupyter kernel REST and websocket API, plus GPUs per kernel.

    Every request needs the host token. Kernels load the cloudgpu agent, which moves
    variables to and from the notebook that drives them.
    """

    name = "cloudgpu-host"
    version = __version__
    description = (
        "Run a cloudgpu host: Jupyter kernels with the cloudgpu agent, one GPU set per kernel.\n\n"
        "Listens on 127.0.0.1 unless --ip says otherwise. Every HTTP and websocket request "
        "must carry the token (`Authorization: token T`); without --token (or "
        "CLOUDGPU_HOST_TOKEN) one is generated and printed once."
    )
    examples = (
        "cloudgpu host --port 8899 --token \"$(openssl rand -hex 24)\"\n"
        "cloudgpu host --ip 10.0.0.5 --isolation bubblewrap   # shared: each kernel sandboxed\n"
        "cloudgpu host --simulate H100:2,A100-80GB:4   # no GPUs here: pretend, clearly labelled"
    )
    config_file_name = Unicode("cloudgpu_host_config", config=True)

    aliases = {
        "ip": "ServerApp.ip",
        "port": "ServerApp.port",
        "token": "IdentityProvider.token",
        "simulate": "HostApp.simulate",
        "devices": "HostApp.devices",
        "isolation": "HostApp.isolation",
        "info-file": "HostApp.info_file",
        "parent-pid": "HostApp.parent_pid",
        "certfile": "ServerApp.certfile",
        "keyfile": "ServerApp.keyfile",
        "log-level": "Application.log_level",
        "config": "ServerApp.config_file",
        "environments-dir": "Environments.cache_dir",
    }
    flags: dict[str, Any] = {}
    subcommands: dict[str, Any] = {}
    classes = [*ServerApp.classes, IdentityProvider, HostIdentityProvider, AgentKernelSpecManager,
               GPUKernelManager, Environments, Sandbox, NoSandbox, BubblewrapSandbox,
               PodmanSandbox, DockerSandbox]

    default_services = ("api", "kernels", "kernelspecs", "shutdown")  # type: ignore[assignment]

    simulate = Unicode(
        "",
        help="Pretend this host has these GPUs, e.g. `H100:2,A100-80GB:4`. Every inventory "
        "field says `simulated: true`. Default: $CLOUDGPU_SIMULATE, else the real GPUs via NVML.",
    ).tag(config=True)
    devices = Unicode(
        "all",
        help="The GPUs that are this host's, as CUDA_VISIBLE_DEVICES names them: indices or "
        "UUIDs (`1,3`), `none` for CPU only, or `all` (every GPU NVML or --simulate lists). "
        "A host sharing its machine gets only what it was given (a Ray session's host: the "
        "GPUs Ray assigned).",
    ).tag(config=True)
    isolation = Unicode(
        "",
        help="How each kernel is sandboxed from the others and from the host (a "
        "`cloudgpu.isolation` entry point): bubblewrap, podman, docker, or none. Default: "
        "none on a host that listens on loopback only; a host that listens beyond it refuses "
        "to start until this is given (none included, to run kernels unisolated on purpose).",
    ).tag(config=True)
    info_file = Unicode(
        "",
        help="Write the host's URL and pid here as JSON once it listens (for a parent process).",
    ).tag(config=True)
    parent_pid = Integer(
        0, help="Stop when this process is gone (used by the embedded local default)."
    ).tag(config=True)

    @default("simulate")
    def _default_simulate(self) -> str:
        return os.environ.get("CLOUDGPU_SIMULATE", "")

    @default("ip")
    def _default_ip(self) -> str:
        return "127.0.0.1"

    @default("allow_root")
    def _default_allow_root(self) -> bool:
        # Jupyter refuses root to protect a browser session; hosts run in containers as root.
        return True

    @default("kernel_manager_class")
    def _default_kernel_manager_class(self) -> type:
        return GPUKernelManager

    @default("kernel_spec_manager_class")
    def _default_kernel_spec_manager_class(self) -> type:
        return AgentKernelSpecManager

    @default("kernel_websocket_connection_class")
    def _default_kernel_websocket_connection_class(self) -> type:
        return HostWebsocketConnection

    @default("identity_provider_class")
    def _default_identity_provider_class(self) -> type:
        return HostIdentityProvider

    def initialize(self, argv: list[str] | None = None, **kwargs: Any) -> None:  # type: ignore[override]
        """Apply host defaults under the user's config, then start Jupyter Server's setup."""
        self.update_config(Config(_HOST_CONFIG_DEFAULTS))
        token = os.environ.pop("CLOUDGPU_HOST_TOKEN", "")
        if token:
            self.update_config(Config({"IdentityProvider": {"token": token}}))
        try:
            super().initialize(argv, **kwargs)
        except (IsolationUnavailableError, UnisolatedHostError) as e:
            self.log.critical("%s", e)
            self.exit(1)

    def init_configurables(self) -> None:
        """Create the inventory and hand it to the kernel manager."""
        super().init_configurables()
        catalog = Catalog.default()
        km = cast(GPUKernelManager, self.kernel_manager)
        km.catalog = catalog
        inventory = Inventory.discover(self.simulate or None)
        km.inventory = inventory if self.devices == "all" else inventory.restrict(self.devices)
        km.environments = Environments(parent=self, log=self.log)
        cast(AgentKernelSpecManager, self.kernel_spec_manager).environments = km.environments
        # Kernels' IPC sockets are named after their connection files, and a Unix socket
        # path may not exceed 107 bytes: keep them in a short private folder, not under a
        # possibly deep runtime dir.
        self._socket_dir = tempfile.TemporaryDirectory(prefix="cgh-")
        km.connection_dir = self._socket_dir.name
        km.sandbox = self._make_sandbox()
        km.sandbox.workdir = Path(self._socket_dir.name)
        km.sandbox.check()
        cast(AgentKernelSpecManager, self.kernel_spec_manager).sandboxed = km.sandbox.isolated
        self.log.info("Kernel isolation: %s", km.sandbox.describe())
        if not self.identity_provider.token:
            self.identity_provider.token = secrets.token_hex(24)
            print(f"cloudgpu host token (shown once): {self.identity_provider.token}",
                  file=sys.stderr)
        self.identity_provider.token_generated = False

    def _make_sandbox(self) -> Sandbox:
        """The sandbox ``--isolation`` names; none only on loopback or when named.

        Raises:
            UnisolatedHostError: this host listens beyond loopback and no isolation was given.
            IsolationUnavailableError: the isolation named is not installed.
        """
        beyond_loopback = self._default_allow_remote()
        if not self.isolation and beyond_loopback:
            raise UnisolatedHostError(
                f"This host would listen on {self.ip or 'every address'}, beyond loopback, "
                "where other people can use it, and --isolation was not given: its kernels "
                "would run unisolated, each able to read the others' files and variables. "
                "Choose --isolation=bubblewrap (or podman, docker), or --isolation=none to "
                "run them unisolated on purpose.")
        if self.isolation == "none" and beyond_loopback:
            self.log.warning("Kernels on this host are NOT isolated from each other "
                             "(--isolation=none), and it listens beyond loopback.")
        return _load_sandbox(self.isolation or "none")(parent=self)

    async def cleanup_kernels(self) -> None:
        """Shut every kernel down, then free what the sandbox holds for the host."""
        await super().cleanup_kernels()
        cast(GPUKernelManager, self.kernel_manager).sandbox.close()

    def find_server_extensions(self) -> None:
        """A host serves kernels only: no JupyterLab or other server extensions."""
        self.jpserver_extensions = {}

    def init_webapp(self) -> None:
        """Add our handlers beside Jupyter's kernel API."""
        super().init_webapp()
        for rule in self.web_app.wildcard_router.rules:  # Jupyter's, with the body checked
            if rule.target is MainKernelHandler:
                rule.target = CheckedMainKernelHandler
        base = self.web_app.settings["base_url"]
        self.web_app.add_handlers(
            ".*$", [(url_path_join(base, path), handler)
                   for path, handler in [*HOST_HANDLERS, *SIDE_HANDLERS]]
        )

    def write_server_info_file(self) -> None:
        """Write the --info-file (not Jupyter's server list: a host is not a notebook server)
        once the host listens.

        Jupyter Server calls this before its port is bound: it binds in the first callback
        of its event loop, and announces itself before starting that loop. A client that
        read the file at once found nothing listening (connection refused, under load).
        This callback runs after the bind; a failed bind exits before it.
        """
        if self.info_file:
            self.io_loop.add_callback(self._write_info)

    def _write_info(self) -> None:
        write_private_json(self.info_file, {
            "url": self.connection_url, "port": self.port, "pid": os.getpid(),
            "simulated": cast(GPUKernelManager, self.kernel_manager).inventory.simulated,
            "isolation": cast(GPUKernelManager, self.kernel_manager).sandbox.name,
        })

    def remove_server_info_file(self) -> None:
        """Remove the --info-file on the way out."""
        if self.info_file and os.path.exists(self.info_file):
            os.unlink(self.info_file)

    def write_browser_open_files(self) -> None:
        """No browser for a host."""

    def start_app(self) -> None:
        """Start serving; watch the parent process when one was named."""
        super().start_app()
        if self.parent_pid:
            PeriodicCallback(self._check_parent, 500).start()

    def _check_parent(self) -> None:
        if os.getppid() != self.parent_pid:
            self.log.warning("Parent process %s is gone; stopping the host.", self.parent_pid)
            self.stop()


main = launch_new_instance = HostApp.launch_instance
