"""Real ``cloudgpu host`` and ``cloudgpu pool`` processes for tests, started as users start them.

Built on ``cloudgpu._process``: each server writes its info file once it listens, its output
goes to a log that a failed start quotes, and it is stopped with grace. Hosts and pools
listen on their default address, 127.0.0.1 (test_host.py checks that default). The only
fake is the GPU: hosts get a simulated inventory (``--simulate``).

Hosts sandbox their kernels as ``CLOUDGPU_TEST_ISOLATION`` says (``none`` unless it is set;
``CLOUDGPU_TEST_ISOLATION=bubblewrap`` runs the suites with every kernel sandboxed), and the
test session's local pool does the same (conftest.py).

The fixtures that hand these out are in conftest.py.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from jupyter_core.paths import jupyter_runtime_dir

from cloudgpu import _process

#: How test hosts and the test session's local pool sandbox kernels.
ISOLATION = os.environ.get("CLOUDGPU_TEST_ISOLATION", "none")


def wait_until(done: Callable[[], object], within: float = 20, what: str = "the condition",
               ) -> None:
    """Look at ``done()`` until it is true; fail after ``within`` seconds naming ``what``."""
    deadline = time.monotonic() + within
    while not done():
        assert time.monotonic() < deadline, f"{what} did not happen within {within} s"
        time.sleep(0.05)


def wait_for_jupyter_server(proc: subprocess.Popen[bytes], log: Path, what: str,
                            timeout: float = 60) -> str:
    """The URL of the Jupyter Server ``proc``, once it accepts connections.

    Its ``jpserver-PID.json`` is not enough: Jupyter Server writes it before it binds its
    port (in the first callback of its event loop), so a request sent at once can be
    refused.
    """
    info = _process.wait_for_info(proc, Path(jupyter_runtime_dir()) /
                                  f"jpserver-{proc.pid}.json", log_path=log, what=what,
                                  timeout=timeout)
    url = str(info["url"]).rstrip("/")
    parts = urllib.parse.urlsplit(url)
    address = (parts.hostname or "127.0.0.1", parts.port or 80)

    def accepts() -> bool:
        assert proc.poll() is None, f"{what} exited: {_process.log_tail(log)}"
        try:
            socket.create_connection(address, timeout=5).close()
        except OSError:
            return False
        return True

    wait_until(accepts, within=timeout, what=f"{what} listening on {url}")
    return url


def _server_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    env.pop("CLOUDGPU_SIMULATE", None)  # each server is told its inventory explicitly
    return env


@dataclass
class HostProcess:
    """A running ``cloudgpu host``, and what a test asks of it over HTTP with its token."""

    name: str
    url: str
    token: str
    proc: subprocess.Popen[bytes]
    info: Path
    log: Path
    isolation: str = ISOLATION

    def get_as(self, token: str | None, path: str) -> httpx.Response:
        """``GET path`` with ``token`` (None: no Authorization header at all)."""
        headers = {"Authorization": f"token {token}".strip()} if token is not None else {}
        return httpx.get(self.url + path, headers=headers, timeout=30)

    def get(self, path: str) -> httpx.Response:
        """``GET path`` with the host token."""
        return self.get_as(self.token, path)

    def kernels(self) -> list[dict[str, Any]]:
        """``GET /api/kernels``: every kernel the host runs."""
        response = self.get("/api/kernels")
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def gpus(self) -> list[dict[str, Any]]:
        """The host's own view: each GPU with the kernel holding it (or None)."""
        response = self.get("/api/cloudgpu/host")
        assert response.status_code == 200, response.text
        return response.json()["inventory"]["gpus"]  # type: ignore[no-any-return]

    def kernel_alive(self, kernel_id: str) -> bool:
        """Whether the host still has that kernel."""
        response = self.get(f"/api/kernels/{kernel_id}")
        assert response.status_code in (200, 404), response.text
        return response.status_code == 200

    def delete_kernel(self, kernel_id: str) -> None:
        """Shut one kernel down, as its host's operator would."""
        response = httpx.delete(f"{self.url}/api/kernels/{kernel_id}", timeout=30,
                                headers={"Authorization": f"token {self.token}"})
        assert response.status_code == 204, response.text

    def reset(self) -> None:
        """Shut every kernel down (a safety net after a test that killed its pool)."""
        for kernel in self.kernels():
            httpx.delete(f"{self.url}/api/kernels/{kernel['id']}", timeout=30,
                         headers={"Authorization": f"token {self.token}"})

    def stop(self) -> None:
        """SIGTERM, as an operator stops a host; SIGKILL if it hangs."""
        _process.stop(self.proc, grace=20)


class HostFactory:
    """Starts hosts with simulated inventories in one folder; :meth:`close` stops them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: dict[str, HostProcess] = {}

    def start(self, simulate: str | None = None, *, name: str = "host",
              log_level: str | None = None, env: Mapping[str, str] | None = None,
              args: Iterable[str] = ()) -> HostProcess:
        """One host, ready to use.

        Args:
            simulate: its simulated GPUs (``H100:2``); None for what NVML finds (here: none).
            name: names its info file and log in the folder; one host per name.
            log_level: ``DEBUG`` to log every request.
            env: more environment variables for it.
            args: more command-line options (``--HostIdentityProvider.bad_tokens_allowed=3``;
                ``--isolation=bubblewrap`` overrides ``CLOUDGPU_TEST_ISOLATION``).
        """
        return self.start_many({name: simulate}, log_level=log_level, env=env,
                               args=args)[name]

    def start_many(self, inventories: Mapping[str, str | None], *,
                   log_level: str | None = None, env: Mapping[str, str] | None = None,
                   args: Iterable[str] = ()) -> dict[str, HostProcess]:
        """Hosts by name, with their inventories, started side by side (it is faster)."""
        launched = {}
        for name, simulate in inventories.items():
            assert name not in self.started and name not in launched, f"a second host {name!r}"
            token = secrets.token_hex(24)
            info, log = self.workdir / f"{name}.json", self.workdir / f"{name}.log"
            cmd = [sys.executable, "-m", "cloudgpu", "host", "--port=0", f"--info-file={info}"]
            if simulate:
                cmd.append(f"--simulate={simulate}")
            if log_level:
                cmd.append(f"--log-level={log_level}")
            given = [a.partition("=")[2] for a in args if a.startswith("--isolation=")]
            isolation = given[-1] if given else ISOLATION
            cmd += [*args, *([] if given else [f"--isolation={isolation}"])]
            proc = _process.start(cmd, log_path=log,
                                  env=_server_env(CLOUDGPU_HOST_TOKEN=token, **(env or {})))
            launched[name] = (proc, token, info, log, isolation)
        for name, (proc, token, info, log, isolation) in launched.items():
            # Known before waiting, so that close() stops it even if another fails to start.
            self.started[name] = HostProcess(name, "", token, proc, info, log, isolation)
        for name, (proc, _token, info, log, _isolation) in launched.items():
            found = _process.wait_for_info(proc, info, log_path=log, what=f"Host {name}")
            self.started[name].url = str(found["url"]).rstrip("/")
        return {name: self.started[name] for name in launched}

    def close(self) -> None:
        """Stop every host this factory started."""
        for host in self.started.values():
            host.proc.terminate()
        for host in self.started.values():
            host.stop()


class PoolProcess:
    """A ``cloudgpu pool --backend static`` over some hosts (or another backend); it can be
    started again on the same ledger, as after a crash.

    Args:
        workdir: where its info file, log and (by default) ledger go.
        hosts: the hosts it hands out.
        config: its config file (``--config``).
        name: names its files in ``workdir``.
        db: its SQLite ledger.
        backend_args: another backend instead of static over ``hosts``
            (``["--backend=ray", "--ray-address=..."]``).
        env: more environment variables for it.
        args: more command-line options (``--certfile=...``).
        allow_unisolated: accept hosts that do not isolate kernels (a static pool is shared,
            and refuses them otherwise); by default, when one of ``hosts`` is such a host.
    """

    def __init__(self, workdir: Path, hosts: Iterable[HostProcess], config: Path, *,
                 name: str = "pool", db: Path | None = None,
                 backend_args: list[str] | None = None,
                 env: Mapping[str, str] | None = None, args: Iterable[str] = (),
                 allow_unisolated: bool | None = None) -> None:
        self.hosts = list(hosts)
        self.backend_args = backend_args
        self.env = dict(env or {})
        self.args = list(args)
        if allow_unisolated is None:
            allow_unisolated = any(h.isolation == "none" for h in self.hosts)
        if allow_unisolated:
            self.args.append("--allow-unisolated")
        self.config = config
        self.db = db or workdir / f"{name}.sqlite"
        self.info = workdir / f"{name}.json"
        self.log = workdir / f"{name}.log"
        self.token = secrets.token_hex(24)  # this machine's user (CLOUDGPU_POOL_TOKEN)
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PoolProcess:
        """Start it and wait until it listens."""
        entries = ",".join(f"{h.url}?token={h.token}" for h in self.hosts)
        backend = self.backend_args or ["--backend=static", f"--hosts={entries}"]
        self.proc, info = _process.spawn(
            [sys.executable, "-m", "cloudgpu", "pool", *backend,
             "--port=0", f"--db={self.db}", f"--config={self.config}",
             f"--info-file={self.info}", "--log-level=DEBUG", *self.args],
            env=_server_env(CLOUDGPU_POOL_TOKEN=self.token, **self.env), info_path=self.info,
            log_path=self.log, what="The test pool",
        )
        self.url = str(info["url"])
        return self

    def request(self, method: str, path: str, *, token: str | None = None,
                **kw: Any) -> httpx.Response:
        """A REST request, as this machine's user unless ``token`` says otherwise."""
        return httpx.request(method, self.url + path, timeout=90,
                             headers={"Authorization": f"token {token or self.token}"}, **kw)

    def wait_for_log(self, text: str, within: float = 20) -> None:
        """Until the pool's log (at DEBUG) has a line with ``text``."""
        wait_until(lambda: text in self.log.read_text(errors="replace"), within,
                   f"the pool logging {text!r}")

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is cleaned up."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(20)

    def stop(self) -> None:
        """SIGTERM (the pool stops its sessions); SIGKILL if it hangs."""
        if self.proc is not None:
            _process.stop(self.proc, grace=30)


class LabProcess:
    """``jupyter lab`` on 127.0.0.1 with a token, no browser, serving ``root``.

    It finds its pool as the kernels do: the test session's private local pool (conftest's
    Jupyter folders and ``CLOUDGPU_SIMULATE``). The server extension is enabled on the
    command line, so its handlers are there whether or not ``make labext`` installed it.
    """

    def __init__(self, root: Path, workdir: Path) -> None:
        self.root = root
        self.log = workdir / "lab.log"
        self.token = secrets.token_hex(24)
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LabProcess:
        """Start it and wait until it listens (its ``jpserver-PID.json`` is written)."""
        cmd = [sys.executable, "-m", "jupyterlab", "--ip=127.0.0.1", "--port=0",
               "--no-browser", "--allow-root", f"--ServerApp.root_dir={self.root}",
               f"--IdentityProvider.token={self.token}",
               '--ServerApp.jpserver_extensions={"cloudgpu.labextension": True}',
               "--LabApp.news_url=", "--LabApp.check_for_updates_class="
               "jupyterlab.NeverCheckForUpdate"]
        env = dict(os.environ)
        # No news prompt over the status bar: a test machine asks nobody.
        settings = Path(env["JUPYTER_CONFIG_DIR"]) / "lab" / "user-settings" / "@jupyterlab" \
            / "apputils-extension" / "notification.jupyterlab-settings"
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text('{"fetchNews": "false", "checkForUpdates": false}')
        self.proc = _process.start(cmd, log_path=self.log, env=env)
        self.url = wait_for_jupyter_server(self.proc, self.log, "JupyterLab", timeout=90)
        return self

    def request(self, method: str, path: str, *, token: str | None = "",
                **kw: Any) -> httpx.Response:
        """A request to the server; with its token unless ``token`` is None (none at all)."""
        headers = {} if token is None else {"Authorization": f"token {token or self.token}"}
        return httpx.request(method, self.url + path, headers=headers, timeout=90, **kw)

    def stop(self) -> None:
        """SIGTERM (Jupyter shuts its kernels down); SIGKILL if it hangs."""
        if self.proc is not None:
            _process.stop(self.proc, grace=30)
