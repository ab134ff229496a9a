"""Tests for the Cloud GPU kernel, driven as frontends drive it: jupyter_client and nbclient.

The kernelspecs are installed (into a temporary prefix that JUPYTER_PATH points at) and
started by name, so each test runs the real ``python -m cloudgpu.kernel`` proxy process,
which gets its remote kernels from the test session's private local pool. The only fake
is the GPU: the pool's host has a simulated inventory (``CLOUDGPU_SIMULATE``,
``H100:1,A100-80GB:1``), which is why hardware names show "(simulated)".

Most tests share one proxy kernel (module scope); the conformance suite, the notebook
run and the failure tests start their own. Remote processes are real, so "the GPU was
released" is checked as "the remote kernel process is gone".
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jupyter_kernel_test
import nbformat
import pytest
from cloudgpu.remote_host.pool.ledger import Ledger, SessionRecord
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager
from jupyter_core.paths import jupyter_runtime_dir
from kernel_driver import HOST_PID, ok, run, shell_reply, start_kernel, stop_kernel, value
from nbclient import NotebookClient
from servers import HostFactory, PoolProcess, wait_for_jupyter_server, wait_until

from cloudgpu import _process

SIMULATE = "H100:1,A100-80GB:1"


# --- kernelspecs in a private prefix -----------------------------------------


@pytest.fixture(scope="module", autouse=True)
def installed_kernelspecs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Install the CPU and H100 kernelspecs under a temporary prefix Jupyter searches."""
    from cloudgpu.kernel import install_kernelspecs

    prefix = tmp_path_factory.mktemp("kernel-prefix")
    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "CLOUDGPU_SIMULATE")}
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [str(prefix / "share" / "jupyter"), *filter(None, [saved["JUPYTER_PATH"]])])
    os.environ.setdefault("CLOUDGPU_SIMULATE", SIMULATE)
    install_kernelspecs(["H100"], prefix=str(prefix))
    try:
        yield prefix
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


# --- driving a kernel (tests/kernel_driver.py does most of it) ------------------


def status(kc: BlockingKernelClient) -> dict[str, str]:
    """``%cloudgpu status`` as a dict of its ``key: value`` lines."""
    text = ok(kc, "%cloudgpu status").stream()
    return dict(re.findall(r"^(\w+):\s+(.*)$", text, re.MULTILINE))


@pytest.fixture(scope="module")
def kernel() -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    """One Cloud GPU (CPU) kernel shared by the module's tests, remote kernel started."""
    km, kc = start_kernel("cloudgpu-cpu")
    try:
        ok(kc, "pass", timeout=90)
        yield km, kc
    finally:
        stop_kernel(km, kc)


@pytest.fixture
def kc(kernel: tuple[KernelManager, BlockingKernelClient]) -> BlockingKernelClient:
    return kernel[1]


# --- kernelspecs -----------------------------------------------------------------


@pytest.mark.parametrize(("spec", "name", "display"), [
    ("h100", "cloudgpu-h100", "Cloud GPU (H100)"),
    ("A100-80GB:2", "cloudgpu-a100-80gb-x2", "Cloud GPU (A100-80GB x2)"),
    ("cpu", "cloudgpu-cpu", "Cloud GPU (CPU)"),
    ("cpu:4", "cloudgpu-cpu-x4", "Cloud GPU (CPU x4)"),
    ("H100|A100-80GB", "cloudgpu-h100-or-a100-80gb", "Cloud GPU (H100 or A100-80GB)"),
    ("any", "cloudgpu-any", "Cloud GPU (any GPU)"),
])
def test_kernelspec_names_are_namespaced_and_say_the_hardware(spec: str, name: str,
                                                              display: str) -> None:
    from cloudgpu.kernel import kernelspec_name
    from cloudgpu.kernel.kernelspec import display_name

    from cloudgpu.hardware import parse_spec

    assert kernelspec_name(parse_spec(spec)) == name
    assert display_name(parse_spec(spec)) == display


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from cloudgpu.kernel import main; main(sys.argv[1:])",
         *args], check=False, capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.timeout(60)
def test_cli_installs_one_kernelspec_per_hardware_and_lists_and_removes_them(
        tmp_path: Path) -> None:
    env = {**os.environ, "JUPYTER_DATA_DIR": str(tmp_path / "data"), "JUPYTER_PATH": ""}
    out = cli("install", "--hardware", "H100", "--hardware", "A100-80GB:2", "--user", env=env)
    assert out.returncode == 0, out.stderr
    kernels = tmp_path / "data" / "kernels"
    assert sorted(p.name for p in kernels.iterdir()) == [
        "cloudgpu-a100-80gb-x2", "cloudgpu-cpu", "cloudgpu-h100"]
    spec = json.loads((kernels / "cloudgpu-a100-80gb-x2" / "kernel.json").read_text())
    assert spec["display_name"] == "Cloud GPU (A100-80GB x2)"
    assert spec["metadata"]["cloudgpu"] == {"hardware": "A100-80GB:2"}
    assert spec["argv"] == [sys.executable, "-m", "cloudgpu.kernel", "-f", "{connection_file}",
                            "--hardware", "A100-80GB:2"]
    assert json.loads((kernels / "cloudgpu-cpu" / "kernel.json").read_text())[
        "display_name"] == "Cloud GPU (CPU)"

    listed = cli("list", env=env).stdout
    assert re.search(r"cloudgpu-h100\s+Cloud GPU \(H100\)\s+H100\s", listed), listed

    assert cli("remove", "--hardware", "h100", env=env).returncode == 0
    assert not (kernels / "cloudgpu-h100").exists()
    assert cli("remove", "--all", env=env).returncode == 0
    assert list(kernels.iterdir()) == []
    assert "No Cloud GPU kernels installed" in cli("list", env=env).stdout

    bad = cli("install", "--hardware", "H1000", "--user", env=env)
    assert bad.returncode == 2
    assert "Unknown GPU `H1000`" in bad.stderr and "H100" in bad.stderr
    assert not kernels.exists() or list(kernels.iterdir()) == []
    missing = cli("remove", "cloudgpu-h100", env=env)
    assert missing.returncode == 2 and "No Cloud GPU kernel named `cloudgpu-h100`" in missing.stderr


# --- a whole notebook --------------------------------------------------------------


@pytest.mark.timeout(120)
def test_notebook_runs_end_to_end_on_simulated_h100_kernel() -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "cloudgpu-h100", "display_name": "Cloud GPU (H100)",
                                 "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell("import os\nprint(os.environ['CLOUDGPU_SIMULATED_GPUS'])"),
        nbformat.v4.new_code_cell("squares = [n * n for n in range(5)]\nsum(squares)"),
        nbformat.v4.new_code_cell("from IPython.display import HTML\nHTML('<b>bold</b>')"),
        nbformat.v4.new_code_cell("%cloudgpu status"),
    ]
    NotebookClient(nb, timeout=60, startup_timeout=60).execute()  # picks the kernel by name
    first, result, html, cloud = (cell.outputs for cell in nb.cells)
    streams = {o.name: o.text for o in first if o.output_type == "stream"}
    assert streams["stdout"] == "H100\n"
    # The first cell waited for the remote kernel and said so as it happened.
    assert re.search(r"cloudgpu: ready on 1x H100 \(simulated\) in [\d.]+ s", streams["stderr"])
    assert result[0].data["text/plain"] == "30"
    assert html[0].data["text/html"] == "<b>bold</b>"
    assert "hardware: 1x H100 (simulated)" in cloud[0].text
    assert [c.execution_count for c in nb.cells[:3]] == [1, 2, 3]


@pytest.mark.timeout(120)
def test_a_cell_waiting_for_a_busy_simulated_h100_shows_the_queue_and_can_be_interrupted(
        ) -> None:
    first = start_kernel("cloudgpu-h100")
    second = None
    try:
        ok(first[1], "pass", timeout=90)  # holds the pool's only (simulated) H100
        second = start_kernel("cloudgpu-h100")
        km, kc = second
        msg_id = kc.execute("print('my turn')")
        seen: list[dict[str, Any]] = []
        while not any("waiting for H100" in m["content"].get("text", "") for m in seen):
            msg = kc.get_iopub_msg(timeout=30)
            if msg["parent_header"].get("msg_id") == msg_id:
                seen.append(msg)
        assert seen[0]["content"] == {"execution_state": "busy"}
        km.interrupt_kernel()
        reply = shell_reply(kc, msg_id, time.monotonic() + 20)["content"]
        assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
        assert "the cell did not run" in reply["evalue"]

        stop_kernel(*first)  # frees the H100: the waiting kernel gets it
        assert ok(kc, "print('my turn')", timeout=90).stream() == "my turn\n"
        assert status(kc)["hardware"] == "1x H100 (simulated)"
    finally:
        stop_kernel(*first)
        if second is not None:
            stop_kernel(*second)


@pytest.mark.timeout(120)
def test_jupyter_server_runs_the_kernel_as_jupyterlab_would(tmp_path: Path) -> None:
    """Through Jupyter Server's REST API and kernel websocket: the JupyterLab path."""
    import asyncio
    import secrets
    import uuid

    from cloudgpu import _wire
    from cloudgpu.host_client import HostClient

    token = secrets.token_hex(16)
    log = tmp_path / "server.log"
    server = _process.start([sys.executable, "-m", "jupyter_server", "--ServerApp.port=0",
                             "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
                             "--ServerApp.open_browser=False", "--ServerApp.allow_root=True",
                             f"--ServerApp.root_dir={tmp_path}"], log_path=log)

    async def drive(url: str) -> tuple[list[str], dict[str, Any]]:
        host = HostClient(url, token)
        model = await host.request("POST", "/api/kernels", {"name": "cloudgpu-cpu"})
        seen: list[tuple[str, dict[str, Any]]] = []
        replied = asyncio.get_running_loop().create_future()
        idle = asyncio.get_running_loop().create_future()
        execute = _wire.new_message("execute_request", {
            "code": "print(6 * 7)", "silent": False, "store_history": True,
            "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
            session=uuid.uuid4().hex)

        def on_message(channel: str, msg: dict[str, Any]) -> None:
            seen.append((channel, msg))
            if msg["parent_header"].get("msg_id") != execute["header"]["msg_id"]:
                return
            if channel == "shell" and msg["msg_type"] == "execute_reply" and not replied.done():
                replied.set_result(msg["content"])
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle" \
                    and not idle.done():
                idle.set_result(None)

        conn = await host.connect(model["id"], on_message)
        await conn.send("shell", execute)
        reply = await asyncio.wait_for(replied, 90)
        await asyncio.wait_for(idle, 30)  # the outputs all come before the idle
        await conn.close()
        await host.request("DELETE", f"/api/kernels/{model['id']}")
        await host.aclose()
        mine = [m["msg_type"] for c, m in seen if c == "iopub" and
                m["parent_header"].get("msg_id") == execute["header"]["msg_id"]]
        texts = "".join(m["content"].get("text", "") for c, m in seen
                        if c == "iopub" and m["msg_type"] == "stream")
        return mine, {**reply, "texts": texts}

    try:
        url = wait_for_jupyter_server(server, log, "Jupyter Server")
        types, reply = asyncio.run(drive(url))
        assert reply["status"] == "ok"
        assert "42\n" in reply["texts"]
        assert types[0] == "status" and types[-1] == "status" and "execute_input" in types
    finally:
        _process.stop(server, grace=20)


# --- the protocol, relayed ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_widget_created_remotely_syncs_both_ways(kc: BlockingKernelClient) -> None:
    ex = ok(kc, "import ipywidgets\nslider = ipywidgets.IntSlider(value=3)\nslider")
    opens = [m for m in ex.of("comm_open") if m.content["target_name"] == "jupyter.widget"]
    slider = next(m for m in opens if m.content["data"]["state"].get("_model_name") ==
                  "IntSliderModel")
    comm_id = slider.content["comm_id"]
    assert slider.content["data"]["state"]["value"] == 3
    view = ex.of("execute_result")[0].content["data"]
    assert view["application/vnd.jupyter.widget-view+json"]["model_id"] == comm_id

    # The frontend moves the slider: the remote widget follows.
    kc.shell_channel.send(kc.session.msg("comm_msg", {
        "comm_id": comm_id, "data": {"method": "update", "state": {"value": 7},
                                     "buffer_paths": []}}))
    assert ok(kc, "print(slider.value)").stream() == "7\n"
    # The remote side changes it: the frontend hears.
    ex = ok(kc, "slider.value = 9")
    updates = [m.content["data"] for m in ex.of("comm_msg")
               if m.content["comm_id"] == comm_id]
    assert {"method": "update", "state": {"value": 9}, "buffer_paths": []} in updates


@pytest.mark.timeout(60)
def test_input_is_answered_through_stdin(kc: BlockingKernelClient) -> None:
    msg_id = kc.execute("name = input('your name? ')\nprint('hello', name)", allow_stdin=True)
    request = kc.get_stdin_msg(timeout=30)
    assert request["msg_type"] == "input_request"
    assert request["content"]["prompt"] == "your name? "
    assert request["parent_header"]["msg_id"] == msg_id
    kc.input("Ada")
    assert shell_reply(kc, msg_id, time.monotonic() + 30)["content"]["status"] == "ok"
    assert value(kc, "name") == "Ada"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["interrupt_request", "SIGINT"])
def test_interrupt_stops_a_remote_sleep(kernel: tuple[KernelManager, BlockingKernelClient],
                                        how: str) -> None:
    km, kc = kernel
    msg_id = kc.execute("import time\nprint('sleeping', flush=True)\ntime.sleep(60)")
    while True:
        msg = kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            break
    interrupted = time.monotonic()
    if how == "SIGINT":  # a signal to the proxy process, as `kill -INT` or a terminal would
        km.signal_kernel(signal.SIGINT)
    else:  # what jupyter_client sends for the kernelspec's interrupt_mode "message"
        km.interrupt_kernel()
    reply = shell_reply(kc, msg_id, time.monotonic() + 20)["content"]
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
    assert time.monotonic() - interrupted < 10
    assert ok(kc, "print('still here')").stream() == "still here\n"


@pytest.mark.timeout(60)
def test_a_keyboard_interrupt_the_code_raises_itself_ends_its_cell_as_usual(
        kc: BlockingKernelClient) -> None:
    """Nobody interrupted it here, so the proxy asks the pool whether it stopped the
    session (it did not), and then lets the cell end as the remote kernel said."""
    ex = run(kc, "raise KeyboardInterrupt('by the code')")
    assert ex.status == "error" and ex.reply["ename"] == "KeyboardInterrupt", ex.describe()
    assert ex.reply["evalue"] == "by the code" and ex.states() == ["busy", "idle"]
    assert ok(kc, "print('still here')").stream() == "still here\n"


@pytest.mark.timeout(60)
def test_debug_requests_reach_the_remote_debugger(kc: BlockingKernelClient) -> None:
    msg = kc.session.msg("debug_request", {"type": "request", "seq": 1, "command": "debugInfo",
                                           "arguments": {}})
    kc.control_channel.send(msg)
    reply = kc.get_control_msg(timeout=30)
    assert reply["parent_header"]["msg_id"] == msg["header"]["msg_id"]
    assert reply["content"]["success"] is True
    assert reply["content"]["command"] == "debugInfo"
    assert "isStarted" in reply["content"]["body"]


# --- %cloudgpu --------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_cloudgpu_mistakes_are_clear_errors_that_never_reach_the_remote(
        kc: BlockingKernelClient) -> None:
    ex = run(kc, "%cloudgpu switch gpu=H1000")
    assert ex.status == "error"
    assert "Unknown GPU `H1000`" in ex.reply["evalue"] and "A100-80GB" in ex.reply["evalue"]
    assert "Unknown GPU `H1000`" in ex.tracebacks()
    ex = run(kc, "%cloudgpu frobnicate")
    assert ex.status == "error"
    assert "Unknown `%cloudgpu frobnicate`" in ex.tracebacks()
    assert "%cloudgpu switch gpu=A100-80GB" in ex.tracebacks()
    ex = run(kc, "%cloudgpu switch")
    assert "Say which hardware" in ex.tracebacks()
    for wrong in ("max_cost=-1", "max_cost=lots", "idle_timeout=inf"):
        ex = run(kc, f"%cloudgpu switch gpu=H100 {wrong}")
        assert ex.status == "error" and "must be a positive number" in ex.tracebacks(), wrong
    # Nothing reached the remote kernel: it never heard of a %cloudgpu magic.
    assert ok(kc, "print(sum('cloudgpu' in c for c in In[:-1]))").stream() == "0\n"


@pytest.mark.timeout(120)
def test_switch_carries_variables_to_simulated_a100_and_names_what_stays(
        kc: BlockingKernelClient) -> None:
    ok(kc, "import numpy as np\n"
           "arr = np.arange(1_000_000, dtype=np.float64)\n"
           "class Point:\n"
           "    def __init__(self, x, y):\n"
           "        self.x, self.y = x, y\n"
           "    def norm(self):\n"
           "        return (self.x ** 2 + self.y ** 2) ** 0.5\n"
           "p = Point(3, 4)\n"
           "import os, tempfile\n"
           "data = os.path.join(tempfile.mkdtemp(), 'data.txt')\n"
           "with open(data, 'w') as f:\n"
           "    f.write('line one\\nline two\\n')\n"
           "del f\n"
           "handle = open(data)\n"
           "handle.readline()\n"
           "import socket\n"
           "sock = socket.socket()\n"
           "squares = (n * n for n in range(10))\n"
           f"old_pid = {HOST_PID}\n")
    old_pid = value(kc, "old_pid")
    assert status(kc)["hardware"] == "CPU"

    # Hardware the pool cannot give: a clear error, and the session stays as it was.
    ex = run(kc, "%cloudgpu switch gpu=H200 max_cost=5", timeout=60)
    assert ex.status == "error"
    assert "Could not switch to 1x H200" in ex.tracebacks()
    assert "Nothing changed: still on CPU" in ex.tracebacks()
    assert value(kc, "p.norm()") == 5.0
    assert "limits" not in status(kc)  # not even the budget that came with it

    # The old kernel's agent fails taking the variables (a fault injected there): the same,
    # at once, rather than a wait for an answer that never comes.
    ok(kc, "_agent_type = type(get_ipython().cloudgpu_agent)\n"
           "_real_snapshot = _agent_type._snapshot\n"
           "def _broken(self):\n"
           "    raise RuntimeError('injected fault')\n"
           "_agent_type._snapshot = _broken")
    try:
        ex = run(kc, "%cloudgpu switch gpu=A100-80GB", timeout=60)
    finally:
        # (on the old kernel; a switch that wrongly went ahead left these names behind)
        ok(kc, "if '_real_snapshot' in globals():\n"
               "    _agent_type._snapshot = _real_snapshot\n"
               "    del _agent_type, _real_snapshot, _broken")
    assert ex.status == "error", ex.describe()
    said = ex.tracebacks()
    assert "variables could not be taken" in said and "RuntimeError: injected fault" in said, said
    assert "Nothing changed: still on CPU" in said, said
    assert status(kc)["hardware"] == "CPU" and value(kc, "p.norm()") == 5.0

    before = ok(kc, "'numbered'").reply["execution_count"]
    ex = ok(kc, "%cloudgpu switch gpu=A100-80GB", timeout=90)
    out = ex.stream("stdout")
    assert "now on 1x A100-80GB (simulated)" in out
    assert re.search(r"carried over \d+ variables \([\d.]+ MiB\): .*\barr\b", out), out
    left = ex.stream("stderr")
    assert re.search(r"could not carry over \d+ variables:", left), left
    assert re.search(r"handle: an open file \('.*data.txt', mode 'r'\) is tied to the old", left)
    assert re.search(r"sock: socket.socket cannot be pickled", left)
    assert re.search(r"squares: generator cannot be pickled", left)

    # The cells now run on the new hardware, with the variables that could move,
    # numbered on from the old kernel's.
    assert ok(kc, "'numbered'").reply["execution_count"] == before + 1
    assert value(kc, "os.environ['CLOUDGPU_SIMULATED_GPUS']") == "A100-80GB"
    assert value(kc, f"{HOST_PID} != old_pid") is True
    assert value(kc, "(float(arr.sum()), arr.dtype.name)") == (499999500000.0, "float64")
    assert value(kc, "(p.norm(), type(p).__name__)") == (5.0, "Point")
    assert value(kc, "[n for n in ('handle', 'sock', 'squares') if n in globals()]") == []
    now = status(kc)
    assert now["hardware"] == "1x A100-80GB (simulated)"
    assert re.fullmatch(r"\$[\d.]+ so far, at \$2\.50/hour", now["cost"]), now  # catalog price
    assert _process.wait_gone(old_pid, 20), \
        "the old remote kernel still runs: its hardware is still held"


@dataclass
class BudgetPool:
    """A pool with a daily budget of $100 a user, whose users spent some of it earlier
    today (sessions in its ledger): tokens by user name."""

    pool: PoolProcess
    tokens: dict[str, str]


#: What each of the budget pool's users spent earlier today, in dollars.
SPENT_EARLIER = {"erin": 85.0, "frank": 80.0}


@pytest.fixture(scope="module")
def budget_pool(host_factory: HostFactory, tmp_path_factory: pytest.TempPathFactory,
                ) -> Iterator[BudgetPool]:
    """CPUs cost next to nothing there, and a (simulated) H100 $1 a second."""
    tmp = tmp_path_factory.mktemp("budget-pool")
    tokens = {user: secrets.token_hex(24) for user in SPENT_EARLIER}
    now, ledger = time.time(), Ledger(tmp / "ledger.sqlite")
    for user, spent in SPENT_EARLIER.items():
        ledger.save(SessionRecord(id=secrets.token_hex(8), user=user, hardware="H100",
                                  state="stopped", created=now - 2, started=now - 1,
                                  ended=now, gpu_type="H100", count=1,
                                  rate_per_hour=spent * 3600,
                                  stop_reason="stopped by its owner"))
    ledger.close()
    config = tmp / "pool_config.py"
    config.write_text(f"c.PoolApp.users = {({t: u for u, t in tokens.items()})!r}\n"
                      "c.PoolApp.daily_limit = 100.0\n"
                      "c.PoolApp.meter_interval = 0.3\n"
                      "c.PoolApp.catalog_overrides = {'H100': {'price_per_hour': 3600}}\n")
    pool = PoolProcess(tmp, [host_factory.start("H100:1", name="budget")], config,
                       db=tmp / "ledger.sqlite").start()
    try:
        yield BudgetPool(pool, tokens)
    finally:
        pool.stop()


@pytest.mark.timeout(120)
def test_a_budget_nearly_spent_is_said_under_a_cell_and_in_status(
        budget_pool: BudgetPool) -> None:
    """The kernel checks with the pool beside its cells, as ``%%remote`` does: the pool's
    warning that a budget is nearly spent shows under a cell, and in ``%cloudgpu status``.

    The user spent $85 of the day's $100 earlier, so the pool warns about the new session
    at its first meter, and never stops it: a CPU costs next to nothing.
    """
    warning = "85% of your daily budget of $100.00 used"
    pool, token = budget_pool.pool, budget_pool.tokens["erin"]
    km, kc = start_kernel("cloudgpu-cpu", CLOUDGPU_POOL=pool.url, CLOUDGPU_TOKEN=token)
    try:
        # A "Run all" as the kernel starts: its cells are relayed one after the other as
        # soon as the remote kernel is up, before the first one's check is answered. They
        # share that question (one every 5 s at most), instead of asking one each.
        started = time.monotonic()
        cells = [kc.execute("pass") for _ in range(20)]
        assert shell_reply(kc, cells[-1], started + 90)["content"]["status"] == "ok"
        [session] = pool.request("GET", "/api/sessions", token=token).json()["sessions"]
        # The pool logs the start's long polls alike (a path without its query): two, say.
        asked = pool.log.read_text().count(f"GET /api/sessions/{session['id']} ")
        assert asked <= 3 + (time.monotonic() - started) / 5, f"{asked} asked for 20 cells"
        said = [_stderr_until_idle(kc, cells[-1])]

        def warned() -> bool:  # a cell asks the pool at most every 5 s
            if warning not in said[-1]:
                said.append(ok(kc, "pass").stream("stderr"))
            return warning in said[-1]

        wait_until(warned, within=30, what="a cell saying the pool's budget warning")
        assert f"cloudgpu: ⚠ {warning}\n" in said[-1], said
        assert status(kc)["warning"] == warning
        assert warning not in ok(kc, "pass").stream("stderr")
    finally:
        stop_kernel(km, kc)


def _stderr_until_idle(kc: BlockingKernelClient, last: str) -> str:
    """What the cells sent so far wrote to stderr, up to ``last``'s idle."""
    text = ""
    while True:
        msg = kc.get_iopub_msg(timeout=30)
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stderr":
            text += msg["content"]["text"]
        elif msg["parent_header"].get("msg_id") == last and msg["msg_type"] == "status" and \
                msg["content"]["execution_state"] == "idle":
            return text


@pytest.mark.timeout(120)
def test_a_cell_the_pool_stops_for_a_spent_budget_fails_saying_so(
        budget_pool: BudgetPool) -> None:
    """The pool stops a session whose budget is spent, interrupting its cell first: the
    cell fails with the pool's reason (as a ``%%remote`` cell does), not with a bare
    KeyboardInterrupt. The user spent $80 of $100 earlier; the H100 costs $1 a second."""
    km, kc = start_kernel("cloudgpu-h100", CLOUDGPU_POOL=budget_pool.pool.url,
                          CLOUDGPU_TOKEN=budget_pool.tokens["frank"])
    try:
        ex = run(kc, "import time\nprint('started', flush=True)\ntime.sleep(90)", timeout=100)
        assert "started" in ex.stream(), ex.describe()
        assert ex.status == "error" and ex.reply["ename"] == "BudgetExceededError", \
            ex.describe()
        why = "The 1x H100 (simulated) session was stopped: your daily budget of $100.00 is spent"
        assert ex.reply["evalue"].startswith(why), ex.reply["evalue"]
        assert "Restart the kernel" in ex.reply["evalue"]
        assert ex.states() == ["busy", "idle"], ex.describe()
        assert ok(kc, "%cloudgpu status").stream().startswith(f"no remote kernel: {why}")
    finally:
        stop_kernel(km, kc)


@pytest.mark.timeout(120)
def test_a_switch_can_set_a_max_cost_that_the_pool_then_stops_the_session_at(
        budget_pool: BudgetPool) -> None:
    """``%cloudgpu switch gpu=H100 max_cost=10``: the new session has a budget of its own
    ($1 a second here: 10 s, before the user's daily budget, 15 s), shown in ``%cloudgpu
    status``, and its cell fails saying so."""
    km, kc = start_kernel("cloudgpu-cpu", CLOUDGPU_POOL=budget_pool.pool.url,
                          CLOUDGPU_TOKEN=budget_pool.tokens["erin"])
    try:
        ok(kc, "x = 41", timeout=90)
        assert "limits" not in status(kc)
        ok(kc, "%cloudgpu switch gpu=H100 max_cost=10 idle_timeout=600", timeout=90)
        assert status(kc)["limits"] == "max_cost $10.00, idle_timeout 10 min"
        ex = run(kc, "import time\nprint(x + 1, flush=True)\ntime.sleep(90)", timeout=100)
        assert ex.stream() == "42\n", ex.describe()  # the variable moved
        assert ex.status == "error" and ex.reply["ename"] == "BudgetExceededError", \
            ex.describe()
        assert "session was stopped: the session's max_cost of $10.00 was reached" in \
            ex.reply["evalue"], ex.reply["evalue"]
    finally:
        stop_kernel(km, kc)


# --- failures, restart, shutdown ----------------------------------------------------------


@pytest.mark.timeout(120)
def test_remote_death_is_an_error_in_the_cell_and_a_restart_recovers() -> None:
    km, kc = start_kernel("cloudgpu-cpu")
    try:
        pid = value(kc, HOST_PID)
        ex = run(kc, "import os\nos._exit(1)", timeout=60)
        assert ex.status == "error" and ex.reply["ename"] == "RemoteKernelDiedError"
        assert "died" in ex.tracebacks() and "Restart the kernel" in ex.tracebacks()
        assert ex.states() == ["busy", "idle"]
        assert _process.wait_gone(pid, 20), "the dead remote kernel's hardware was not released"

        again = run(kc, "print('anyone there?')")
        assert again.status == "error" and "Restart the kernel" in again.tracebacks()
        assert "no remote kernel" in ok(kc, "%cloudgpu status").stream()

        km.restart_kernel()
        kc.wait_for_ready(timeout=60)
        assert ok(kc, "print('back')", timeout=90).stream() == "back\n"

        # The pool ends the session (as when a budget runs out): the next cell says so.
        pool = json.loads((Path(jupyter_runtime_dir()) / "cloudgpu-pool.json").read_text())
        auth = {"Authorization": f"token {pool['token']}"}
        kernel_id = status(kc)["kernel"].split()[0]
        sessions = httpx.get(f"{pool['url']}/api/sessions", headers=auth, timeout=10).json()
        session = next(s for s in sessions["sessions"] if s["kernel_id"] == kernel_id)
        httpx.delete(f"{pool['url']}/api/sessions/{session['id']}", headers=auth, timeout=30)
        # The host closes the kernel's websocket as it stops it; the proxy then asks the pool why.
        wait_until(lambda: "The pool says" in ok(kc, "%cloudgpu status").stream(), within=20,
                   what="the proxy learning from the pool that its session was stopped")
        ex = run(kc, "print('still there?')")
        assert ex.status == "error" and "was stopped" in ex.tracebacks()
        assert "The pool says: stopped by its owner" in ex.tracebacks()
    finally:
        stop_kernel(km, kc)


@pytest.mark.timeout(120)
def test_host_going_away_fails_the_running_cell_clearly() -> None:
    # A private local pool, so that killing its host leaves the other tests' pool alone.
    # A short folder: the host's kernels bind IPC sockets there (108-byte path limit).
    runtime = Path(tempfile.mkdtemp(prefix="cg-"))
    km, kc = start_kernel("cloudgpu-cpu", JUPYTER_RUNTIME_DIR=str(runtime))
    try:
        ok(kc, "pass", timeout=90)
        host = json.loads((runtime / "cloudgpu-local-host" / "host-state.json").read_text())
        msg_id = kc.execute("import time\nprint('working', flush=True)\ntime.sleep(60)")
        while kc.get_iopub_msg(timeout=30)["msg_type"] != "stream":
            pass
        os.kill(host["pid"], signal.SIGKILL)
        reply = shell_reply(kc, msg_id, time.monotonic() + 20)["content"]
        assert reply["status"] == "error" and reply["ename"] == "RemoteKernelDiedError"
        assert "The connection to the cloudgpu host" in reply["evalue"]
        assert "was lost" in reply["evalue"] and "Restart the kernel" in reply["evalue"]
        assert "its machine was lost" in reply["evalue"], reply["evalue"]
        # The proxy itself is fine: it answers, and says there is no remote kernel.
        assert "no remote kernel: The connection" in ok(kc, "%cloudgpu status").stream()
    finally:
        stop_kernel(km, kc)
        pool = runtime / "cloudgpu-pool.json"
        if pool.exists():  # stopped before its folder goes
            _process.stop(_process.read_json(pool)["pid"], grace=20)
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.mark.timeout(120)
def test_restart_gives_a_fresh_remote_kernel_and_frees_the_old_one(
        kernel: tuple[KernelManager, BlockingKernelClient]) -> None:
    km, kc = kernel
    ok(kc, "survivor = 1")
    before = status(kc)
    pid = value(kc, HOST_PID)
    km.restart_kernel()
    kc.wait_for_ready(timeout=60)
    ex = run(kc, "survivor", timeout=90)
    assert ex.status == "error" and ex.reply["ename"] == "NameError"
    after = status(kc)
    assert after["hardware"] == "CPU"  # the kernelspec's hardware, not the switched-to one
    assert after["kernel"].split()[0] != before["kernel"].split()[0]
    assert _process.wait_gone(pid, 20), "the remote kernel before the restart still runs"


@pytest.mark.timeout(60)
def test_shutdown_releases_the_remote_kernel_at_once() -> None:
    km, kc = start_kernel("cloudgpu-cpu")
    pid = value(kc, HOST_PID)
    started = time.monotonic()
    stop_kernel(km, kc)
    assert time.monotonic() - started < 10
    assert _process.wait_gone(pid, 10)


# --- the standard kernel conformance suite ------------------------------------------------


class TestConformance(jupyter_kernel_test.KernelTests):
    """jupyter_kernel_test's protocol checks against the installed Cloud GPU (CPU) kernelspec."""

    kernel_name = "cloudgpu-cpu"
    language_name = "python"
    file_extension = ".py"
    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    completion_samples = [{"text": "zi", "matches": {"zip"}}]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2"]
    invalid_code_samples = ["import = 7q"]
    code_page_something = "zip?"
    code_generate_error = "raise"
    code_execute_result = [{"code": "1+2+3", "result": "6"},
                           {"code": "[n*n for n in range(1, 4)]", "result": "[1, 4, 9]"}]
    code_display_data = [{"code": "from IPython.display import HTML, display; "
                                  "display(HTML('<b>test</b>'))", "mime": "text/html"}]
    code_history_pattern = "1?2*"
    # Not "range": ipykernel itself answers it with session 0, which the suite rejects.
    supported_history_operations = ("tail", "search")
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        # The first cell waits for the remote kernel and shows its progress; the suite
        # counts every output, so let that happen before it starts.
        cls.kc.execute_interactive("pass", timeout=90)
