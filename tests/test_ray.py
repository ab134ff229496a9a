"""The ``ray`` backend on a real Ray cluster: nodes, actors, runtime_env, a lost node.

One Ray cluster per module, made with Ray's own multi-node test utilities
(``ray.cluster_utils.Cluster``) in this process: a head node declaring two simulated
H100s (``num_gpus=2`` and the ``accelerator_type:H100`` resource) and a worker node with
one simulated A100-80GB. There is no GPU here, so the GPUs are simulated (every test name
says so) and Ray's resources are declared, not detected; everything else is real: the
GCS, raylets, actors, Ray's GPU assignment and ``CUDA_VISIBLE_DEVICES``, pip installs
through ``runtime_env``, health checks that find a killed node.

The cluster binds to 127.0.0.1 only: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is Ray's
own switch for a cluster on loopback (without it Ray swaps 127.0.0.1 for the machine's
address and its servers listen on every interface), set for this process and the pool.
Ray's health checks run every 0.5 s, so a killed node is found dead within about a
second instead of Ray's default 15 s.

A real ``cloudgpu pool --backend ray`` serves it, and the notebook side is a real local
ipykernel with ``%load_ext cloudgpu`` pointed at the pool, as in tests/test_pool.py.
Without Ray installed only the first test runs: the pool must say how to install it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from kernel_driver import CLIENT, Message, ok, run, start_kernel, stop_kernel, value
from servers import PoolProcess, wait_until

from cloudgpu.hardware import Catalog

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           # One pip attempt for an environment, not Ray's three: a bad one fails sooner.
           "RUNTIME_ENV_RETRY_TIMES": "1"}
#: Ray notices a dead node after `failure_threshold` missed checks, `period_ms` apart.
HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                 "health_check_timeout_ms": 500, "health_check_failure_threshold": 2}
ENV_PACKAGE = "inflection==0.5.1"  # small, pure Python, and not installed here
ENDED = ("stopped", "cancelled", "failed")


# --- the cluster and the pool ----------------------------------------------------------------


class RayCluster:
    """A head node with two simulated H100s and a worker node with one simulated A100-80GB."""

    def __init__(self) -> None:
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 4, "num_gpus": 2, "resources": {"accelerator_type:H100": 1},
            "include_dashboard": False, "_system_config": HEALTH_CHECKS,
        })
        self.head = self.cluster.head_node
        self.a100 = self.cluster.add_node(num_cpus=2, num_gpus=1,
                                          resources={"accelerator_type:A100-80G": 1})
        self.address = self.cluster.address
        self.state = self.cluster.global_state

    def available_gpus(self, node: Any) -> float:
        """What Ray says is free on a node."""
        return float(self.state.available_resources_per_node().get(node.node_id, {})
                     .get("GPU", 0))

    def alive(self, node: Any) -> bool:
        return any(n["NodeID"] == node.node_id and n["Alive"] for n in self.state.node_table())

    def session_actors(self) -> list[dict[str, Any]]:
        """The cloudgpu session actors Ray still has alive."""
        return [a for a in self.state.actor_table(None).values()
                if a["State"] == "ALIVE" and a["Name"].startswith("cloudgpu-session-")]

    def pids(self) -> set[int]:
        """Every process of the cluster: Ray's own on each node, and what they started."""
        import psutil

        pids: set[int] = set()
        for node in self.cluster.list_all_nodes():
            for infos in node.all_processes.values():
                for info in infos:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        proc = psutil.Process(info.process.pid)
                        pids |= {proc.pid, *(c.pid for c in proc.children(recursive=True))}
        return pids

    def kill_node(self, node: Any) -> None:
        """SIGKILL a node's raylet and everything under it at once, as a crashed machine:
        its workers, the session actor, its host and kernel."""
        import psutil

        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        procs = [raylet, *raylet.children(recursive=True)]
        procs += [psutil.Process(i.process.pid) for infos in node.all_processes.values()
                  for i in infos if i.process.poll() is None and i.process.pid != raylet.pid]
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGKILL)
        self.cluster.remove_node(node, allow_graceful=False)  # reaps what is left

    def shutdown(self) -> None:
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def ray_dir() -> Iterator[str]:
    """Ray's temporary folder, private and short (socket paths are limited to 107 bytes)."""
    path = tempfile.mkdtemp(prefix="cgr-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(ray_dir: str) -> Iterator[RayCluster]:
    # Not imported before: Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, on import.
    if importlib.util.find_spec("ray") is None:
        pytest.skip("needs Ray: `pip install 'cloudgpu[ray]'` (the test extra has it)")
    env = {**RAY_ENV, "RAY_TMPDIR": ray_dir}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    assert "ray" not in sys.modules, "Ray was imported before its loopback switch was set"
    started = None
    try:
        started = RayCluster()
        yield started
    finally:
        if started is not None:
            started.shutdown()
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@pytest.fixture(scope="module")
def pool(cluster: RayCluster, ray_dir: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoolProcess]:
    workdir = tmp_path_factory.mktemp("raypool")
    config = workdir / "pool_config.py"
    config.write_text(
        "# tests/test_ray.py: fast checks, so the tests wait for events, not for rounds.\n"
        "c.PoolApp.cull_interval = 0.5\n"
        "c.PoolApp.meter_interval = 0.5\n"
        "c.PoolApp.disconnected_timeout = 0\n"
        "c.RayBackend.refresh_interval = 0.5\n"
    )
    proc = PoolProcess(workdir, [], config, name="raypool",
                       backend_args=["--backend=ray", f"--ray-address={cluster.address}",
                                     "--ray-simulated"],
                       env={**RAY_ENV, "RAY_TMPDIR": ray_dir})
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def notebook(pool: PoolProcess) -> Iterator[BlockingKernelClient]:
    """A local ipykernel whose %%remote cells go to the Ray pool."""
    km, kc = start_kernel(CLOUDGPU_POOL=pool.url, CLOUDGPU_TOKEN=pool.token)
    try:
        ok(kc, "%load_ext cloudgpu")
        yield kc
    finally:
        stop_kernel(km, kc)


def api(pool: PoolProcess, method: str, path: str, **kw: Any) -> Any:
    response = pool.request(method, path, **kw)
    assert response.status_code < 300, response.text
    return response.json()


def hardware(pool: PoolProcess) -> dict[str, dict[str, Any]]:
    return {t["type"]: t for t in api(pool, "GET", "/api/hardware")["hardware"]}


def ledger(pool: PoolProcess) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(pool.db)) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM sessions ORDER BY created")]


def running(pool: PoolProcess, session_id: str, within: float = 90) -> dict[str, Any]:
    view = api(pool, "GET", f"/api/sessions/{session_id}")
    wait_until(lambda: view.update(api(pool, "GET", f"/api/sessions/{session_id}", params={
        "wait": 5, "version": view["version"]})) or view["state"] not in ("queued", "starting"),
        within, f"session {session_id} starting")
    assert view["state"] == "running", view
    return view


def ray_status(cluster: RayCluster) -> str:
    """``ray status``, as an operator reads the autoscaler's view of the cluster."""
    return subprocess.run([str(Path(sys.executable).parent / "ray"), "status",
                           f"--address={cluster.address}"], capture_output=True, text=True,
                          timeout=60, env={**os.environ}).stdout


def demand(cluster: RayCluster) -> set[tuple[str, str]]:
    """(GPUs, accelerator type) of each shape asked for through request_resources, as
    ``ray status`` lists them: ``{'GPU': 1.0, 'accelerator_type:H100': 0.001, ...}: 1 from
    request_resources()``."""
    found = set()
    for line in ray_status(cluster).splitlines():
        if "from request_resources()" in line:
            gpus = re.search(r"'GPU': ([0-9.]+)", line)
            kind = re.search(r"'accelerator_type:([^']+)'", line)
            if gpus and kind:
                found.add((gpus.group(1), kind.group(1)))
    return found


#: What the tests ran, to hold the ledger against at the end: (gpu_type, count, node id).
RAN: list[tuple[str, int, str]] = []


# --- without Ray -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_ray_backend_without_ray_installed_says_how_to_install_it(tmp_path: Path) -> None:
    # `import ray` fails as if it were not installed: None in sys.modules stops the import.
    code = ("import sys; sys.modules['ray'] = None; from cloudgpu.cli import main; "
            "main(['pool', '--backend', 'ray', '--port', '0', f'--db={sys.argv[1]}'])")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ledger.sqlite")],
                          capture_output=True, text=True, timeout=50)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "needs Ray, which is not installed" in done.stderr
    assert "pip install 'cloudgpu[ray]'" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.timeout(60)
def test_ray_backend_names_a_cluster_it_cannot_reach(tmp_path: Path) -> None:
    if importlib.util.find_spec("ray") is None:
        pytest.skip("needs Ray: `pip install 'cloudgpu[ray]'` (the test extra has it)")
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{free.getsockname()[1]}"
    done = subprocess.run(
        [sys.executable, "-m", "cloudgpu", "pool", "--backend=ray", f"--ray-address={address}",
         "--port=0", f"--db={tmp_path / 'ledger.sqlite'}"],
        capture_output=True, text=True, timeout=50, env={**os.environ, **RAY_ENV})
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert f"Cannot reach the Ray cluster at `{address}`" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


# --- placement -------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_simulated_h100_cell_lands_on_the_h100_node_with_the_gpu_ray_assigned(
        notebook: BlockingKernelClient, pool: PoolProcess, cluster: RayCluster) -> None:
    ex = ok(notebook, "%%remote gpu=H100\nimport os\n"
                      "visible = os.environ['CUDA_VISIBLE_DEVICES']\n"
                      "kinds = os.environ.get('CLOUDGPU_SIMULATED_GPUS')", timeout=120)
    assert any("1x H100 (simulated)" in line for line in ex.status_lines()), ex.describe()
    visible, kinds = value(notebook, "visible"), value(notebook, "kinds")
    assert visible in ("0", "1") and kinds == "H100"

    sid = value(notebook, f"{CLIENT}.sessions['H100'].grant.session_id")
    view = api(pool, "GET", f"/api/sessions/{sid}")
    assert [g["index"] for g in view["gpus"]] == [int(visible)], view
    assert view["simulated"] is True and view["gpus"][0]["simulated"] is True
    row = next(r for r in ledger(pool) if r["id"] == sid)
    assert row["host_id"] == cluster.head.node_id  # Ray placed it on the H100 node
    assert cluster.available_gpus(cluster.head) == 1
    assert hardware(pool)["H100"]["free"] == 1
    RAN.append(("H100", 1, cluster.head.node_id))

    # The notebook talks to the session's own host, not to the pool, with a token that
    # opens this kernel and nothing else.
    host, token = view["host_url"], value(notebook, f"{CLIENT}.sessions['H100'].grant.token")
    assert host.rstrip("/") != pool.url.rstrip("/")
    headers = {"Authorization": f"token {token}"}
    assert httpx.get(f"{host}/api/kernels/{view['kernel_id']}", headers=headers).status_code \
        == 200
    assert httpx.get(f"{host}/api/kernels", headers=headers).status_code == 403

    ok(notebook, "%remote shutdown --all")
    assert api(pool, "GET", f"/api/sessions/{sid}")["state"] == "stopped"
    wait_until(lambda: cluster.available_gpus(cluster.head) == 2, 30, "Ray freeing the GPU")
    assert not cluster.session_actors()


@pytest.mark.timeout(120)
def test_simulated_cluster_pool_and_session_hosts_listen_on_loopback_only(
        pool: PoolProcess, cluster: RayCluster) -> None:
    session = api(pool, "POST", "/api/sessions", json={"hardware": "cpu"})
    view = running(pool, session["id"])
    assert view["gpus"] == [] and view["gpu_type"] == "cpu"  # an actor with num_gpus=0
    node = next(r["host_id"] for r in ledger(pool) if r["id"] == session["id"])
    assert node in (cluster.head.node_id, cluster.a100.node_id)
    RAN.append(("cpu", 1, node))
    import psutil

    assert pool.proc is not None
    pids = cluster.pids() | {pool.proc.pid} | {
        c.pid for c in psutil.Process(pool.proc.pid).children(recursive=True)}
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    ours = [line for line in out.splitlines()
            if any(int(p) in pids for p in re.findall(r"pid=(\d+),", line))]
    host_port = view["host_url"].rsplit(":", 1)[1]
    assert any(f":{host_port} " in line for line in ours), "the session's host is not seen"
    assert len(ours) > 5, ours  # GCS, raylets, agents, workers, the pool, the host, ...
    for line in ours:
        local = line.split()[3]
        assert local.startswith(("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:")), line
    api(pool, "DELETE", f"/api/sessions/{session['id']}")


# --- waiting ---------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_simulated_request_waits_while_the_cluster_is_full_and_starts_when_gpus_free(
        notebook: BlockingKernelClient, pool: PoolProcess, cluster: RayCluster) -> None:
    both = api(pool, "POST", "/api/sessions", json={"hardware": "H100:2"})
    running(pool, both["id"])
    RAN.append(("H100", 2, cluster.head.node_id))
    assert cluster.available_gpus(cluster.head) == 0

    seen: dict[str, Any] = {}

    def on_message(m: Message) -> None:
        # Runs as the cell's messages arrive: while it waits, look, then free the GPUs.
        if "waiting for H100: you are next" in str(m.content) and not seen:
            row = hardware(pool)["H100"]
            seen["row"] = (row["free"], row["total"], row["queued"])
            # Ray's autoscaler is told: room for the running H100:2 and the waiting H100.
            wait_until(lambda: demand(cluster) == {("1.0", "H100"), ("2.0", "H100")}, 60,
                       "the running and the waiting sessions showing in `ray status`")
            api(pool, "DELETE", f"/api/sessions/{both['id']}")

    try:
        ex = run(notebook, "%%remote gpu=H100\nprint('got it')", timeout=150,
                 on_message=on_message)
    finally:
        api(pool, "DELETE", f"/api/sessions/{both['id']}")
    assert seen.get("row") == (0, 2, 1), (seen, ex.describe())
    assert ex.status == "ok", ex.describe()
    assert "got it" in ex.stream()
    RAN.append(("H100", 1, cluster.head.node_id))
    ok(notebook, "%remote shutdown --all")


@pytest.mark.timeout(60)
def test_simulated_request_no_node_could_ever_hold_fails_at_once(
        notebook: BlockingKernelClient, pool: PoolProcess) -> None:
    ex = run(notebook, "%%remote gpu=H100:3\nprint('never')")
    assert ex.status == "error"
    assert "can ever give `H100:3`" in ex.error_text() and "H100 x2" in ex.error_text()
    response = pool.request("POST", "/api/sessions", json={"hardware": "H200"})
    assert response.status_code == 409 and "H200" in response.json()["message"]


@pytest.mark.timeout(120)
def test_simulated_pool_killed_and_restarted_finds_its_ray_session_again(
        pool: PoolProcess, cluster: RayCluster) -> None:
    session = api(pool, "POST", "/api/sessions", json={"hardware": "H100"})
    before = running(pool, session["id"])
    RAN.append(("H100", 1, cluster.head.node_id))
    pool.kill()  # SIGKILL: the session's actor is detached, and outlives its pool
    pool.start()
    after = api(pool, "GET", f"/api/sessions/{session['id']}")
    assert after["state"] == "running", after
    assert (after["host_url"], after["kernel_id"]) == (before["host_url"], before["kernel_id"])
    assert hardware(pool)["H100"]["free"] == 1  # still taken, by the session found again
    assert len(cluster.session_actors()) == 1
    api(pool, "DELETE", f"/api/sessions/{session['id']}")
    wait_until(lambda: not cluster.session_actors(), 30, "the actor going")


# --- environments ----------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_simulated_environment_packages_reach_the_kernel_through_runtime_env(
        cluster: RayCluster, ray_dir: str) -> None:
    assert importlib.util.find_spec("inflection") is None, "must not be installed here"
    bad = "cloudgpu-no-such-package-xyz==0.0.1"
    done = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "ray_launch.py"), cluster.address,
         ENV_PACKAGE, bad], capture_output=True, text=True, timeout=220,
        env={**os.environ, "RAY_TMPDIR": ray_dir})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["status"] == "ok", report
    name, where, visible = report["output"]
    assert name == "CloudGpu"  # the package works in the kernel ...
    assert "runtime_resources/pip" in where  # ... from the environment Ray installed
    assert visible == "0" and report["placed_on"] == report["slot"] == cluster.a100.node_id
    assert report["lost"] == [], "stopping a session is not losing it"
    assert report["bad_error"] and "could not install the session's environment" in \
        report["bad_error"] and f"No matching distribution found for {bad}" in \
        report["bad_error"], report["bad_error"]
    assert not cluster.session_actors()
    wait_until(lambda: cluster.available_gpus(cluster.a100) == 1, 30, "Ray freeing the A100")


# --- a lost node -----------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_simulated_killing_a_node_ends_its_session_saying_the_node_was_lost(
        notebook: BlockingKernelClient, pool: PoolProcess, cluster: RayCluster) -> None:
    killed: list[str] = []

    def on_message(m: Message) -> None:
        # Runs as the cell's messages arrive: once it runs remotely, kill its node.
        if m.msg_type == "stream" and "started" in m.content.get("text", "") and not killed:
            # (The kernel is busy with the cell: ask the pool, not the kernel.)
            killed.extend(s["id"] for s in api(pool, "GET", "/api/sessions")["sessions"]
                          if s["gpu_type"] == "A100-80GB")
            cluster.kill_node(cluster.a100)

    ex = run(notebook, "%%remote gpu=A100-80GB\nimport time\nprint('started', flush=True)\n"
                       "time.sleep(120)", timeout=170, on_message=on_message)
    assert len(killed) == 1, ex.describe()
    sid = killed[0]
    assert ex.status == "error"
    assert re.search(r"Ray node it ran on \(127\.0\.0\.1, node [0-9a-f]+\) was lost",
                     ex.error_text()), ex.describe()
    RAN.append(("A100-80GB", 1, cluster.a100.node_id))

    view = api(pool, "GET", f"/api/sessions/{sid}")
    assert view["state"] == "stopped" and "was lost" in view["stop_reason"], view
    wait_until(lambda: hardware(pool)["A100-80GB"]["total"] == 0, 30,
               "the lost node's A100 leaving the hardware list")
    assert not cluster.alive(cluster.a100)
    response = pool.request("POST", "/api/sessions", json={"hardware": "A100-80GB"})
    assert response.status_code == 409, response.text  # no node has one any more


# --- the ledger ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_simulated_ledger_matches_what_ran_and_ray_holds_nothing_after(
        pool: PoolProcess, cluster: RayCluster) -> None:
    rows = [r for r in ledger(pool) if r["started"]]
    assert sorted((r["gpu_type"], r["count"], r["host_id"]) for r in rows) == sorted(RAN)
    prices = {t.name: t.price_per_hour for t in Catalog.default()}
    for r in rows:
        assert r["state"] in ENDED and r["ended"] >= r["started"], r
        assert math.isclose(r["rate_per_hour"], prices[r["gpu_type"]] * r["count"]), r
        assert r["simulated"] == (r["gpu_type"] != "cpu") and r["stop_reason"], r
    assert not [r for r in ledger(pool) if r["state"] not in ENDED]
    assert not cluster.session_actors()
    assert cluster.available_gpus(cluster.head) == 2
