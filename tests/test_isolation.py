"""Kernel isolation: two users' sessions on one host cannot see or reach each other.

Real processes and real sandboxes: a ``cloudgpu host --isolation=bubblewrap`` with
simulated GPUs (the one fake: there are no GPUs here), a static pool over it with two users
(alice and bob), and two local ipykernels with ``%load_ext cloudgpu``, one per user. From
inside bob's remote kernel the test tries the obvious routes to alice's: ``/proc``, the
host's folders, every connection file it can find, her sockets with her connection file's
own key, her scratch space. It also runs a cheap subset of the ``%%remote`` and Cloud GPU
kernel suites in the sandbox (the whole suites run sandboxed with
``CLOUDGPU_TEST_ISOLATION=bubblewrap``), and checks what a shared pool says and refuses
about hosts that do not isolate.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cloudgpu.remote_host.host.agent import limit_note
from cloudgpu.remote_host.host.inventory import Device, Inventory
from cloudgpu.remote_host.host.sandbox import BubblewrapSandbox, Limits
from cloudgpu.remote_host.host.sandbox.bubblewrap import (
    NVIDIA_CONTROL,
    Plan,
    bwrap_argv,
    device_nodes,
)
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager
from kernel_driver import (
    CLIENT,
    HOST_PID,
    Message,
    ok,
    run,
    shell_reply,
    start_kernel,
    stop_kernel,
    value,
)
from servers import HostFactory, HostProcess, PoolProcess, wait_until

from cloudgpu.errors import HostStartError

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("bwrap") is None,
                       reason="bubblewrap is not installed (apt-get install bubblewrap)"),
]

MEMORY = "400M"
POOL_CONFIG = """\
c.PoolApp.users = {users!r}
c.PoolApp.warm_kernels = {{}}
c.PoolApp.cull_interval = 0.5
c.PoolApp.meter_interval = 0.5
c.PoolApp.heartbeat_interval = 1
"""


@pytest.fixture(scope="module")
def sandboxed(host_factory: HostFactory) -> HostProcess:
    """A host whose kernels run in bubblewrap sandboxes, 400 MiB of memory each."""
    return host_factory.start("H100:2", name="sandboxed", args=[
        "--isolation=bubblewrap", f"--Sandbox.memory_limit={MEMORY}"])


@pytest.fixture(scope="module")
def tokens() -> dict[str, str]:
    return {"alice": secrets.token_hex(24), "bob": secrets.token_hex(24)}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, sandboxed: HostProcess,
         tokens: dict[str, str]) -> Iterator[PoolProcess]:
    """A static pool of two users over the sandboxed host: shared, so it would refuse a
    host that does not isolate (it accepts this one without being told to)."""
    tmp = tmp_path_factory.mktemp("isolation")
    config = tmp / "pool_config.py"
    config.write_text(POOL_CONFIG.format(users={t: n for n, t in tokens.items()}))
    started = PoolProcess(tmp, [sandboxed], config, allow_unisolated=False).start()
    yield started
    started.stop()


def notebook(pool: PoolProcess, token: str) -> Iterator[tuple[KernelManager,
                                                              BlockingKernelClient]]:
    km, kc = start_kernel(CLOUDGPU_POOL=pool.url, CLOUDGPU_TOKEN=token)
    try:
        ok(kc, "%load_ext cloudgpu")
        yield km, kc
    finally:
        stop_kernel(km, kc)


@pytest.fixture(scope="module")
def alice(pool: PoolProcess, tokens: dict[str, str]) -> Iterator[BlockingKernelClient]:
    for _, kc in notebook(pool, tokens["alice"]):
        yield kc


@pytest.fixture(scope="module")
def bob_notebook(pool: PoolProcess, tokens: dict[str, str],
                 ) -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    yield from notebook(pool, tokens["bob"])


@pytest.fixture
def bob(bob_notebook: tuple[KernelManager, BlockingKernelClient]) -> BlockingKernelClient:
    return bob_notebook[1]


def remote(kc: BlockingKernelClient, what: str, spec: str = "H100") -> Any:
    """What the notebook's client knows of its session on ``spec``."""
    return value(kc, f"{CLIENT}.sessions[{spec!r}].{what}")


def host_uid(pid: int) -> int:
    """The real uid of a process, as the host sees it."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


# --- two users, one host ---------------------------------------------------------------------

PLANT = """\
%%remote gpu=H100 --no-pull
import os, pathlib
secret = 'alice-' + os.urandom(8).hex()
for where in ('~/secret.txt', '/tmp/secret.txt', '/dev/shm/secret.txt'):
    pathlib.Path(where).expanduser().write_text(secret)
"""

#: Run in bob's remote kernel with alice's pid, folder and connection file pushed to it.
PROBE = """\
%%remote gpu=H100
import json, os, socket, pathlib
found = {'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),
         'alice_pid_seen': os.path.exists(f'/proc/{a_pid}'),
         'cmdlines': [open(f'/proc/{p}/cmdline', 'rb').read().decode(errors='replace')
                      for p in os.listdir('/proc') if p.isdigit()],
         'uid': os.getuid(), 'devices': sorted(os.listdir('/dev')),
         'cuda': os.environ.get('CUDA_VISIBLE_DEVICES'),
         'host_env': [k for k in a_host_env if k in os.environ],
         'folders_seen': [p for p in a_folders if os.path.exists(p)]}
# Every connection file this kernel can read, anywhere.
conns = []
for root, dirs, files in os.walk('/'):
    if root in ('/proc', '/sys', '/dev'):
        dirs[:] = []
        continue
    for name in files:
        path = os.path.join(root, name)
        if name.endswith('.json') and os.path.isfile(path):
            try:
                text = open(path, errors='replace').read(200_000)
            except OSError:
                continue
            if '"signature_scheme"' in text and '"key"' in text:
                conns.append(path)
found['connection_files'] = conns
# Alice's sockets, by the paths her own connection file gives them.
ports = ('shell_port', 'iopub_port', 'stdin_port', 'control_port', 'hb_port')
found['sockets_seen'] = [p for p in ports if os.path.exists(f"{a_conn['ip']}-{a_conn[p]}")]
try:
    s = socket.socket(socket.AF_UNIX)
    s.connect(f"{a_conn['ip']}-{a_conn['shell_port']}")
    found['connect'] = 'connected'
except OSError as e:
    found['connect'] = f'{type(e).__name__}: {e.errno}'
# Her connection file, key included, handed to jupyter_client.
from jupyter_client.blocking.client import BlockingKernelClient
kc = BlockingKernelClient()
kc.load_connection_info(a_conn)
kc.start_channels()
try:
    kc.kernel_info(reply=True, timeout=3)
    found['kernel_info'] = 'answered'
except Exception as e:
    found['kernel_info'] = f'no answer ({type(e).__name__})'
kc.stop_channels()
# Her scratch: as bob's own paths, and through /proc.
found['scratch_seen'] = [w for w in ('~/secret.txt', '/tmp/secret.txt', '/dev/shm/secret.txt')
                         if pathlib.Path(w).expanduser().exists()]
pathlib.Path('~/secret.txt').expanduser().write_text('bob was here')
try:
    open(f'/proc/{a_pid}/root/home/cloudgpu/secret.txt', 'w').write('bob was here')
    found['wrote_into_hers'] = True
except OSError as e:
    found['wrote_into_hers'] = f'{type(e).__name__}'
"""


@pytest.mark.timeout(180)
def test_simulated_gpu_sessions_of_two_users_cannot_see_or_reach_each_other(
        alice: BlockingKernelClient, bob: BlockingKernelClient, sandboxed: HostProcess,
        pool: PoolProcess, tokens: dict[str, str]) -> None:
    ok(alice, PLANT, timeout=90)
    a_kernel, a_pid = remote(alice, "grant.kernel_id"), remote(alice, "remote['pid']")
    # From the host, alice's kernel is real and its connection file answers (so bob's
    # failures below are the sandbox's doing, not a bad address or key).
    (a_folder,) = Path(tempfile.gettempdir()).glob(f"cgh-*/{a_kernel}")
    (a_file,) = a_folder.parent.glob(f"kernel-{a_kernel}.json")
    a_conn = json.loads(a_file.read_text())
    assert a_conn["transport"] == "ipc" and a_conn["ip"].startswith(str(a_folder))
    host_side = BlockingKernelClient()
    host_side.load_connection_info(a_conn)
    host_side.start_channels()
    try:
        assert host_side.kernel_info(reply=True, timeout=30)["content"]["status"] == "ok"
    finally:
        host_side.stop_channels()

    ok(bob, f"a_pid = {a_pid}\na_conn = {a_conn!r}\n"
            f"a_folders = {[str(a_folder), str(a_folder.parent), os.environ['JUPYTER_RUNTIME_DIR'], str(sandboxed.info.parent)]!r}\n"  # noqa: E501
            f"a_host_env = {['JUPYTER_RUNTIME_DIR', 'JUPYTER_DATA_DIR', 'CLOUDGPU_SIMULATE']!r}")
    ok(bob, PROBE, timeout=120)
    found = value(bob, "found")
    b_pid = remote(bob, "remote['pid']")

    # Processes: bob's kernel sees its own sandbox's (bwrap's init, itself, what it started).
    assert not found["alice_pid_seen"] and a_pid != b_pid
    assert len(found["pids"]) <= 4 and 1 in found["pids"], found["pids"]
    assert all(a_kernel not in c for c in found["cmdlines"]), found["cmdlines"]
    # Connection files: its own only (the search does find that one), none of alice's.
    assert found["connection_files"] == ["/run/cloudgpu/kernel.json"], found
    assert found["folders_seen"] == [] and found["host_env"] == []
    # Sockets: alice's are not there, so neither a raw connect nor jupyter_client with her
    # own key reaches her kernel.
    assert found["sockets_seen"] == []
    assert found["connect"] == f"FileNotFoundError: {errno.ENOENT}", found["connect"]
    assert found["kernel_info"].startswith("no answer"), found["kernel_info"]
    # Scratch: bob's home, /tmp and /dev/shm are his own; alice's cannot be written.
    assert found["scratch_seen"] == [] and found["wrote_into_hers"] == "FileNotFoundError"
    check = ok(alice, "%%remote gpu=H100\nimport pathlib\n"
                      "print(all(pathlib.Path(w).expanduser().read_text() == secret for w in "
                      "('~/secret.txt', '/tmp/secret.txt', '/dev/shm/secret.txt')))\n")
    assert check.stream() == "True\n"
    # GPUs: each sees its own device only, and no other device node.
    assert found["cuda"] != remote(alice, "remote['cuda_visible_devices']")
    assert not [d for d in found["devices"] if d.startswith("nvidia")], found["devices"]
    # Users: uid 1000 inside; on the host, two unprivileged uids of their own.
    assert found["uid"] == 1000
    if os.geteuid() == 0:
        uids = {host_uid(a_pid), host_uid(b_pid)}
        assert len(uids) == 2 and min(uids) >= BubblewrapSandbox.first_uid.default_value
    # And the pool shows both sessions as isolated.
    for user in ("alice", "bob"):
        sessions = pool.request("GET", "/api/sessions", token=tokens[user]).json()["sessions"]
        assert [(s["isolation"], s["isolation_warning"]) for s in sessions
                if s["gpu_type"] == "H100"] == [("bubblewrap", None)]


@pytest.mark.timeout(180)
def test_a_session_over_its_memory_limit_ends_saying_so_while_its_neighbour_keeps_working(
        alice: BlockingKernelClient, bob: BlockingKernelClient, sandboxed: HostProcess) -> None:
    ok(bob, "%%remote gpu=H100 --no-pull\nkept = 41", timeout=90)
    b_pid = remote(bob, "remote['pid']")
    ok(alice, "%%remote gpu=H100\nprint('up')", timeout=90)
    a_kernel = remote(alice, "grant.kernel_id")
    ex = run(alice, "%%remote gpu=H100\n"
                    "hog = bytearray(1024 * 2**20)\n"
                    "hog[::4096] = b'x' * len(hog[::4096])\n"
                    "print('it fit')", timeout=90)
    assert ex.status == "error", ex.describe()
    text = ex.error_text()
    assert "it fit" not in ex.stream()
    how = sandboxed.get("/api/cloudgpu/host").json()["isolation"]["limits"]["memory"]
    if how.startswith("cgroup"):  # the kernel was killed, and its GPU is free at once
        assert f"it went over its memory limit of 400 MiB ({how})" in text, text
        wait_until(lambda: all(g["kernel_id"] != a_kernel for g in sandboxed.gpus()),
                   within=20, what="alice's simulated H100 being freed")
    else:  # an address-space limit: the allocation failed, and the cell says which limit
        assert "MemoryError" in text and "memory limit is 400 MiB" in text, text
    # Her neighbour never noticed.
    again = ok(bob, "%%remote gpu=H100\nprint(kept + 1)")
    assert again.stream() == "42\n" and remote(bob, "remote['pid']") == b_pid


#: Read in the remote kernel: its spare 8 MB receive buffers, those it declined to make,
#: and the room it has before it nears its memory limit.
SPARES_THERE = ("from cloudgpu._spares import SPARES as _s\n"
                "spares = (_s.ready().get(8_000_000, 0), _s.declined, _s.room())")


def test_a_sandboxed_kernel_near_its_memory_limit_makes_no_spare_receive_buffers(
        alice: BlockingKernelClient) -> None:
    def there() -> tuple[int, int, int]:
        ok(alice, "%%remote gpu=H100\n" + SPARES_THERE, timeout=90)
        ready, declined, room = value(alice, "spares")
        return ready, declined, room

    def push_x(times: int) -> None:  # values of one shape: spares are made for them
        for _ in range(times):
            ok(alice, "x = np.random.rand(1_000_000)")
            ok(alice, "%%remote gpu=H100 --no-pull\nfirst = float(x[0])")

    ok(alice, "import numpy as np")
    _, declined, room = there()
    assert 0 < room < 400 * 2**20 * 7 // 8, room  # the limit, less an eighth kept free
    # Take all but 4 MiB of that room, and send 8 MB values over and over.
    hog = max(room - 4 * 2**20, 0)
    ok(alice, f"%%remote gpu=H100 --no-pull\nhog = bytearray({hog})\n"
              "hog[::4096] = b'x' * len(hog[::4096])", timeout=90)
    push_x(3)
    wait_until(lambda: there()[1] > declined, within=60,
               what="the kernel declining a spare it has no room for")
    assert there()[0] == 0
    # With the room back, the same values get their spare.
    ok(alice, "%%remote gpu=H100 --no-pull\ndel hog")
    push_x(2)
    wait_until(lambda: there()[0] >= 1, within=60, what="a spare 8 MB buffer, room being back")


def test_a_cell_that_fills_its_scratch_space_or_asks_too_much_says_which_limit(
        alice: BlockingKernelClient) -> None:
    ex = run(alice, "%%remote gpu=cpu\n"
                    "with open('/tmp/fill', 'wb') as f:\n"
                    "    for _ in range(1024):\n"
                    "        f.write(b'x' * 2**20)\n", timeout=90)
    assert ex.status == "error", ex.describe()
    assert "No space left on device" in ex.error_text()
    assert "scratch space is full: its home, /tmp and /dev/shm hold 200 MiB each" in \
        ex.error_text()
    ex = run(alice, "%%remote gpu=cpu\nimport os\nos.remove('/tmp/fill')\nbytearray(2**50)")
    assert "MemoryError" in ex.error_text() and "memory limit is 400 MiB" in ex.error_text()
    assert ok(alice, "%%remote gpu=cpu\nprint('fine')").stream() == "fine\n"


# --- the %%remote and Cloud GPU kernel suites, a cheap subset, in the sandbox -----------------


def test_remote_cells_stream_move_numpy_and_interrupt_inside_the_sandbox(
        bob_notebook: tuple[KernelManager, BlockingKernelClient]) -> None:
    km, bob = bob_notebook
    ok(bob, "import numpy as np\nx = np.arange(1_000_000, dtype=np.float64)")
    ex = ok(bob, "%%remote gpu=cpu\nimport time\nprint('before', flush=True)\n"
                 "time.sleep(1)\nprint('after')\ny = x * 2\n", timeout=90)
    arrived = ex.arrivals()
    assert arrived["after"] - arrived["before"] >= 0.9
    assert value(bob, "float(y.sum() / x.sum())") == 2.0
    pid = remote(bob, "remote['pid']", "cpu")
    interrupted: list[float] = []

    def interrupt(m: Message) -> None:
        if m.msg_type == "stream" and "sleeping" in m.content["text"] and not interrupted:
            interrupted.append(time.monotonic())
            km.interrupt_kernel()

    ex = run(bob, "%%remote gpu=cpu\nimport time\nprint('sleeping', flush=True)\n"
                  "time.sleep(30)\n", timeout=25, on_message=interrupt)
    assert interrupted and ex.status == "error" and "KeyboardInterrupt" in ex.error_text()
    assert ok(bob, "%%remote gpu=cpu\nprint('still here')").stream() == "still here\n"
    assert remote(bob, "remote['pid']", "cpu") == pid


@pytest.fixture(scope="module")
def cloud_gpu_kernel(pool: PoolProcess, tokens: dict[str, str],
                     tmp_path_factory: pytest.TempPathFactory,
                     ) -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    """A Cloud GPU (CPU) kernel of bob's, on the sandboxed host."""
    from cloudgpu.kernel import install_kernelspecs

    prefix = tmp_path_factory.mktemp("kernel-prefix")
    install_kernelspecs([], prefix=str(prefix))
    saved = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [str(prefix / "share" / "jupyter"), *filter(None, [saved])])
    try:
        km, kc = start_kernel("cloudgpu-cpu", CLOUDGPU_POOL=pool.url,
                              CLOUDGPU_TOKEN=tokens["bob"])
        try:
            ok(kc, "pass", timeout=90)
            yield km, kc
        finally:
            stop_kernel(km, kc)
    finally:
        if saved is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = saved


def test_the_cloud_gpu_kernel_runs_widgets_interrupts_and_restarts_inside_the_sandbox(
        cloud_gpu_kernel: tuple[KernelManager, BlockingKernelClient]) -> None:
    km, kc = cloud_gpu_kernel
    assert value(kc, "__import__('os').environ['CLOUDGPU_ISOLATION']") == "bubblewrap"
    ex = ok(kc, "import ipywidgets\nslider = ipywidgets.IntSlider(value=3)\nslider")
    (opened,) = [m for m in ex.of("comm_open")
                 if m.content["data"]["state"].get("_model_name") == "IntSliderModel"]
    kc.shell_channel.send(kc.session.msg("comm_msg", {
        "comm_id": opened.content["comm_id"],
        "data": {"method": "update", "state": {"value": 7}, "buffer_paths": []}}))
    assert ok(kc, "print(slider.value)").stream() == "7\n"

    msg_id = kc.execute("import time\nprint('sleeping', flush=True)\ntime.sleep(60)")
    while not (msg := kc.get_iopub_msg(timeout=30))["msg_type"] == "stream" or \
            msg["parent_header"].get("msg_id") != msg_id:
        pass
    km.interrupt_kernel()
    reply = shell_reply(kc, msg_id, time.monotonic() + 20)["content"]
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"

    pid = value(kc, HOST_PID)
    km.restart_kernel()
    kc.wait_for_ready(timeout=60)
    assert run(kc, "slider", timeout=90).reply["ename"] == "NameError"
    assert value(kc, HOST_PID) != pid


def test_a_kernel_restarted_through_the_host_api_comes_back_in_a_fresh_sandbox(
        sandboxed: HostProcess) -> None:
    import asyncio

    from cloudgpu.host_client import HostClient
    from cloudgpu.provider import Grant
    from cloudgpu.session import RemoteSession

    async def cell(session: RemoteSession, code: str) -> str:
        out: list[str] = []
        result = await session.run_cell(code, {}, [], lambda kind, msg: out.append(
            msg["content"].get("text", "")))
        assert result.status == "ok", out
        return "".join(out)

    async def go() -> tuple[str, str]:
        async with HostClient(sandboxed.url, sandboxed.token) as client:
            model = await client.start_kernel("cpu")
            grant = Grant(sandboxed.url, sandboxed.token, model["id"], "cpu")
            session = await RemoteSession.open(grant)
            before = await cell(session, f"kept = 1\nopen('/tmp/mark', 'w').close()\n"
                                         f"print({HOST_PID})")
            await session.close()
            await client.request("POST", f"/api/kernels/{model['id']}/restart")
            session = await RemoteSession.open(grant)
            after = await cell(session, "import os\nprint('kept' in globals(), "
                                        f"os.path.exists('/tmp/mark'), os.getuid(), {HOST_PID})")
            await session.close(shutdown=True)
            return before, after

    before, after = asyncio.run(go())
    kept, marked, uid, pid = after.split()
    # A new process in a new sandbox (scratch starts empty), same kernel id, same uid.
    assert (kept, marked, uid) == ("False", "False", "1000") and pid != before.strip()


# --- what hosts and shared pools refuse, and say -----------------------------------------------


def host_refusal(*args: str) -> str:
    """A host started with ``args`` that must refuse to start: what it said."""
    out = subprocess.run([sys.executable, "-m", "cloudgpu", "host", "--port=0", *args],
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, CLOUDGPU_HOST_TOKEN=secrets.token_hex(24)))
    assert out.returncode == 1, out
    return out.stderr


def test_a_host_beyond_loopback_refuses_to_run_kernels_unisolated_unless_told() -> None:
    # Refused before it listens: nothing ever binds beyond loopback here.
    said = host_refusal("--ip=0.0.0.0")
    assert "beyond loopback" in said and "--isolation=bubblewrap" in said, said
    assert "--isolation=none to run them unisolated on purpose" in said
    said = host_refusal("--isolation=nonesuch")
    assert "Unknown isolation `nonesuch`. Installed: bubblewrap, docker, none, podman" in said


@pytest.mark.parametrize("engine", ["podman", "docker"])
def test_a_container_isolation_without_its_engine_or_image_is_refused_saying_why(
        engine: str) -> None:
    said = host_refusal(f"--isolation={engine}")
    assert f"--isolation={engine}" in said, said
    assert any(why in said for why in (f"needs `{engine}` on PATH", "does not answer",
                                       "needs an image")), said


@pytest.mark.parametrize("engine", ["podman", "docker"])
def test_a_kernel_runs_in_a_container_where_the_engine_exists(
        engine: str, host_factory: HostFactory) -> None:
    image = os.environ.get("CLOUDGPU_TEST_CONTAINER_IMAGE", "")
    if shutil.which(engine) is None:
        pytest.skip(f"no {engine} here: container isolation is tested where the engine exists")
    info = subprocess.run([engine, "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        pytest.skip(f"the {engine} CLI is here but no engine answers: "
                    f"{(info.stderr.strip().splitlines() or ['?'])[-1]}")
    if not image:
        pytest.skip("set CLOUDGPU_TEST_CONTAINER_IMAGE to an image with Python, ipykernel "
                    "and this cloudgpu")
    cls = {"podman": "PodmanSandbox", "docker": "DockerSandbox"}[engine]
    started = host_factory.start(None, name=f"in-{engine}", args=[
        f"--isolation={engine}", f"--{cls}.image={image}"])
    try:
        response = httpx.post(f"{started.url}/api/cloudgpu/kernels", json={"hardware": "cpu"},
                              headers={"Authorization": f"token {started.token}"}, timeout=120)
        assert response.status_code == 201, response.text
        model = response.json()
        assert model["cloudgpu"]["isolation"] == engine
        wait_until(lambda: started.get(f"/api/kernels/{model['id']}").json()
                   .get("execution_state") == "idle", within=90, what="the container kernel")
        started.delete_kernel(model["id"])
    finally:
        started.stop()


def test_a_shared_pool_refuses_unisolated_hosts_unless_allowed_and_then_says_so(
        host_factory: HostFactory, tmp_path: Path, tokens: dict[str, str]) -> None:
    plain = host_factory.start("H100:1", name="plain", args=["--isolation=none"])
    config = tmp_path / "pool_config.py"
    config.write_text(POOL_CONFIG.format(users={t: n for n, t in tokens.items()}))
    refused = PoolProcess(tmp_path, [plain], config, name="strict", allow_unisolated=False)
    with pytest.raises(HostStartError):
        refused.start()
    said = refused.log.read_text()
    assert "runs kernels without isolation (none)" in said, said
    assert "--isolation=bubblewrap" in said and "--allow-unisolated" in said

    allowed = PoolProcess(tmp_path, [plain], config, name="lax", allow_unisolated=True).start()
    try:
        created = allowed.request("POST", "/api/sessions", token=tokens["alice"],
                                  json={"hardware": "H100"}).json()
        def view_now() -> dict[str, Any]:
            return allowed.request("GET", f"/api/sessions/{created['id']}",
                                   token=tokens["alice"]).json()

        wait_until(lambda: view_now()["state"] == "running", what="alice's session running")
        view = view_now()
        assert view["isolation"] == "none"
        assert view["isolation_warning"].startswith("not isolated")
        from cloudgpu.magics import _report

        text = _report.status([view], {view["id"]})
        assert "1x H100 (simulated) (not isolated)" in text and "! not isolated" in text
        hardware = allowed.request("GET", "/api/hardware", token=tokens["bob"]).json()
        h100 = next(t for t in hardware["hardware"] if t["type"] == "H100")
        assert h100["not_isolated"] is True
        assert "(not isolated)" in _report.hardware([h100])
    finally:
        allowed.stop()


# --- the pieces, without processes ----------------------------------------------------------


def real_gpu(index: int) -> Device:
    return Device(index, "H100", "NVIDIA H100 80GB HBM3", 80.0, f"GPU-{index:08x}", False)


def test_a_sandbox_binds_only_its_own_gpus_device_nodes_and_names_them_by_uuid() -> None:
    mine, theirs = real_gpu(1), real_gpu(0)
    minors = {mine.uuid: 3, theirs.uuid: 0}  # NVML's minor numbers need not be the indices
    nodes = device_nodes([mine], lambda d: minors[d.uuid])
    assert nodes == ["/dev/nvidia3"]
    plan = Plan(command=["python"], env={"CUDA_VISIBLE_DEVICES": mine.uuid},
                socket_dir="/tmp/k", python=[], extra=[], devices=nodes, scratch_bytes=None,
                share_network=False, hostname="h", etc_dir="/tmp/etc")
    argv = bwrap_argv(plan, "bwrap", 3, 4)
    binds = [argv[i + 1] for i, a in enumerate(argv) if a in ("--dev-bind", "--dev-bind-try")]
    assert binds == ["/dev/nvidia3", *NVIDIA_CONTROL]
    assert "/dev/nvidia0" not in argv and "--share-net" not in argv
    assert argv[argv.index("CUDA_VISIBLE_DEVICES") + 1] == mine.uuid
    assert device_nodes([Device(0, "H100", "simulated H100", 80, "SIM-H100-0", True)],
                        lambda d: 0) == []


def test_default_limits_are_a_fair_share_of_the_machine() -> None:
    inventory = Inventory([real_gpu(i) for i in range(4)], cpu_count=16)
    sandbox = BubblewrapSandbox()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    two = sandbox.limits_for(inventory.devices[:2], 0, inventory)
    assert two == Limits(memory // 2, 8.0, memory // 4, 4096)
    sandbox.memory_limit, sandbox.scratch_size, sandbox.cpus_per_gpu = "8G", "none", 2
    assert sandbox.limits_for(inventory.devices[:1], 0, inventory) == \
        Limits(8 * 2**30, 2.0, None, 4096)
    assert sandbox.limits_for([], 4, inventory).cpus == 4.0


def test_the_agent_names_the_limit_a_failed_cell_ran_into() -> None:
    limits = {"memory": "400 MiB (cgroup v1 memory controller)", "scratch": "200 MiB"}
    assert "memory limit is 400 MiB (cgroup v1 memory controller); use less" in \
        (limit_note(MemoryError(), limits) or "")
    assert "/dev/shm hold 200 MiB each" in \
        (limit_note(OSError(errno.ENOSPC, "No space left on device"), limits) or "")
    assert limit_note(OSError(errno.ENOENT, "gone"), limits) is None
    assert limit_note(ZeroDivisionError(), limits) is None


@pytest.mark.gpu
def test_a_sandboxed_kernel_opens_its_own_real_gpu_and_no_other(
        host_factory: HostFactory) -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except pynvml.NVMLError as e:
        pytest.skip(f"no NVIDIA driver here ({e}); a real GPU in a sandbox needs one")
    import asyncio

    from cloudgpu.host_client import HostClient
    from cloudgpu.provider import Grant
    from cloudgpu.session import RemoteSession

    started = host_factory.start(None, name="real-gpus", args=["--isolation=bubblewrap"])

    async def go() -> list[str]:
        async with HostClient(started.url, started.token) as client:
            model = await client.start_kernel("any")
            (gpu,) = model["cloudgpu"]["gpus"]
            grant = Grant(started.url, started.token, model["id"], "any", [gpu], False)
            session = await RemoteSession.open(grant)
            out: list[str] = []
            result = await session.run_cell(
                "import os, glob\n"
                "nodes = sorted(glob.glob('/dev/nvidia[0-9]*'))\n"
                "os.close(os.open(nodes[0], os.O_RDWR))\n"
                "print(os.environ['CUDA_VISIBLE_DEVICES'], *nodes)", {}, [],
                lambda kind, msg: out.append(msg["content"].get("text", "")))
            assert result.status == "ok", out
            await session.close(shutdown=True)
            return [gpu["uuid"], *"".join(out).split()]

    uuid, visible, *nodes = asyncio.run(go())
    assert visible == uuid and len(nodes) == 1, (visible, nodes)  # its own node, opened
