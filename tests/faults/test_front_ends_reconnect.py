"""``%%remote`` and the Cloud GPU kernel through a network that drops: the cell's output is
complete, in order, once, and the notebook says what happened.

A real local ipykernel (``%load_ext cloudgpu``) and a real Cloud GPU kernel, each pointed
at a real pool (``CLOUDGPU_POOL``) whose host is reached through the test's TCP proxy.
The proxy drops every connection when a given output line reaches the notebook, or holds
back what the host sends while the test does something the notebook has not heard of yet.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from kernel_driver import CLIENT, Message, ok, run, start_kernel, stop_kernel, value
from servers import HostProcess, PoolProcess, wait_until
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(120)

CELL_BODY = ("import time\nfor i in range(120):\n    print('line', i, flush=True)\n"
             "    time.sleep(0.01)\n")
EXPECTED = "".join(f"line {i}\n" for i in range(120))


def dropper(proxy: TcpProxy, at: str = "line 15\n") -> tuple[list[int], object]:
    """Drop the proxy's connections once ``at`` has reached the notebook.

    The text seen so far is searched, not each message: a kernel's timed flush can split
    one ``print`` across two stream messages.
    """
    dropped: list[int] = []
    seen: list[str] = []

    def on_message(m: Message) -> None:
        if dropped or m.msg_type != "stream" or m.content.get("name") != "stdout":
            return
        seen.append(m.content.get("text", ""))
        if at in "".join(seen):
            dropped.append(proxy.drop())

    return dropped, on_message


@pytest.fixture(scope="module")
def notebook(proxied_pool: PoolProcess) -> Iterator[BlockingKernelClient]:
    km, kc = start_kernel(CLOUDGPU_POOL=proxied_pool.url, CLOUDGPU_TOKEN=proxied_pool.token)
    try:
        ok(kc, "%load_ext cloudgpu")
        yield kc
    finally:
        stop_kernel(km, kc)


def test_magic_cell_output_is_whole_after_a_drop(notebook: BlockingKernelClient,
                                                  proxy: TcpProxy) -> None:
    ok(notebook, "%%remote gpu=cpu\nwarm = 1", timeout=90)
    dropped, on_message = dropper(proxy)
    ex = run(notebook, "%%remote gpu=cpu\n" + CELL_BODY + "done = 'yes'", on_message=on_message)
    assert dropped and dropped[0] >= 1, "the proxy had no connection to drop"
    assert ex.status == "ok", ex.describe()
    assert ex.stream() == EXPECTED
    notes = ex.stream("stderr")
    assert "the connection to the host dropped; reconnecting" in notes, notes
    assert "nothing was lost" in notes, notes
    # The session is the same one, and the value came back.
    assert ok(notebook, "%%remote gpu=cpu\nprint(warm + 1)").stream() == "2\n"
    assert ok(notebook, "print(done)").stream() == "yes\n"


def test_a_magic_cell_sent_as_the_pool_stops_its_session_runs_on_a_new_one(
        notebook: BlockingKernelClient, proxied_pool: PoolProcess, proxy: TcpProxy,
        host: HostProcess) -> None:
    ok(notebook, "%%remote gpu=cpu\nbefore = 'old session'", timeout=90)
    old = value(notebook, f"{CLIENT}.sessions['cpu'].grant.session_id")
    kernel_id = value(notebook, f"{CLIENT}.sessions['cpu'].kernel_id")
    # The pool stops the session; the host's word of it (the kernel's websocket closing)
    # waits in the proxy, so the notebook sends its next cell to the stopped kernel.
    assert proxy.hold() >= 1, "the notebook had no websocket to the host"
    try:
        stop = proxied_pool.request("DELETE", f"/api/sessions/{old}")
        assert stop.status_code == 200, stop.text
        wait_until(lambda: not host.kernel_alive(kernel_id), what="the host stopping the kernel")
        assert value(notebook, f"{CLIENT}.sessions['cpu'].alive") is True

        def release_once_sent() -> None:
            # An execute request is hundreds of bytes; a websocket ping a few.
            wait_until(lambda: proxy.sent_while_held() > 300, within=60,
                       what="the cell's request reaching the proxy")
            proxy.release()

        threading.Thread(target=release_once_sent, daemon=True).start()
        ex = run(notebook, "%%remote gpu=cpu\nafter = before.replace('old', 'new')\n"
                           "print(after)", timeout=90)
    finally:
        proxy.release()
    assert ex.status == "ok", ex.describe()
    assert ex.stream() == "new session\n"
    notes = [line for line in ex.status_lines() if "previous one was stopped" in line]
    assert notes and "stopped by its owner" in notes[0], ex.describe()
    assert value(notebook, "after") == "new session"
    assert value(notebook, f"{CLIENT}.sessions['cpu'].grant.session_id") != old


#: Run in the remote kernel: its next execute request publishes no busy status, as when the
#: kernel crashes before the status it queued leaves the process. With ``echo`` off nothing
#: else is published before the cell's code runs, so the notebook hears nothing of it.
HIDE_NEXT_BUSY = """\
_k = get_ipython().kernel
_publish = _k._publish_status
def _quiet(status, channel, parent=None):
    if status == 'busy' and channel == 'shell' and \\
            _k.get_parent('shell')['header']['msg_type'] == 'execute_request':
        _k._publish_status = _publish
        return
    _publish(status, channel, parent)
_k._publish_status = _quiet
"""


def test_a_magic_cell_whose_kernel_dies_before_a_word_of_it_comes_back_is_not_rerun(
        notebook: BlockingKernelClient) -> None:
    # A cell that kills its kernel at once (a crashing C extension, an instant OOM kill)
    # may leave before any message of it does. It reached the kernel: running it again on a
    # new session would repeat whatever it did before it crashed.
    ok(notebook, "%%remote gpu=cpu\n" + HIDE_NEXT_BUSY, timeout=90)
    ok(notebook, f"_crashing = {CLIENT}.sessions['cpu']")
    ex = run(notebook, "%%remote gpu=cpu\nimport os\nos._exit(3)", timeout=90)
    assert value(notebook, "_crashing.last_cell_reached") is False, \
        "the notebook heard of the cell: this test no longer covers the unheard case"
    assert ex.status == "error", ex.describe()
    assert "died" in ex.error_text() and "exited with code 3" in ex.error_text(), ex.describe()
    assert not [line for line in ex.status_lines() if "previous one was stopped" in line], \
        ex.describe()
    # The next cell starts a new session, as the error says.
    assert ok(notebook, "%%remote gpu=cpu\nprint('fresh')", timeout=90).stream() == "fresh\n"


def test_cloud_gpu_kernel_cell_output_is_whole_after_a_drop(
        proxied_pool: PoolProcess, proxy: TcpProxy, kernelspecs: Path) -> None:
    km, kc = start_kernel("cloudgpu-cpu", CLOUDGPU_POOL=proxied_pool.url,
                          CLOUDGPU_TOKEN=proxied_pool.token)
    try:
        ok(kc, "kept = 41", timeout=90)
        dropped, on_message = dropper(proxy)
        ex = run(kc, CELL_BODY, on_message=on_message)
        assert dropped and dropped[0] >= 1, "the proxy had no connection to drop"
        assert ex.status == "ok", ex.describe()
        assert ex.stream() == EXPECTED
        notes = ex.stream("stderr")
        assert "reconnecting" in notes and "nothing was lost" in notes, notes
        assert ok(kc, "print(kept + 1)").stream() == "42\n"  # same kernel, state kept
    finally:
        stop_kernel(km, kc)
