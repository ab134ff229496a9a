"""The Python API (``cloudgpu.session``, ``cloudgpu.function``), used as users use it.

Most tests run a real ``python script.py`` (plain Python, no IPython) against a real pool
with its SQLite ledger over a real ``cloudgpu host``, pointed at through ``CLOUDGPU_POOL``
and ``CLOUDGPU_TOKEN``: the module's own pool, static backend, over one host with two
simulated H100s (the only fake: there is no GPU here, so test names say "simulated").
The H100 costs $1 per second there, so budgets trip in seconds. One test drives a real
ipykernel through jupyter_client, as a notebook does; one runs ``examples/sdk.py`` on the
embedded default (the test session's local pool).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from kernel_driver import ok, run, start_kernel, stop_kernel, value
from servers import HostFactory, PoolProcess

from cloudgpu._core import stopped_error
from cloudgpu.errors import BudgetExceededError, RemoteKernelDiedError

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
H100_PER_HOUR = 3600.0  # $1 per second: a max_cost of $2 trips after 2 s

POOL_CONFIG = f"""\
# tests/test_api.py: a pricey simulated H100, fast checks, a warm CPU kernel.
c.PoolApp.catalog_overrides = {{"H100": {{"price_per_hour": {H100_PER_HOUR}}}}}
c.PoolApp.meter_interval = 0.3
c.PoolApp.cull_interval = 0.3
c.PoolApp.disconnected_timeout = 0
c.PoolApp.warm_kernels = {{"cpu": 1}}
"""


@pytest.fixture(scope="module")
def pool(host_factory: HostFactory, tmp_path_factory: pytest.TempPathFactory,
         ) -> Iterator[PoolProcess]:
    """A pool over one host with two simulated H100s."""
    tmp = tmp_path_factory.mktemp("api-pool")
    config = tmp / "pool_config.py"
    config.write_text(POOL_CONFIG)
    host = host_factory.start("H100:2", name="api-host")
    started = PoolProcess(tmp, [host], config).start()
    yield started
    started.stop()


def _env(pool: PoolProcess | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if pool is not None:
        env.update(CLOUDGPU_POOL=pool.url, CLOUDGPU_TOKEN=pool.token)
    return env


def script(tmp_path: Path, code: str) -> Path:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(code))
    return path


def run_script(path: Path, pool: PoolProcess | None, timeout: float = 90,
               ) -> subprocess.CompletedProcess[str]:
    """``python path`` as a user runs it; its stdout, stderr and exit status."""
    return subprocess.run([sys.executable, str(path)], env=_env(pool), capture_output=True,
                          text=True, timeout=timeout, cwd=path.parent)


def last_json(out: subprocess.CompletedProcess[str]) -> Any:
    """The JSON a script printed last."""
    assert out.stdout.strip(), f"nothing on stdout; stderr:\n{out.stderr}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def active_sessions(pool: PoolProcess) -> list[dict[str, Any]]:
    response = pool.request("GET", "/api/sessions")
    assert response.status_code == 200, response.text
    return response.json()["sessions"]  # type: ignore[no-any-return]


def ledger(pool: PoolProcess, since: float) -> list[dict[str, Any]]:
    """The pool's ledger rows of sessions created since ``since`` (epoch seconds)."""
    with contextlib.closing(sqlite3.connect(pool.db)) as con:
        con.row_factory = sqlite3.Row
        rows = con.execute("SELECT * FROM sessions WHERE created >= ? ORDER BY created",
                           (since,)).fetchall()
    return [dict(r) for r in rows]


# --- sessions ------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_session_push_run_pull_on_simulated_h100_from_a_plain_python_script(
        pool: PoolProcess, tmp_path: Path) -> None:
    out = run_script(script(tmp_path, """
        import json, sys
        import cloudgpu

        with cloudgpu.session("H100", max_cost=60) as s:
            s.push(x=[1, 2, 3], scale=3)
            s.run("import os\\nprint('on the remote side', flush=True)\\n"
                  "y = [v * scale for v in x]")
            y = s.pull("y")
            x_back, y_back = s.pull("x", "y")
            try:
                s.pull("never_defined")
            except cloudgpu.RemoteExecutionError as e:
                missing = e.ename
            seen = {"y": y, "pair": [x_back, y_back], "missing": missing,
                    "hardware": s.hardware, "cost": s.cost, "id": s.info.session_id}
        seen["closed"] = s.closed
        seen["offered"] = {h["type"]: h["total"] for h in cloudgpu.hardware() if h["total"]}
        seen["billed"] = [x["id"] for x in cloudgpu.cost()["sessions"]]
        seen["ipython"] = "IPython" in sys.modules
        print(json.dumps(seen))
        """), pool)
    assert out.returncode == 0, out.stderr
    seen = last_json(out)
    assert out.stdout.splitlines()[0] == "on the remote side"  # streamed to our stdout
    assert seen["y"] == [3, 6, 9] and seen["pair"] == [[1, 2, 3], [3, 6, 9]]
    assert seen["missing"] == "NameError"
    assert seen["hardware"] == "1x H100 (simulated)" and seen["cost"] > 0
    assert seen["closed"] is True and seen["offered"] == {"H100": 2}
    assert seen["id"] in seen["billed"]
    assert seen["ipython"] is False, "plain Python must not need IPython"
    # The progress lines, on stderr, say what was asked for and what was granted.
    assert "cloudgpu: asking for 1x H100 ..." in out.stderr
    assert "1x H100 (simulated) session ready on the pool at" in out.stderr
    # Closing released it: the pool stopped it.
    assert seen["id"] not in {s["id"] for s in active_sessions(pool)}


# --- functions -----------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_function_with_a_closure_over_a_class_defined_in_main(
        pool: PoolProcess, tmp_path: Path) -> None:
    out = run_script(script(tmp_path, """
        import json
        import cloudgpu

        class Scaler:
            def __init__(self, k):
                self.k = k
            def times(self, v):
                return Scaler(self.k * v)

        base = Scaler(2)

        @cloudgpu.function
        def grow(v, *, extra=0):
            print("growing", v, flush=True)
            return base.times(v + extra)

        grown = grow(20, extra=1)
        print(json.dumps({"same_class": isinstance(grown, Scaler), "k": grown.k,
                          "name": grow.__name__}))
        """), pool)
    assert out.returncode == 0, out.stderr
    assert last_json(out) == {"same_class": True, "k": 42, "name": "grow"}
    assert "growing 20" in out.stdout
    assert "cloudgpu: grow: done on CPU" in out.stderr
    assert active_sessions(pool) == [], "the call's session was not released"


@pytest.mark.timeout(90)
def test_remote_exception_reraises_with_its_type_name_and_the_remote_traceback(
        pool: PoolProcess, tmp_path: Path) -> None:
    out = run_script(script(tmp_path, """
        import json
        import cloudgpu

        def check(v):
            if v < 0:
                raise ValueError(f"negative: {v}")
            return v

        @cloudgpu.function(quiet=True)
        def checked(v):
            return check(v)

        try:
            checked(-1)
        except cloudgpu.RemoteExecutionError as e:
            print(json.dumps({"ename": e.ename, "evalue": e.evalue,
                              "traceback": "\\n".join(e.traceback), "host": e.host}))
        checked(-2)  # not caught: the script fails as Python scripts do
        """), pool)
    caught = json.loads(out.stdout.strip().splitlines()[0])
    assert caught["ename"] == "ValueError" and caught["evalue"] == "negative: -1"
    remote = ANSI.sub("", caught["traceback"])
    # Through check(), named although cloudpickle sends no source (it renames the file).
    assert "in checked(v)" in remote and "in check(v)" in remote, remote
    assert remote.rstrip().endswith("ValueError: negative: -1"), remote
    assert caught["host"].startswith("http://127.0.0.1:")
    assert out.returncode == 1
    err = out.stderr
    assert "cloudgpu.errors.RemoteExecutionError: ValueError: negative: -2" in err, err
    assert "Remote traceback (on http://127.0.0.1:" in err
    assert err.rstrip().endswith("ValueError: negative: -2"), err
    assert "\x1b[" not in err, "colour codes in a traceback written to a pipe"
    assert "cloudgpu:" not in err, "quiet=True still showed cloudgpu's lines"


@pytest.mark.timeout(120)
def test_map_over_8_inputs_queues_on_2_simulated_h100s_and_all_complete(
        pool: PoolProcess, tmp_path: Path) -> None:
    since = time.time()
    out = run_script(script(tmp_path, """
        import json
        import cloudgpu

        @cloudgpu.function(gpu="H100")
        def work(i):
            import os, time
            time.sleep(0.3)
            return {"double": 2 * i, "device": os.environ["CUDA_VISIBLE_DEVICES"],
                    "pid": os.getpid()}

        print(json.dumps(work.map(range(8))))
        """), pool, timeout=110)
    assert out.returncode == 0, out.stderr
    results = last_json(out)
    assert [r["double"] for r in results] == [2 * i for i in range(8)]  # in input order
    assert {r["device"] for r in results} <= {"0", "1"}
    assert len({r["pid"] for r in results}) == 8, "each call gets a kernel of its own"
    assert "waiting for H100" in out.stderr, out.stderr

    # The documented policy: one session per call, each released when it returned.
    rows = ledger(pool, since)
    assert [r["hardware"] for r in rows] == ["H100"] * 8, rows
    assert all(r["state"] == "stopped" and r["ended"] for r in rows), rows
    # Never more than the two GPUs at once, so six of them waited for one to come free.
    # (Concurrency peaks at some session's start: count who held a GPU at each start.)
    for row in rows:
        holding = [o for o in rows if o["started"] <= row["started"] < o["ended"]]
        assert len(holding) <= 2, (row, holding)
    waited = [r for r in rows if any(o["ended"] <= r["started"] for o in rows)]
    assert len(waited) >= 6, rows


@pytest.mark.timeout(90)
def test_spawn_futures_and_the_async_forms(pool: PoolProcess, tmp_path: Path) -> None:
    out = run_script(script(tmp_path, """
        import asyncio, concurrent.futures, json
        import cloudgpu

        @cloudgpu.function(quiet=True)
        def square(v):
            return v * v

        futures = [square.spawn(i) for i in range(3)]
        done = sorted(f.result() for f in concurrent.futures.as_completed(futures, timeout=60))

        async def main():
            async with cloudgpu.asession("cpu", quiet=True) as s:
                await s.push(v=7)
                await s.run("w = v * 6")
                w = await s.pull("w")
            squares = await asyncio.gather(*(square.aio(i) for i in (4, 5)))
            return {"w": w, "squares": squares, "closed": s.closed}

        print(json.dumps({"spawned": done, **asyncio.run(main())}))
        """), pool)
    assert out.returncode == 0, out.stderr
    assert last_json(out) == {"spawned": [0, 1, 4], "w": 42, "squares": [16, 25],
                              "closed": True}
    assert active_sessions(pool) == []


# --- interrupts, timeouts, budgets ---------------------------------------------------------


@pytest.mark.timeout(90)
def test_ctrl_c_interrupts_the_remote_work_and_raises_keyboard_interrupt(
        pool: PoolProcess, tmp_path: Path) -> None:
    path = script(tmp_path, """
        import json
        import cloudgpu

        s = cloudgpu.session("cpu")
        s.run("survivor = 41")
        try:
            s.run("import time\\nprint('sleeping', flush=True)\\ntime.sleep(60)\\nnever = 1")
        except KeyboardInterrupt:
            print("session interrupted", flush=True)
        s.run("print('after', survivor + 1, 'never' in globals(), flush=True)")

        @cloudgpu.function
        def sleepy():
            import time
            print("sleeping", flush=True)
            time.sleep(60)

        try:
            sleepy()
        except KeyboardInterrupt:
            print("function interrupted", flush=True)
        print(json.dumps({"active": len(cloudgpu.sessions())}))
        s.close()
        """)
    proc = subprocess.Popen([sys.executable, str(path)], env=_env(pool), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    assert proc.stdout is not None
    lines = []
    try:
        for _ in range(2):  # Ctrl-C once the session's cell runs, then once the function runs
            while not (line := proc.stdout.readline()).startswith("sleeping"):
                assert line, f"the script ended early: {lines}"
                lines.append(line)
            proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines += rest.splitlines(keepends=True)
    assert proc.returncode == 0, err
    said = [line.strip() for line in lines]
    assert said[:3] == ["session interrupted", "after 42 False", "function interrupted"], said
    assert json.loads(said[-1]) == {"active": 1}, "the interrupted call's session was kept"
    assert "interrupting the remote code" in err


@pytest.mark.timeout(90)
def test_timeout_interrupts_remote_work_and_raises_remote_timeout_error(
        pool: PoolProcess, tmp_path: Path) -> None:
    out = run_script(script(tmp_path, """
        import json
        import cloudgpu

        @cloudgpu.function(timeout=1, quiet=True)
        def slow():
            import time
            time.sleep(60)

        seen = {}
        try:
            slow()
        except cloudgpu.RemoteTimeoutError as e:
            seen["function"] = str(e)
            seen["is_timeout_error"] = isinstance(e, TimeoutError)
        seen["active"] = len(cloudgpu.sessions())
        with cloudgpu.session(quiet=True) as s:
            try:
                s.run("import time\\ntime.sleep(60)\\nnever = 1", timeout=1)
            except cloudgpu.RemoteTimeoutError as e:
                seen["session"] = str(e)
            s.run("print('still usable', 'never' in globals())")
        print(json.dumps(seen))
        """), pool)
    assert out.returncode == 0, out.stderr
    seen = last_json(out)
    assert "ran past its timeout of 1 s and was interrupted" in seen["function"], seen
    assert seen["is_timeout_error"] is True and seen["active"] == 0
    assert "ran past its timeout of 1 s" in seen["session"], seen
    assert "still usable False" in out.stdout


@pytest.mark.timeout(90)
def test_budget_stop_raises_budget_exceeded_error_on_simulated_h100(
        pool: PoolProcess, tmp_path: Path) -> None:
    out = run_script(script(tmp_path, """
        import json
        import cloudgpu

        seen = {}
        try:
            with cloudgpu.session("H100", max_cost=2, quiet=True) as s:  # $1/s: 2 s
                s.run("import time\\nprint('spending', flush=True)\\ntime.sleep(60)")
        except cloudgpu.BudgetExceededError as e:
            seen["session"] = str(e)

        @cloudgpu.function(gpu="H100", max_cost=2, quiet=True)
        def spend():
            import time
            time.sleep(60)

        try:
            spend()
        except cloudgpu.BudgetExceededError as e:
            seen["function"] = str(e)
        print(json.dumps(seen))
        """), pool)
    assert out.returncode == 0, out.stderr
    seen = last_json(out)
    for form in ("session", "function"):
        assert "max_cost" in seen[form] and "$2.00" in seen[form], seen
        assert seen[form].startswith("The 1x H100 (simulated) session was stopped"), seen
    assert "spending" in out.stdout


def test_stop_reasons_that_mean_a_spent_budget_are_budget_exceeded_errors() -> None:
    """The pool's own wording (remote_host/pool/service.py) for each reason to stop."""
    for reason in ("the session's max_cost of $2.00 was reached",
                   "your daily budget of $3.00 is spent ($3.10 today)"):
        assert isinstance(stopped_error("1x H100", reason), BudgetExceededError), reason
    for reason in ("idle: nothing ran for 16 min (idle_timeout 15 min)", "stopped by its owner",
                   "its remote kernel is gone (it died, or its host did)"):
        error = stopped_error("CPU", reason, "Open a new one.")
        assert type(error) is RemoteKernelDiedError, reason
        assert str(error) == f"The CPU session was stopped: {reason}. Open a new one."


# --- in a notebook ---------------------------------------------------------------------------


@pytest.fixture
def notebook(pool: PoolProcess) -> Iterator[BlockingKernelClient]:
    km, kc = start_kernel(CLOUDGPU_POOL=pool.url, CLOUDGPU_TOKEN=pool.token)
    try:
        yield kc
    finally:
        stop_kernel(km, kc)


@pytest.mark.timeout(120)
def test_in_a_notebook_beside_remote_cells(notebook: BlockingKernelClient) -> None:
    kc = notebook
    ok(kc, "%load_ext cloudgpu")
    ok(kc, "import cloudgpu\n"
           "class Box:\n"
           "    def __init__(self, v):\n"
           "        self.v = v\n"
           "box = Box(3)\n"
           "@cloudgpu.function\n"
           "def unbox(n):\n"
           "    print('unboxing', n)\n"
           "    return Box(box.v * n)\n")
    ex = ok(kc, "result = unbox(5)", timeout=90)
    assert ex.stream() == "unboxing 5\n"  # under the cell that made the call
    assert any("unbox: done on CPU" in line for line in ex.status_lines()), ex.describe()
    assert value(kc, "(isinstance(result, Box), result.v)") == (True, 15)

    ex = ok(kc, "with cloudgpu.session() as s:\n"
                "    s.push(v=2)\n"
                "    s.run('from IPython.display import HTML, display\\n'\n"
                "          'display(HTML(\"<b>rich</b>\"))\\n'\n"
                "          'print(v * 21)')\n", timeout=90)
    assert ex.stream() == "42\n"
    assert [m.content["data"]["text/html"] for m in ex.displays()] == ["<b>rich</b>"]
    assert any("session ready" in line for line in ex.status_lines()), ex.describe()

    # %%remote cells and the API's calls live side by side.
    ok(kc, "%%remote\nz = box.v + 1", timeout=90)
    assert value(kc, "z") == 4

    ex = run(kc, "@cloudgpu.function\ndef fail():\n    raise KeyError('k')\nfail()", timeout=90)
    assert ex.status == "error" and ex.reply["ename"] == "RemoteExecutionError", ex.describe()
    text = ex.tracebacks()
    assert "Remote traceback" in text and "KeyError" in text, text


# --- the example -----------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_examples_sdk_py_runs_on_the_embedded_default() -> None:
    out = run_script(ROOT / "examples" / "sdk.py", None, timeout=110)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("evaluating on "), lines
    assert lines[1] == "ys = [1, 6, 17, 34, 57]"
    assert lines[2].startswith("the session ran on CPU and cost $"), lines
    assert lines[3:5] == ["evaluate(10) = 321", "evaluate.map([1, 2, 3]) = [6, 17, 34]"]
    assert "a remote TypeError came back" in out.stdout
    assert "session ready on the local pool" in out.stderr
