"""Warm kernels: a real pool keeps pre-started kernels and hands them out at once.

The host's GPUs are simulated (``--simulate H100:2``); everything else is real processes.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.timeout(120)


def _start(cmd: list[str], info: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not info.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return proc


class Pool:
    def __init__(self, tmp: Path, host_url: str, host_token: str, config: str) -> None:
        self.tmp, self.token = tmp, secrets.token_hex(16)
        (tmp / "pool_config.py").write_text(config)
        self.cmd = [sys.executable, "-m", "cloudgpu", "pool", "--backend=static",
                    f"--hosts={host_url}?token={host_token}", "--port=0",
                    f"--db={tmp / 'ledger.sqlite'}", f"--config={tmp / 'pool_config.py'}"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        info = self.tmp / "pool.json"
        info.unlink(missing_ok=True)
        env = dict(os.environ, CLOUDGPU_POOL_TOKEN=self.token)
        self.proc = _start([*self.cmd, f"--info-file={info}"], info, env, self.tmp / "pool.log")
        self.url = json.loads(info.read_text())["url"]

    def call(self, method: str, path: str, **kw: object) -> httpx.Response:
        return httpx.request(method, self.url + path, timeout=30,
                             headers={"Authorization": f"token {self.token}"}, **kw)


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    tmp = tmp_path_factory.mktemp("warm-host")
    token = secrets.token_hex(24)
    env = dict(os.environ, CLOUDGPU_HOST_TOKEN=token)
    proc = _start([sys.executable, "-m", "cloudgpu", "host", "--port=0", "--simulate=H100:2",
                   f"--info-file={tmp / 'host.json'}"], tmp / "host.json", env, tmp / "host.log")
    yield json.loads((tmp / "host.json").read_text())["url"].rstrip("/"), token
    proc.terminate()
    proc.wait(20)


def host_kernels(host: tuple[str, str]) -> list[dict[str, object]]:
    url, token = host
    return httpx.get(f"{url}/api/kernels", headers={"Authorization": f"token {token}"}).json()


def running(pool: Pool, session: dict[str, object]) -> dict[str, object]:
    """Long-poll the session until it is no longer queued or starting."""
    while session["state"] in ("queued", "starting"):
        session = pool.call("GET", f"/api/sessions/{session['id']}",
                            params={"wait": 20, "version": session["version"]}).json()
    return session


def wait_for(predicate: object, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_a_warm_kernel_is_granted_at_once_and_replaced(host: tuple[str, str],
                                                       tmp_path: Path) -> None:
    pool = Pool(tmp_path, *host, 'c.PoolApp.warm_kernels = {"cpu": 1, "H100": 1}\n')
    pool.start()
    try:
        wait_for(lambda: len(host_kernels(host)) == 2)  # one cpu, one H100, both warm
        warm_ids = {k["id"] for k in host_kernels(host)}
        # A warm GPU kernel still counts as free.
        h100 = next(h for h in pool.call("GET", "/api/hardware").json()["hardware"]
                    if h["type"] == "H100")
        assert (h100["free"], h100["total"]) == (2, 2)

        session = pool.call("POST", "/api/sessions", json={"hardware": "H100"}).json()
        assert session["state"] == "running"  # no waiting: the POST itself answers running
        assert session["kernel_id"] in warm_ids
        # Its scoped token opens it, though the kernel was started before the session.
        scoped = httpx.get(f"{host[0]}/api/kernels/{session['kernel_id']}",
                           headers={"Authorization": f"token {session['token']}"})
        assert scoped.status_code == 200
        # One H100 is still free, so a new warm H100 kernel takes the place of the one given.
        wait_for(lambda: len(host_kernels(host)) == 3)
        pool.call("DELETE", f"/api/sessions/{session['id']}")
        wait_for(lambda: len(host_kernels(host)) == 2 and
                 session["kernel_id"] not in {k["id"] for k in host_kernels(host)})
    finally:
        assert pool.proc is not None
        pool.proc.terminate()
        pool.proc.wait(30)
    wait_for(lambda: host_kernels(host) == [])  # a pool that stops takes its warm kernels along


def test_a_request_for_more_gpus_stops_warm_kernels_to_make_room(host: tuple[str, str],
                                                                  tmp_path: Path) -> None:
    pool = Pool(tmp_path, *host, 'c.PoolApp.warm_kernels = {"H100": 1}\n')
    pool.start()
    try:
        wait_for(lambda: len(host_kernels(host)) == 1)
        warm_id = host_kernels(host)[0]["id"]
        # Both H100s: the warm kernel holding one of them is stopped to make room.
        session = running(pool, pool.call("POST", "/api/sessions",
                                          json={"hardware": "H100:2"}).json())
        assert session["state"] == "running", session
        assert session["count"] == 2 and session["kernel_id"] != warm_id
        assert {k["id"] for k in host_kernels(host)} == {session["kernel_id"]}
        pool.call("DELETE", f"/api/sessions/{session['id']}")
        wait_for(lambda: len(host_kernels(host)) == 1 and  # warm again, now that GPUs are free
                 host_kernels(host)[0]["id"] != session["kernel_id"])
    finally:
        assert pool.proc is not None
        pool.proc.terminate()
        pool.proc.wait(30)


def test_kernels_left_by_a_killed_pool_are_stopped_on_restart(host: tuple[str, str],
                                                              tmp_path: Path) -> None:
    pool = Pool(tmp_path, *host, 'c.PoolApp.warm_kernels = {"cpu": 2}\n')
    pool.start()
    wait_for(lambda: len(host_kernels(host)) == 2)
    session = pool.call("POST", "/api/sessions", json={"hardware": "cpu"}).json()
    assert session["state"] == "running"
    wait_for(lambda: len(host_kernels(host)) == 3)
    assert pool.proc is not None
    pool.proc.send_signal(signal.SIGKILL)
    pool.proc.wait(10)
    pool.start()  # same ledger
    try:
        # The session's kernel is kept; the two warm ones nobody owns were swept and the
        # new pool made its own two.
        wait_for(lambda: len(host_kernels(host)) == 3)
        ids = {k["id"] for k in host_kernels(host)}
        assert session["kernel_id"] in ids
        again = pool.call("GET", f"/api/sessions/{session['id']}").json()
        assert again["state"] == "running" and again["started"] == session["started"]
    finally:
        pool.proc.terminate()
        pool.proc.wait(30)
    wait_for(lambda: host_kernels(host) == [])
