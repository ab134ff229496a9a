"""Tests for the ``%%remote`` magic, driven through a real local IPython kernel.

Each test talks to a real ``python3`` ipykernel through jupyter_client, exactly as a
notebook front end does: it sends cells and reads what the kernel publishes on iopub.
The first ``%%remote`` cell in that kernel finds (or starts) the test session's local pool,
whose ``local`` backend runs a ``cloudgpu host`` on 127.0.0.1, and gets a remote kernel
there. The only fake is the GPU: conftest sets ``CLOUDGPU_SIMULATE`` so the host offers
simulated GPUs.

Most tests share one local kernel (module scope), because starting kernels and hosts is
slow; each test sets up the remote state it relies on. The orphan tests start their own.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager
from kernel_driver import CLIENT, MAGIC, Message, ok, run, start_kernel, stop_kernel, value

from cloudgpu._process import running, wait_gone


@pytest.fixture(scope="module")
def local() -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    """One local kernel with ``%load_ext cloudgpu`` done, shared by the module."""
    km, client = start_kernel()
    try:
        ok(client, "%load_ext cloudgpu")
        yield km, client
    finally:
        stop_kernel(km, client)


@pytest.fixture
def kc(local: tuple[KernelManager, BlockingKernelClient]) -> BlockingKernelClient:
    """The shared local kernel's client."""
    return local[1]


def remote_pid(kc: BlockingKernelClient, spec: str = "cpu") -> int:
    pid: int = value(kc, f"{CLIENT}.sessions[{spec!r}].remote['pid']")
    return pid


def still_running(pids: dict[str, int], within: float = 15) -> dict[str, int]:
    """The processes of ``pids`` still running after up to ``within`` seconds of waiting."""
    deadline = time.monotonic() + within
    return {name: pid for name, pid in pids.items()
            if not wait_gone(pid, max(deadline - time.monotonic(), 0))}


# --- the quickstart and sessions ---------------------------------------------


@pytest.mark.timeout(120)
def test_quickstart_numpy_goes_there_and_back_out_of_band(kc: BlockingKernelClient) -> None:
    ok(kc, "%load_ext cloudgpu")  # again, as the README's first cell: harmless
    ok(kc, "import numpy as np\n"
           "x = np.random.default_rng(0).random(1_000_000)\n"
           "def scale(a, k):\n"
           "    return a * k\n")
    ex = ok(kc, "%%remote gpu=cpu\n"
                "print('scaling', len(x), 'values')\n"
                "import time\n"
                "time.sleep(1)\n"
                "y = scale(x, 2.0)\n", timeout=90)
    assert ex.stream() == "scaling 1000000 values\n"
    assert any("session ready" in line for line in ex.status_lines()), ex.describe()
    assert value(kc, "float(y.sum() / x.sum())") == 2.0
    assert value(kc, "type(y).__name__") == "ndarray"
    sent = value(kc, f"{MAGIC}.last_result.sent")
    received = value(kc, f"{MAGIC}.last_result.received")
    assert sent["x"]["out_of_band"] >= 1 and sent["x"]["bytes"] >= 8_000_000
    assert "scale" in sent
    assert received["y"]["out_of_band"] >= 1 and received["y"]["bytes"] >= 8_000_000
    assert value(kc, f"{MAGIC}.last_result.seconds") >= 1.0


@pytest.mark.timeout(90)
def test_second_cell_reuses_the_remote_kernel_and_new_starts_afresh(
        kc: BlockingKernelClient) -> None:
    ok(kc, "%%remote gpu=cpu --no-pull\n"
           "import json as remote_json\n"
           "remote_only = 41\n", timeout=60)
    first_pid = remote_pid(kc)
    assert value(kc, "'remote_only' in globals() or 'remote_json' in globals()") is False

    ex = ok(kc, "%%remote gpu=cpu\nprint(remote_json.dumps(remote_only + 1))\n")
    assert ex.stream() == "42\n"
    assert remote_pid(kc) == first_pid
    # Its history is kept in memory only (kernels.py), and works as in any kernel.
    ex = ok(kc, "%%remote gpu=cpu --no-pull\nprint(_i.strip(), len(In) >= 3)\n%history -l 1")
    assert ex.stream().splitlines() == ["print(remote_json.dumps(remote_only + 1)) True",
                                        "print(remote_json.dumps(remote_only + 1))"]

    ex = run(kc, "%%remote gpu=cpu --new\nprint(remote_only)\n", timeout=60)
    assert ex.status == "error", ex.describe()
    assert "NameError" in ex.error_text()
    assert remote_pid(kc) != first_pid


# --- values that travel --------------------------------------------------------


@pytest.mark.timeout(90)
def test_functions_lambdas_and_class_instances_round_trip(kc: BlockingKernelClient) -> None:
    ok(kc, "def double(v):\n"
           "    return 2 * v\n"
           "square = lambda v: v * v\n"
           "class Box:\n"
           "    def __init__(self, v):\n"
           "        self.v = v\n"
           "    def get(self):\n"
           "        return self.v * 10\n"
           "box = Box(3)\n")
    ex = ok(kc, "%%remote\n"
                "print(double(21), square(4), box.get())\n"
                "double_back, square_back = double, square\n"
                "box_back = Box(box.v + 1)\n"
                "def triple(v):\n"
                "    return 3 * v\n"
                "cube = lambda v: v ** 3\n")
    assert ex.stream() == "42 16 30\n"
    assert value(kc, "(double_back(5), square_back(3), triple(2), cube(2))") == (10, 9, 6, 8)
    assert value(kc, "box_back.get()") == 40
    assert value(kc, "isinstance(box_back, Box)") is True


@pytest.mark.timeout(90)
def test_pandas_dataframe_round_trips_and_remote_changes_come_back(
        kc: BlockingKernelClient) -> None:
    ok(kc, "import pandas as pd\n"
           "df = pd.DataFrame({'a': [1, 2, 3], 'b': ['x', 'y', None],\n"
           "                   't': pd.date_range('2024-01-01', periods=3)})\n"
           "original = df.copy()\n")
    ok(kc, "%%remote\n"
           "df_back = df\n"
           "df = df.assign(c=df['a'] * 2)\n")
    assert value(kc, "df_back.equals(original)") is True
    assert value(kc, "list(df.columns)") == ["a", "b", "t", "c"]
    assert value(kc, "df['c'].tolist()") == [2, 4, 6]
    assert value(kc, "df.drop(columns='c').equals(original)") is True


@pytest.mark.timeout(90)
def test_20_mb_array_goes_both_ways_bit_exact(kc: BlockingKernelClient) -> None:
    ok(kc, "import hashlib, numpy as np\n"
           "big = np.random.default_rng(1).random(20 * 2**20 // 8)\n"
           "big[7] = np.nan\n"
           "big_hash = hashlib.sha256(big.tobytes()).hexdigest()\n")
    ok(kc, "%%remote\n"
           "import hashlib, numpy as np\n"
           "seen_hash = hashlib.sha256(big.tobytes()).hexdigest()\n"
           "made = big[::-1] * 1.0\n", timeout=60)
    assert value(kc, "seen_hash == big_hash") is True
    assert value(kc, "made.tobytes() == big[::-1].tobytes()") is True
    assert value(kc, f"{MAGIC}.last_result.sent['big']['bytes']") >= 20 * 2**20
    assert value(kc, f"{MAGIC}.last_result.received['made']['bytes']") >= 20 * 2**20


# --- output shows up locally, as it happens -------------------------------------


@pytest.mark.timeout(90)
def test_matplotlib_figure_shows_as_png(kc: BlockingKernelClient) -> None:
    ex = ok(kc, "%%remote --no-pull\n"
                "import matplotlib.pyplot as plt\n"
                "plt.plot([1, 3, 2])\n"
                "plt.show()\n", timeout=60)
    pngs = [m for m in ex.displays() if "image/png" in m.content["data"]]
    assert len(pngs) == 1, ex.describe()


@pytest.mark.timeout(60)
def test_stream_output_arrives_while_the_cell_runs(kc: BlockingKernelClient) -> None:
    ex = ok(kc, "%%remote\n"
                "import time\n"
                "print('before')\n"
                "time.sleep(1.5)\n"
                "print('after')\n")
    arrived = ex.arrivals()
    assert set(arrived) == {"before", "after"}, ex.describe()
    assert arrived["after"] - arrived["before"] >= 1.0
    assert ex.reply_at - arrived["before"] >= 1.0


@pytest.mark.timeout(60)
def test_carriage_return_progress_display_updates_and_clear_output(
        kc: BlockingKernelClient) -> None:
    ex = ok(kc, "%%remote --no-pull\n"
                "import time\n"
                "for i in range(3):\n"
                "    print(f'\\r{i}/3', end='', flush=True)\n"
                "    time.sleep(0.1)\n")
    assert ex.stream() == "\r0/3\r1/3\r2/3"

    ex = ok(kc, "%%remote --no-pull\n"
                "from IPython.display import display\n"
                "h = display('a', display_id=True)\n"
                "h.update('b')\n")
    shown = [(m.msg_type, m.content["data"]["text/plain"],
              m.content.get("transient", {}).get("display_id")) for m in ex.displays()]
    assert [(t, text) for t, text, _ in shown] == [
        ("display_data", "'a'"), ("update_display_data", "'b'")], ex.describe()
    assert shown[0][2] and shown[0][2] == shown[1][2]

    ex = ok(kc, "%%remote --no-pull\n"
                "from IPython.display import clear_output\n"
                "print('going')\n"
                "clear_output()\n"
                "print('gone')\n")
    kinds = [m.msg_type for m in ex.of("stream", "clear_output")]
    assert kinds == ["stream", "clear_output", "stream"], ex.describe()


# --- failures ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_remote_exception_fails_the_cell_with_the_remote_traceback(
        kc: BlockingKernelClient) -> None:
    ok(kc, "not_pulled = 'local'")
    ex = run(kc, "%%remote\n"
                 "not_pulled = 'remote'\n"
                 "assigned_in_failed_cell = 1\n"
                 "1 / 0\n")
    assert ex.status == "error", ex.describe()
    [error] = ex.of("error")
    text = "\n".join(error.content["traceback"])
    assert "ZeroDivisionError" in text and "Remote traceback" in text
    assert value(kc, "'assigned_in_failed_cell' in globals()") is False
    assert value(kc, "not_pulled") == "local"
    ok(kc, "%%remote\nafter_error = 'fine'\n")
    assert value(kc, "after_error") == "fine"


@pytest.mark.timeout(90)
def test_interrupting_the_local_kernel_interrupts_the_remote_cell(
        local: tuple[KernelManager, BlockingKernelClient]) -> None:
    km, kc = local
    ok(kc, "%%remote --no-pull\nsurvivor = 41\n", timeout=60)
    pid = remote_pid(kc)
    interrupted_at: list[float] = []

    def interrupt_on_start(m: Message) -> None:
        if m.msg_type == "stream" and "start" in m.content["text"] and not interrupted_at:
            interrupted_at.append(time.monotonic())
            km.interrupt_kernel()

    ex = run(kc, "%%remote\n"
                 "import time\n"
                 "print('start', flush=True)\n"
                 "time.sleep(30)\n"
                 "never = 1\n", timeout=25, on_message=interrupt_on_start)
    assert interrupted_at, ex.describe()
    assert ex.status == "error", ex.describe()
    assert "KeyboardInterrupt" in ex.error_text()
    assert ex.reply_at - interrupted_at[0] < 15  # not the 30 s the cell would sleep
    assert value(kc, "'never' in globals()") is False

    ex = ok(kc, "%%remote\nprint(survivor + 1)\n")
    assert ex.stream() == "42\n"
    assert remote_pid(kc) == pid


@pytest.mark.timeout(60)
def test_unpicklable_input_fails_before_the_cell_runs(kc: BlockingKernelClient) -> None:
    ok(kc, "%%remote --no-pull\nmarker = []\n")
    ok(kc, "numbers = (i for i in range(3))")
    ex = run(kc, "%%remote\n"
                 "marker.append('ran')\n"
                 "print(list(numbers))\n")
    assert ex.status == "error", ex.describe()
    text = ex.error_text()
    assert "`numbers` (generator)" in text, text
    ex = ok(kc, "%%remote --no-pull\nprint(marker)\n")
    assert ex.stream() == "[]\n"


@pytest.mark.timeout(30)
def test_unknown_gpu_is_an_error_that_names_the_known_types(kc: BlockingKernelClient) -> None:
    ex = run(kc, "%%remote gpu=H1000\nprint('ran')\n")
    assert ex.status == "error", ex.describe()
    text = ex.error_text()
    assert "Unknown GPU `H1000`" in text and "H100" in text.replace("H1000", ""), text
    assert "ran" not in ex.stream()


@pytest.mark.timeout(90)
def test_simulated_h100_session_sees_its_device(kc: BlockingKernelClient) -> None:
    ex = ok(kc, "%%remote gpu=H100\n"
                "import os\n"
                "visible = os.environ['CUDA_VISIBLE_DEVICES']\n", timeout=60)
    assert value(kc, "visible") == "0"
    assert any("H100" in line and "simulated" in line for line in ex.status_lines()), \
        ex.describe()


# --- nothing left behind -----------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["shutdown", "sigkill"])
def test_remote_kernel_goes_away_with_the_local_kernel(how: str) -> None:
    """A notebook that goes away releases its session; one killed outright is noticed.

    On shutdown the client releases its sessions at exit; after SIGKILL the pool stops
    the session once no client is connected (``disconnected_timeout``, 3 s in tests).
    The pool and its host are shared by every notebook, so they stay.
    """
    km, kc = start_kernel()
    try:
        ok(kc, "%load_ext cloudgpu")
        ok(kc, "%%remote gpu=cpu\nx = 1\n", timeout=60)
        pids = {"remote kernel": remote_pid(kc),
                "local kernel": value(kc, "__import__('os').getpid()")}
        assert all(running(pid) for pid in pids.values())
        if how == "shutdown":
            kc.stop_channels()
            km.shutdown_kernel()
        else:
            os.kill(pids["local kernel"], signal.SIGKILL)
        left = still_running(pids)
        for pid in left.values():  # don't leave them running when the test fails
            os.kill(pid, signal.SIGKILL)
        assert left == {}
    finally:
        kc.stop_channels()
        if km.has_kernel:
            km.shutdown_kernel(now=True)
        km.cleanup_resources()


@pytest.mark.timeout(90)
def test_python_version_skew_is_warned_naming_both_versions(kc: BlockingKernelClient) -> None:
    """The local side pretends to run Python 3.9.1; the remote kernel runs this Python."""
    ok(kc, "import cloudgpu.remote as _s\n_real_versions = _s.versions\n"
           "_s.versions = lambda: dict(_real_versions(), python='3.9.1')")
    try:
        ex = ok(kc, "%%remote gpu=cpu --new\nimport platform\nv = platform.python_version()")
        remote_version = value(kc, "v")
        warning = ex.stream("stderr")
        assert "3.9.1" in warning and remote_version in warning, ex.describe()
        assert "Python" in warning and "same Python minor version" in warning
    finally:
        ok(kc, "_s.versions = _real_versions")


@pytest.mark.timeout(120)
def test_an_unchanged_big_input_is_not_sent_again(kc: BlockingKernelClient) -> None:
    ok(kc, "import numpy as np\nbig_in = np.arange(3_000_000, dtype=np.float64)")
    cell = "%%remote gpu=cpu\ntotal = float(big_in.sum())"
    ok(kc, cell)
    assert value(kc, f"{MAGIC}.last_result.sent['big_in']['bytes']") > 24_000_000
    ok(kc, cell)
    assert value(kc, f"{MAGIC}.last_result.sent['big_in']['bytes']") == 0
    # Changed locally: sent again.
    ok(kc, "big_in[0] = 1e9")
    ok(kc, cell)
    assert value(kc, f"{MAGIC}.last_result.sent['big_in']['bytes']") > 24_000_000
    assert value(kc, "total") == 3_000_000 * 2_999_999 / 2 + 1e9
    # Changed remotely (and not pulled back): the remote copy is replaced by ours before the
    # cell runs, as if it had been sent.
    ok(kc, "%%remote gpu=cpu --no-pull\nbig_in[0] = -5.0")
    ok(kc, "%%remote gpu=cpu\nfirst = float(big_in[0])")
    assert value(kc, "first") == 1e9
    assert value(kc, f"{MAGIC}.last_result.stale") == ["big_in"]


@pytest.mark.timeout(120)
def test_inputs_come_on_the_execute_request(kc: BlockingKernelClient) -> None:
    """A cell's push rides on its execute request (its small frames as the request's
    buffers); the agent loads it before the code runs, or after a cell that is only
    whitespace, and a value that fails to load there still stops the cell."""
    counter = "get_ipython().cloudgpu_agent.pushed_on_execute"
    ok(kc, f"%%remote gpu=cpu\nbefore = {counter}")
    ok(kc, "fresh = [1, 2, 3]")
    ok(kc, "%%remote gpu=cpu\ntotal = sum(fresh)")
    assert value(kc, "total") == 6
    ok(kc, "fresh = [4]")
    ok(kc, "%%remote gpu=cpu --push fresh\n   ")
    ok(kc, "%%remote gpu=cpu\nseen = globals()['fresh']")  # names no input: nothing pushed
    assert value(kc, "seen") == [4]
    ok(kc, "class Boom:\n    def __reduce__(self):\n        return (eval, ('1/0',))\n"
           "boom = Boom()")
    failed = run(kc, "%%remote gpu=cpu\nran = repr(boom)")
    assert failed.status == "error", failed.describe()
    said = failed.error_text()
    assert "could not be loaded remotely" in said and "ZeroDivisionError" in said, said
    ok(kc, f"%%remote gpu=cpu\nafter = {counter}")
    assert value(kc, "after") == value(kc, "before") + 3
    # A cell that runs no code over there (only whitespace, or not Python) fails by its own
    # inputs, and leaves the next cell alone.
    for body in ("   ", "this is not python"):
        failed = run(kc, f"%%remote gpu=cpu --push boom\n{body}")
        assert failed.status == "error", failed.describe()
        assert "ZeroDivisionError" in failed.error_text(), failed.describe()
        ok(kc, f"%%remote gpu=cpu\nnext_ran = {body!r}")
        assert value(kc, "next_ran") == body


@pytest.mark.timeout(120)
def test_outputs_are_asked_for_on_the_execute_request(kc: BlockingKernelClient) -> None:
    """A cell's pull rides on its execute request, no comm message of its own; the agent
    answers it as the cell ends, even for a cell that is only whitespace (IPython runs no
    ``pre_execute`` for one), and not for a cell that failed."""
    counter = "get_ipython().cloudgpu_agent.pulled_on_execute"
    ok(kc, f"%%remote gpu=cpu\nbefore = {counter}")
    ok(kc, "%%remote gpu=cpu\nanswer = 6 * 7")
    assert value(kc, "answer") == 42
    ok(kc, "answer = 0")
    ok(kc, "%%remote gpu=cpu --pull answer\n   ")
    assert value(kc, "answer") == 42
    failed = run(kc, "%%remote gpu=cpu\nanswer = 1\nraise ValueError('no')")
    assert failed.status == "error" and value(kc, "answer") == 42
    ok(kc, f"%%remote gpu=cpu\nafter = {counter}")
    # before's own, answer's, the whitespace cell's and the failed cell's (answered: skipped)
    assert value(kc, "after") == value(kc, "before") + 4


# Run in the remote kernel: the agent's module, where a fault is injected.
AGENT_MODULE = "import sys\n_agent = sys.modules[type(get_ipython().cloudgpu_agent).__module__]\n"


@pytest.mark.timeout(120)
def test_a_fault_of_the_agent_fails_the_cell_clearly_and_changes_nothing(
        kc: BlockingKernelClient) -> None:
    """Where the agent itself fails loading an input or pickling an output (injected in
    the remote kernel), the cell says so and does not run on an old value; where it does
    not answer at all, the cell fails once it is over there, rather than wait for ever."""
    ok(kc, "%%remote gpu=cpu --no-pull\n" + AGENT_MODULE +
       "_loads, _dumps, _on_push = _agent.loads, _agent.dumps, _agent.Agent._on_push\n"
       "def _failing(real):\n"
       "    def call(codec_or_value, *rest):\n"
       "        if rest[-1] == 'faulty':\n"
       "            raise RuntimeError('injected fault')\n"
       "        return real(codec_or_value, *rest)\n"
       "    return call\n"
       "faulty = 'old'")
    ok(kc, "faulty = 'new'")
    ok(kc, "%%remote gpu=cpu --no-pull\n" + AGENT_MODULE + "_agent.loads = _failing(_loads)")
    failed = run(kc, "%%remote gpu=cpu\nfault_seen = faulty")
    said = failed.error_text()
    assert failed.status == "error", failed.describe()
    assert "faulty" in said and "failed to load it (RuntimeError: injected fault)" in said, said
    ok(kc, "%%remote gpu=cpu --no-pull\n_agent.loads = _loads\n_agent.dumps = _failing(_dumps)")
    ok(kc, "%%remote gpu=cpu\nthere = globals()['faulty']")  # names no input: no push
    assert value(kc, "there") == "old"  # the cell that failed did not run
    ok(kc, "faulty = 'here'")
    pulled = ok(kc, "%%remote gpu=cpu\nfaulty = 'there'")
    assert "`faulty` stayed remote: the cloudgpu agent failed to send it (RuntimeError: " \
        "injected fault)" in pulled.stream("stderr"), pulled.describe()
    assert value(kc, "faulty") == "here"
    ok(kc, "%%remote gpu=cpu --no-pull\n_agent.dumps = _dumps\n"
       "_agent.Agent._on_push = lambda self, comm, data, buffers: None")
    ok(kc, "faulty = 'unanswered'")
    failed = run(kc, "%%remote gpu=cpu\nfault_seen = faulty")
    assert failed.status == "error", failed.describe()
    assert "did not answer for this cell's variables" in failed.error_text(), failed.describe()
    assert value(kc, "'fault_seen' in globals()") is False
    ok(kc, "%%remote gpu=cpu --no-pull\n_agent.Agent._on_push = _on_push")
    ok(kc, "%%remote gpu=cpu\nfault_seen = faulty")
    assert value(kc, "fault_seen") == "unanswered"


@pytest.mark.timeout(180)
def test_unchanged_inputs_are_trusted_only_while_nothing_can_have_changed_them(
        kc: BlockingKernelClient) -> None:
    """Neither side fingerprints an input no code touched since; any code that may have
    touched it, here or there, makes it be checked, and a changed one is sent again."""
    agent = "get_ipython().cloudgpu_agent.held.hashed_on_keep"
    kept = "get_ipython().cloudgpu_agent.kept_on_execute"
    ok(kc, "import numpy as np\ntrusted_in = np.arange(3_000_000, dtype=np.float64)")
    cell = "%%remote gpu=cpu\ns = float(trusted_in.sum())"
    ok(kc, cell)
    ok(kc, f"%%remote gpu=cpu\nk0 = {agent}\nkept0 = {kept}")
    trusted = value(kc, f"{MAGIC}.changes.trusted")
    ok(kc, cell)
    assert value(kc, f"{MAGIC}.last_result.sent['trusted_in']['bytes']") == 0
    assert value(kc, f"{MAGIC}.changes.trusted") == trusted + 1  # no local fingerprint
    ok(kc, f"%%remote gpu=cpu\nk1 = {agent}\nkept = {kept}")
    assert value(kc, "k1") == value(kc, "k0")  # nor a remote one at the keep
    assert value(kc, "kept") == value(kc, "kept0") + 1  # named on its execute request: no push

    # Written remotely through another name, by a cell that never names it.
    ok(kc, "%%remote gpu=cpu --no-pull\nalias = trusted_in")
    ok(kc, "%%remote gpu=cpu --no-pull\nalias[0] = -1.0")
    ok(kc, f"%%remote gpu=cpu\nkept0 = {kept}")
    ok(kc, cell)  # refused as its request starts, then sent with the value
    assert value(kc, f"{MAGIC}.last_result.stale") == ["trusted_in"]
    assert value(kc, "s") == 3_000_000 * 2_999_999 / 2
    ok(kc, f"%%remote gpu=cpu\nkept1 = {kept}")
    assert value(kc, "kept1") == value(kc, "kept0") + 1

    # Written locally by a widget callback (a comm message: no cell ran).
    ok(kc, "def _poke(comm, msg):\n"
           "    comm.on_msg(lambda m: trusted_in.__setitem__(1, 5.0))\n"
           "get_ipython().kernel.comm_manager.register_target('cloudgpu-test-poke', _poke)")
    ok(kc, cell)
    for msg_type, content in (("comm_open", {"target_name": "cloudgpu-test-poke", "data": {}}),
                              ("comm_msg", {"data": {}})):
        kc.shell_channel.send(kc.session.msg(msg_type, {"comm_id": "poke-1", **content}))
    ok(kc, cell)  # handled after the comm messages, in the order they were sent
    assert value(kc, f"{MAGIC}.last_result.sent['trusted_in']['bytes']") > 24_000_000
    assert value(kc, "s") == 3_000_000 * 2_999_999 / 2 + 4.0

    # Asked to verify: both sides fingerprint it at every cell.
    ok(kc, f"{CLIENT}.verify_unchanged = {CLIENT}.sessions['cpu'].verify_unchanged = True")
    try:
        ok(kc, f"%%remote gpu=cpu\nk2 = {agent}")
        ok(kc, cell)
        assert value(kc, f"{MAGIC}.last_result.sent['trusted_in']['bytes']") == 0
        ok(kc, f"%%remote gpu=cpu\nk3 = {agent}")
        assert value(kc, "k3") == value(kc, "k2") + 1
    finally:
        ok(kc, f"{CLIENT}.verify_unchanged = {CLIENT}.sessions['cpu'].verify_unchanged = False")


@pytest.mark.timeout(120)
def test_a_read_only_array_over_bytes_is_trusted_across_local_cells(
        kc: BlockingKernelClient) -> None:
    ok(kc, "import numpy as np\nfrozen_in = np.frombuffer(bytes(8_000_000), dtype=np.float64)")
    cell = "%%remote gpu=cpu\nf = float(frozen_in.sum())"
    ok(kc, cell)
    ok(kc, "unrelated = 1")  # local code ran: a writable array would be fingerprinted again
    trusted = value(kc, f"{MAGIC}.changes.trusted")
    ok(kc, cell)
    assert value(kc, f"{MAGIC}.last_result.sent['frozen_in']['bytes']") == 0
    assert value(kc, f"{MAGIC}.changes.trusted") == trusted + 1


@pytest.mark.timeout(60)
def test_remote_stdout_is_not_held_back_200_ms(kc: BlockingKernelClient) -> None:
    """ipykernel holds stdout back 200 ms by default; the host's kernels use 20 ms."""
    ok(kc, "%%remote gpu=cpu\nimport sys\nintervals = (sys.stdout.flush_interval, "
           "sys.stderr.flush_interval)")
    assert value(kc, "intervals") == (0.02, 0.02)


@pytest.mark.timeout(60)
def test_a_status_line_comes_after_what_was_printed_and_flushes_only_then(
        kc: BlockingKernelClient) -> None:
    """Each display flushes stdout and stderr first, and each flush waits for the kernel's
    IOPub thread; cloudgpu's status lines skip that only while nothing waits to be sent."""
    ex = ok(kc, "import sys\n"
                "from cloudgpu._output import publish_status\n"
                "slow, sys.stdout.flush_interval = sys.stdout.flush_interval, 3600\n"
                "publish_status('first')\n"
                "wrapper, flushes = get_ipython().display_pub._flush_streams, []\n"
                "real = wrapper.flush\n"
                "wrapper.flush = lambda: (flushes.append(1), real())\n"
                "publish_status('nothing waits')\n"
                "print('printed', end='')\n"  # held in the buffer: the interval is an hour
                "publish_status('after the print')\n"
                "wrapper.flush, sys.stdout.flush_interval = real, slow\n"
                "print('', len(flushes))")
    order = [m.content["text"] if m.msg_type == "stream" else m.content["data"]["text/plain"]
             for m in ex.of("stream", "display_data")]
    assert order == ["first", "nothing waits", "printed", "after the print", " 1\n"], \
        ex.describe()
