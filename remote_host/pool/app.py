"""``cloudgpu pool``: the control plane. Hands out hardware, meters it, keeps the ledger."""

from __future__ import annotations

import asyncio
import getpass
import os
import secrets
import signal
import ssl
import sys
from typing import Any

from jupyter_core.paths import jupyter_config_path, jupyter_data_dir
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from traitlets import Bool, Dict, Float, Integer, Unicode, default
from traitlets.config import Application, Config

from cloudgpu import __version__
from cloudgpu._process import write_private_json
from cloudgpu.errors import CloudGPUError
from cloudgpu.hardware import Catalog

from ..throttle import BadTokenThrottle
from .backend import Backend, load_backend
from .backends.local import LocalBackend
from .backends.ray import RayBackend
from .backends.static import StaticBackend
from .handlers import POOL_HANDLERS
from .ledger import Ledger
from .service import Pool

__all__ = ["PoolApp"]


class PoolApp(Application):
    """A cloudgpu pool: sessions on pooled hardware, with live cost, budgets and a ledger."""

    name = "cloudgpu-pool"
    version = __version__
    description = (
        "Run a cloudgpu pool: the REST API (under /api/) that hands out hardware to notebooks,\n"
        "queues what is busy, meters cost into a SQLite ledger, enforces budgets and stops\n"
        "idle sessions. Listens on 127.0.0.1 unless --ip says otherwise; every request needs\n"
        "a token (--token, or --PoolApp.users for several users)."
    )
    examples = (
        "cloudgpu pool --simulate H100:2                  # local backend, simulated GPUs\n"
        "cloudgpu pool --backend static --hosts 'http://10.0.0.5:8899?token=T'\n"
        "cloudgpu pool --backend ray --ray-address 10.0.0.2:6379   # pip install 'cloudgpu[ray]'"
    )
    aliases = {
        "ip": "PoolApp.ip",
        "port": "PoolApp.port",
        "token": "PoolApp.token",
        "backend": "PoolApp.backend",
        "simulate": "LocalBackend.simulate",
        "hosts": "PoolApp.hosts",
        "ray-address": "RayBackend.address",
        "db": "PoolApp.db",
        "idle-timeout": "PoolApp.idle_timeout",
        "daily-limit": "PoolApp.daily_limit",
        "info-file": "PoolApp.info_file",
        "log-level": "Application.log_level",
        "config": "PoolApp.config_file",
        "certfile": "PoolApp.certfile",
        "keyfile": "PoolApp.keyfile",
    }
    flags = {
        **Application.flags,
        "ray-simulated": ({"RayBackend": {"simulated": True}},
                          "The Ray cluster's GPUs are simulated (declared resources, no "
                          "devices); sessions say so."),
        "allow-unisolated": ({"PoolApp": {"allow_unisolated": True}},
                             "Accept hosts that run kernels without isolation although several "
                             "people share this pool."),
    }
    classes = [LocalBackend, StaticBackend, RayBackend]

    ip = Unicode("127.0.0.1", help="Address to listen on.").tag(config=True)
    certfile = Unicode("", help="TLS certificate (PEM): serve https. Clients check it "
                       "(CLOUDGPU_CA_FILE for a private CA).").tag(config=True)
    keyfile = Unicode("", help="TLS private key (PEM) for --certfile.").tag(config=True)
    max_body_size = Integer(
        1 << 20, help="The largest request body the pool accepts, in bytes (413 beyond)."
    ).tag(config=True)
    port = Integer(0, help="Port to listen on (0: a free one).").tag(config=True)
    token = Unicode(
        "", help="The token of this machine's user (default $CLOUDGPU_POOL_TOKEN, else a new "
        "random one, printed once)."
    ).tag(config=True)
    users = Dict(
        Unicode(), help="More users: {token: user name}. Each sees only their own sessions."
    ).tag(config=True)
    allow_unisolated = Bool(
        False, help="A shared pool (several users, or a backend other than local) refuses "
        "hosts whose kernels are not isolated from one another (`cloudgpu host "
        "--isolation=none`) unless this says its operator accepts that; their sessions are "
        "then shown as not isolated.",
    ).tag(config=True)
    backend = Unicode("local", help="Backend name (`cloudgpu.backends` entry point): local, "
                      "static, ray, ...").tag(config=True)
    hosts = Unicode("", help="Comma-separated host URLs for the static backend, each "
                    "`http://HOST:PORT?token=T`. One that does not answer at the start "
                    "joins once it does.").tag(config=True)
    db = Unicode(help="The SQLite ledger file.").tag(config=True)
    idle_timeout = Float(900.0, help="Seconds a session may sit idle before it is stopped "
                         "and its hardware freed (0: never). Per session: idle_timeout=.").tag(
        config=True)
    disconnected_timeout = Float(
        120.0, help="Seconds a running session may have no client connected before it is "
        "stopped (its notebook kernel went away without releasing it; 0: never), counted "
        "from the end of its last cell: a cell still running keeps it, so a notebook whose "
        "laptop slept through a long cell comes back to its output."
    ).tag(config=True)
    busy_disconnected_timeout = Float(
        86400.0, help="Seconds a session whose cell is still running may have no client "
        "connected before it is stopped anyway (a notebook that died beside an endless "
        "loop; 0: never). Budgets and max_cost stop it sooner."
    ).tag(config=True)
    daily_limit = Float(0.0, help="Dollars per user per day (0: no limit).").tag(config=True)
    user_limits = Dict(Float(), help="Per-user daily limits, {user: dollars}.").tag(config=True)
    warm_kernels = Dict(
        Integer(), default_value=None, allow_none=True,
        help='Pre-started kernels to keep ready per hardware type, {"cpu": 1, "H100": 1}; '
        "a warm GPU kernel is still free to any request. Default: one cpu kernel with the "
        "local backend, none otherwise.",
    ).tag(config=True)
    max_hold = Float(
        300.0, help="The longest a notebook may hold a warm cpu kernel for its first cell, "
        "seconds (`%load_ext cloudgpu` asks for one: ClientConfig.warm_hold). A hold is not "
        "billed or listed until a cell takes it; unclaimed, it is stopped after this long."
    ).tag(config=True)
    meter_interval = Float(1.0, help="Seconds between cost and budget checks.").tag(config=True)
    cull_interval = Float(15.0, help="Seconds between idleness checks.").tag(config=True)
    bad_tokens_allowed = Integer(
        10, help="Wrong tokens one address may send per minute before its wrong tokens are "
        "answered 429 (a right token is always accepted)."
    ).tag(config=True)
    heartbeat_interval = Float(
        2.0, help="Seconds between asking every host whether it is there."
    ).tag(config=True)
    heartbeat_misses = Integer(
        2, help="Heartbeats a host may miss in a row before its sessions are ended as lost "
        "(billing stops at its last answer)."
    ).tag(config=True)
    catalog_file = Unicode("", help="A catalog JSON file replacing the shipped one.").tag(
        config=True)
    catalog_overrides = Dict(
        help='Price changes and extra types: {"H100": {"price_per_hour": 2.0}}.'
    ).tag(config=True)
    config_file = Unicode("", help="A config file (.py or .json) loaded after Jupyter's "
                          "cloudgpu_pool_config files.").tag(config=True)
    info_file = Unicode("", help="Write URL, token and pid here (mode 0600) once listening.").tag(
        config=True)

    @default("db")
    def _default_db(self) -> str:
        return os.path.join(jupyter_data_dir(), "cloudgpu", "ledger.sqlite")

    @default("token")
    def _default_token(self) -> str:
        return os.environ.pop("CLOUDGPU_POOL_TOKEN", "")

    def initialize(self, argv: list[str] | None = None) -> None:
        """Parse the command line, then load ``cloudgpu_pool_config.py`` from Jupyter's path."""
        super().initialize(argv)
        cli = self.config
        self.load_config_file("cloudgpu_pool_config", path=jupyter_config_path())
        if self.config_file:
            self.load_config_file(self.config_file)
        self.update_config(cli)  # the command line wins over config files
        if self.hosts:
            urls = [u for u in self.hosts.split(",") if u.strip()]
            self.update_config(Config({"StaticBackend": {"hosts_urls": urls}}))

    def catalog(self) -> Catalog:
        """The catalog with the operator's file and overrides applied."""
        catalog = Catalog.from_file(self.catalog_file) if self.catalog_file else Catalog.default()
        return catalog.with_overrides(self.catalog_overrides) if self.catalog_overrides else catalog

    def make_backend(self) -> Backend:
        """Instantiate the configured backend."""
        return load_backend(self.backend)(parent=self)

    def start(self) -> None:
        """Serve until SIGTERM or SIGINT; a pool that cannot start says why, and exits 1."""
        try:
            asyncio.run(self.serve())
        except CloudGPUError as e:
            self.log.critical("cloudgpu pool: %s", e)
            self.exit(1)

    async def serve(self) -> None:
        """Start the pool and its HTTP server; stop both on a signal."""
        token = self.token
        if not token:
            token = secrets.token_hex(24)
            print(f"cloudgpu pool token (shown once): {token}", file=sys.stderr)
        users = {token: getpass.getuser(), **self.users}
        backend = self.make_backend()
        pool = Pool(backend, Ledger(self.db), self.catalog(),
                    idle_timeout=self.idle_timeout, daily_limit=self.daily_limit,
                    user_limits=dict(self.user_limits), meter_interval=self.meter_interval,
                    cull_interval=self.cull_interval, log=self.log,
                    disconnected_timeout=self.disconnected_timeout,
                    busy_disconnected_timeout=self.busy_disconnected_timeout,
                    heartbeat_interval=self.heartbeat_interval,
                    heartbeat_misses=self.heartbeat_misses,
                    shared=backend.shared or len(users) > 1,
                    allow_unisolated=self.allow_unisolated, max_hold=self.max_hold,
                    warm=self.warm_kernels if self.warm_kernels is not None else
                    ({"cpu": 1} if self.backend == "local" else {}))
        await pool.start()
        app = web.Application(POOL_HANDLERS, pool=pool, users=users,
                              throttle=BadTokenThrottle(self.bad_tokens_allowed),
                              max_body_size=self.max_body_size,
                              log_function=_quiet_log(self))
        sockets = bind_sockets(self.port, self.ip)
        tls = None
        if self.certfile:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(self.certfile, self.keyfile or None)
        # Tornado refuses bodies over its limit before our handlers see them; ours (with a
        # message saying so) applies below that.
        server = HTTPServer(app, ssl_options=tls, max_body_size=self.max_body_size * 2)
        server.add_sockets(sockets)
        port = sockets[0].getsockname()[1]
        scheme = "https" if tls else "http"
        url = f"{scheme}://{self.ip if ':' not in self.ip else f'[{self.ip}]'}:{port}"
        self.log.info("cloudgpu pool %s on %s (backend %s, ledger %s)", __version__, url,
                      self.backend, self.db)
        if self.info_file:
            write_private_json(self.info_file, {
                "url": url, "token": token, "pid": os.getpid(),
                "simulated": any(s.simulated for s in pool.scheduler.slots.values()),
            })
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            server.stop()
            await pool.close(stop_sessions=True)
            pool.ledger.close()
            if self.info_file and os.path.exists(self.info_file):
                os.unlink(self.info_file)


def _quiet_log(app: PoolApp) -> Any:
    def log(handler: web.RequestHandler) -> None:
        status = handler.get_status()
        # Never the query string: it may carry a token.
        line = "%d %s %s %.1fms", status, handler.request.method, handler.request.path, \
            1000 * handler.request.request_time()
        (app.log.warning if status >= 500 else app.log.debug)(*line)
    return log


main = launch_new_instance = PoolApp.launch_instance
