"""The host: a real `cloudgpu host` process, driven over HTTP and websockets.

Most tests share the `host` fixture (conftest.py): simulated H100:2,A100-80GB:1, logging at DEBUG.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cloudgpu.remote_host.host.environments import EnvironmentBuild
from cloudgpu.remote_host.host.inventory import Inventory
from servers import HostFactory, HostProcess
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from cloudgpu.errors import (
    AuthenticationError,
    HardwareUnavailableError,
    HostStartError,
    UnknownHardwareError,
)
from cloudgpu.host_client import HostClient
from cloudgpu.provider import Grant
from cloudgpu.session import RemoteSession

pytestmark = pytest.mark.timeout(90)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_inventory_is_simulated_and_says_so(host: HostProcess) -> None:
    body = host.get("/api/cloudgpu/host").json()
    inv = body["inventory"]
    assert inv["simulated"] is True
    assert [g["type"] for g in inv["gpus"]] == ["H100", "H100", "A100-80GB"]
    assert all(g["simulated"] is True for g in inv["gpus"])
    assert all("simulated" in g["name"] for g in inv["gpus"])
    assert body["python"].count(".") == 2


@pytest.mark.parametrize("token", [None, "", "wrong-token"])
def test_http_without_the_right_token_is_403_with_a_clear_message(host: HostProcess,
                                                                 token: str | None) -> None:
    for path in ("/api/cloudgpu/host", "/api/kernels", "/api/kernelspecs", "/"):
        response = host.get_as(token, path)
        assert response.status_code == 403, path
    message = host.get_as(token, "/api/kernels").json()["message"]
    assert "requires its token" in message
    assert ("missing" if not token else "wrong") in message


def test_token_in_query_also_works_but_prefix_does_not(host: HostProcess) -> None:
    assert httpx.get(f"{host.url}/api/kernels?token={host.token}").status_code == 200
    assert host.get_as(host.token[:-1], "/api/kernels").status_code == 403
    assert host.get_as(host.token + "x", "/api/kernels").status_code == 403


def test_websocket_with_a_wrong_token_is_refused(host: HostProcess) -> None:
    async def go() -> None:
        async with HostClient(host.url, host.token) as client:
            kernel = await client.request("POST", "/api/kernels", {})
        ws = host.url.replace("http", "ws") + f"/api/kernels/{kernel['id']}/channels"
        for headers in ({}, {"Authorization": "token nope"}):
            with pytest.raises(InvalidStatus) as info:
                async with connect(ws, additional_headers=headers):
                    pass
            assert info.value.response.status_code == 403
        with pytest.raises(AuthenticationError, match="refused our token"):
            await HostClient(host.url, "nope").connect(kernel["id"], lambda *a: None)
        async with HostClient(host.url, host.token) as client:
            await client.shutdown(kernel["id"])

    run(go())


def test_client_reports_a_wrong_token_clearly(host: HostProcess) -> None:
    async def go() -> None:
        async with HostClient(host.url, "not-the-token") as client:
            with pytest.raises(AuthenticationError, match="refused our token"):
                await client.info()

    run(go())


async def _request(ws: Any, msg_type: str, content: dict[str, Any],
                   metadata: dict[str, Any] | None = None) -> str:
    """Send a shell request over the default (JSON) websocket protocol; its msg_id."""
    msg_id = secrets.token_hex(8)
    await ws.send(json.dumps({
        "channel": "shell",
        "header": {"msg_id": msg_id, "msg_type": msg_type, "username": "t",
                   "session": "s", "version": "5.3"},
        "parent_header": {}, "metadata": metadata or {}, "content": content,
    }))
    return msg_id


async def _reply(ws: Any, msg_id: str, msg_type: str) -> dict[str, Any]:
    """The content of the ``msg_type`` reply to ``msg_id`` (what comes before it is skipped)."""
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if msg["msg_type"] == msg_type and msg["parent_header"].get("msg_id") == msg_id:
            content: dict[str, Any] = msg["content"]
            return content


async def _execute(ws: Any, code: str, metadata: dict[str, Any] | None = None) -> str:
    """Send an execute request over the default (JSON) websocket protocol; its msg_id."""
    return await _request(ws, "execute_request", {"code": code, "silent": False}, metadata)


async def _first_stream(ws: Any, code: str) -> str:
    """Execute ``code`` over the default (JSON) websocket protocol; the first text it prints."""
    return await _stream_of(ws, await _execute(ws, code))


async def _stream_of(ws: Any, msg_id: str) -> str:
    """The first text request ``msg_id`` prints (what comes before it is skipped)."""
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if msg["msg_type"] == "stream" and msg["parent_header"].get("msg_id") == msg_id:
            text: str = msg["content"]["text"]
            return text


async def _iopub_until_idle(
        ws: Any, code: str, metadata: dict[str, Any] | None = None,
        each: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
) -> list[dict[str, Any]]:
    """Execute ``code``; its IOPub messages, the final idle status included (each handed
    to ``each`` as it comes)."""
    msg_id = await _execute(ws, code, metadata)
    seen: list[dict[str, Any]] = []
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if msg["channel"] != "iopub" or msg["parent_header"].get("msg_id") != msg_id:
            continue
        seen.append(msg)
        if each is not None:
            await each(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return seen


@contextlib.asynccontextmanager
async def _plain_kernel(host: HostProcess) -> AsyncIterator[tuple[httpx.AsyncClient, str, Any]]:
    """A kernel started through the standard API and its websocket (the default JSON
    protocol), as any Jupyter client would have them: (HTTP client, kernel id, websocket).
    The kernel is deleted after."""
    headers = {"Authorization": f"token {host.token}"}
    async with httpx.AsyncClient(base_url=host.url, headers=headers) as http:
        kernel_id = str((await http.post("/api/kernels", json={})).json()["id"])
        try:
            ws_url = host.url.replace("http", "ws") + f"/api/kernels/{kernel_id}/channels"
            async with connect(ws_url, additional_headers=headers) as ws:
                yield http, kernel_id, ws
        finally:
            await http.delete(f"/api/kernels/{kernel_id}")


async def _wait_for(check: Callable[[], Awaitable[Any]], what: str, within: float = 30) -> Any:
    """Poll ``check`` until it answers something true; fail saying ``what`` never happened."""
    deadline = asyncio.get_running_loop().time() + within
    while (answer := await check()) is None or answer is False:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} within {within:.0f} s")
        await asyncio.sleep(0.05)
    return answer


def _printed(msgs: list[dict[str, Any]]) -> str:
    """What ``msgs`` (a cell's IOPub messages) printed, stdout and stderr together."""
    return "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream")


def test_any_jupyter_client_can_drive_a_host_kernel(host: HostProcess) -> None:
    """The standard kernel API with the default (JSON) websocket protocol, no cloudgpu client."""

    async def go() -> str:
        async with _plain_kernel(host) as (_, _, ws):
            text = await _first_stream(ws, "import os; print('gpus=[' + os.environ.get("
                                           "'CUDA_VISIBLE_DEVICES', '?') + ']')")
        return text

    # A kernel started through the plain API holds no GPU.
    assert run(go()).strip() == "gpus=[]"


def test_a_new_host_kernel_has_not_imported_numpy(host: HostProcess) -> None:
    """The agent imports numpy only once a big value needs it: at boot it cost each kernel
    a third of its CPU time (0.46 against 0.32 s, BLAS threads and all), on hosts that
    start many kernels at once."""
    async def go() -> str:
        async with _plain_kernel(host) as (_, _, ws):
            return await _first_stream(ws, "import sys; print('numpy' in sys.modules)")

    assert run(go()).strip() == "False"


def test_the_agent_echoes_inputs_unless_asked_not_to(host: HostProcess) -> None:
    """cloudgpu's clients ask for no ``execute_input`` (they ignore it: one message fewer
    through the host per cell); any other client gets it. The kernel's logger builds no
    debug records its handlers would drop."""

    async def go() -> tuple[list[str], list[str], str]:
        async with _plain_kernel(host) as (_, _, ws):
            plain = await _iopub_until_idle(ws, "pass")
            quiet = await _iopub_until_idle(ws, "pass", {"cloudgpu": {"echo": False}})
            levels = await _iopub_until_idle(
                ws, "import logging\nlog = get_ipython().kernel.log\n"
                    "print(log.getEffectiveLevel(), min(h.level for h in log.handlers))")
        return [m["msg_type"] for m in plain], [m["msg_type"] for m in quiet], _printed(levels)

    plain, quiet, printed = run(go())
    assert plain == ["status", "execute_input", "status"]
    assert quiet == ["status", "status"]
    level, lowest_handler = printed.split()
    assert level == lowest_handler and int(level) > logging.DEBUG


def test_the_reply_waits_for_no_sleep_and_every_output_still_comes_before_idle(
        host: HostProcess) -> None:
    """The remote kernel sends its reply without ipykernel's 0.5 ms sleep, and its stdout
    and stderr skip a flush only when nothing is buffered: text flushed, and text still
    buffered when the cell ends, each arrive whole, in order, before the cell's idle."""
    code = ("import sys\n"
            "print(get_ipython().kernel._execute_sleep)\n"
            "sys.stdout.write('a'); sys.stdout.flush(); sys.stdout.flush()\n"
            "sys.stdout.write('b'); sys.stderr.write('e')")

    async def go() -> list[dict[str, Any]]:
        async with _plain_kernel(host) as (_, _, ws):
            seen = [await _iopub_until_idle(ws, code) for _ in range(3)]
        return [m for msgs in seen for m in msgs]

    seen = run(go())
    for name, whole in (("stdout", "0.0\nab" * 3), ("stderr", "e" * 3)):
        assert "".join(m["content"]["text"] for m in seen if m["msg_type"] == "stream"
                       and m["content"]["name"] == name) == whole, seen


def test_the_kernel_receives_cells_on_its_main_thread_and_awaits_and_interrupts_alike(
        host: HostProcess) -> None:
    """The remote kernel reads shell messages where its cells run (no shell channel thread,
    no subshells offered), and what depended on that thread still works: a cell with a
    top-level ``await``, interrupting one, and cells after a failed one."""
    report = ("import threading\n"
              "print(threading.current_thread() is threading.main_thread(),\n"
              "      sorted(t.name for t in threading.enumerate() if 'hell' in t.name))")

    async def go() -> dict[str, Any]:
        async with _plain_kernel(host) as (http, kernel_id, ws):
            seen: dict[str, Any] = {"info": await _kernel_info(ws)}
            seen["threads"] = await _iopub_until_idle(ws, report)
            seen["awaited"] = await _iopub_until_idle(
                ws, "import asyncio\nawait asyncio.sleep(0)\nprint('awaited')")

            async def interrupt_once_awaiting(msg: dict[str, Any]) -> None:
                if msg["msg_type"] == "stream":
                    await http.post(f"/api/kernels/{kernel_id}/interrupt")

            seen["interrupted"] = await _iopub_until_idle(
                ws, "print('waiting', flush=True)\nawait asyncio.sleep(600)",
                each=interrupt_once_awaiting)
            seen["failed"] = await _iopub_until_idle(ws, "1 / 0")
            seen["after"] = await _iopub_until_idle(ws, "print('after')")
        return seen

    def errors(msgs: list[dict[str, Any]]) -> list[str]:
        return [m["content"]["ename"] for m in msgs if m["msg_type"] == "error"]

    seen = run(go())
    assert "kernel subshells" not in seen["info"].get("supported_features", [])
    assert _printed(seen["threads"]) == "True []\n"
    assert _printed(seen["awaited"]) == "awaited\n"
    assert errors(seen["interrupted"]) in (["KeyboardInterrupt"], ["CancelledError"])
    assert errors(seen["failed"]) == ["ZeroDivisionError"]
    assert _printed(seen["after"]) == "after\n"


def test_after_a_failed_cell_only_the_cells_already_sent_are_skipped(host: HostProcess) -> None:
    """Stop-on-error, exactly: a cell that reached the kernel before a failed cell answered
    is skipped (``aborted``, as Run All expects), and a cell sent on seeing the failure runs
    however soon it comes, even while a thread of the user's keeps the interpreter busy
    (ipykernel went on skipping for a few loop turns: 13 of 20 such cells were skipped)."""
    wait_for_the_next_then_fail = (
        "import asyncio\n"
        "while get_ipython().kernel.shell_received < n + 2:\n"
        "    await asyncio.sleep(0.01)\n"
        "1 / 0")
    busy_then_fail = ("import threading\n"  # busy until the next cell that runs starts
                      "stop = threading.Event()\n"
                      "def busy(stop=stop):\n"
                      "    while not stop.is_set():\n"
                      "        pass\n"
                      "threading.Thread(target=busy, daemon=True).start()\n"
                      "get_ipython().events.register('pre_execute', stop.set)\n"
                      "1 / 0")

    async def go() -> tuple[list[str], list[str]]:
        async with _plain_kernel(host) as (_, _, ws):
            counted = await _execute(ws, "n = get_ipython().kernel.shell_received")
            assert await _reply_status(ws, counted) == "ok"
            queued = [await _execute(ws, wait_for_the_next_then_fail),
                      await _execute(ws, "print('never')")]
            behind = [await _reply_status(ws, msg_id) for msg_id in queued]
            after = []
            for _ in range(10):
                assert await _reply_status(ws, await _execute(ws, busy_then_fail)) == "error"
                after.append(await _reply_status(ws, await _execute(ws, "pass")))
        return behind, after

    behind, after = run(go())
    assert behind == ["error", "aborted"]
    assert after == ["ok"] * 10


async def _reply_status(ws: Any, msg_id: str) -> str:
    """The status of the ``execute_reply`` to ``msg_id``."""
    return str((await _reply(ws, msg_id, "execute_reply"))["status"])


def test_what_the_agent_does_after_an_execution_waits_for_the_cells_answer(
        host: HostProcess) -> None:
    """The agent checks the values it holds after each execution, on a thread; that work
    is started from the kernel's loop once the cell has answered, never inside the cell
    (where it started before, as the kernel's loop did not exist yet when the agent
    loaded), so it never delays a reply."""
    defer = ("ran = []\n"
             "get_ipython().cloudgpu_agent.held._later(lambda: ran.append('after'))\n"
             "print(ran)")

    async def go() -> tuple[str, str]:
        async with _plain_kernel(host) as (_, _, ws):
            during = await _iopub_until_idle(ws, defer)
            after = await _iopub_until_idle(ws, "print(ran)")
        return _printed(during), _printed(after)

    assert run(go()) == ("[]\n", "['after']\n")


async def _kernel_info(ws: Any) -> dict[str, Any]:
    """The kernel's ``kernel_info_reply`` content, over the default (JSON) protocol."""
    return await _reply(ws, await _request(ws, "kernel_info_request", {}), "kernel_info_reply")


def test_the_kernel_model_follows_what_the_kernel_does(host: HostProcess,
                                                      tmp_path: Path) -> None:
    """``execution_state`` and ``last_activity``, which the pool culls idle sessions by, come
    from the host's own watcher of each kernel's IOPub messages (kernels.py)."""
    go_on = tmp_path / "go-on"

    async def model_until(http: httpx.AsyncClient, kernel_id: str, state: str) -> Any:
        async def reads() -> Any:  # the watcher sees the message a moment after the client
            model = (await http.get(f"/api/kernels/{kernel_id}")).json()
            return model if model["execution_state"] == state else None

        return await _wait_for(reads, f"the kernel never read as {state}")

    async def go() -> None:
        async with _plain_kernel(host) as (http, kernel_id, ws):
            await _first_stream(ws, "import pathlib, time\nprint('running', flush=True)\n"
                                    f"while not pathlib.Path({str(go_on)!r}).exists():\n"
                                    "    time.sleep(0.01)")
            busy = await model_until(http, kernel_id, "busy")
            go_on.touch()
            idle = await model_until(http, kernel_id, "idle")
            assert idle["last_activity"] > busy["last_activity"]

    run(go())


def test_gpu_kernels_get_their_own_devices_and_free_them(host: HostProcess) -> None:
    async def go() -> None:
        async with HostClient(host.url, host.token) as client:
            two = await client.start_kernel("H100:2")
            assert [g["index"] for g in two["cloudgpu"]["gpus"]] == [0, 1]
            with pytest.raises(HardwareUnavailableError, match="H100: 0 free"):
                await client.start_kernel("H100")
            a100 = await client.start_kernel("H100|A100-80GB")  # fallback to what is free
            assert [g["type"] for g in a100["cloudgpu"]["gpus"]] == ["A100-80GB"]

            grant = Grant(host.url, host.token, two["id"], "H100:2", two["cloudgpu"]["gpus"], True)
            session = await RemoteSession.open(grant)
            out: list[str] = []
            result = await session.run_cell(
                "import os; print(os.environ['CUDA_VISIBLE_DEVICES'], "
                "os.environ['CLOUDGPU_SIMULATED_GPUS'])", {}, [],
                lambda kind, msg: out.append(msg["content"].get("text", "")),
            )
            assert result.status == "ok"
            assert "".join(out).split() == ["0,1", "H100,H100"]
            await session.close(shutdown=True)
            await client.shutdown(a100["id"])

            inv = (await client.info())["inventory"]
            assert all(g["kernel_id"] is None for g in inv["gpus"])
            again = await client.start_kernel("H100")
            await client.shutdown(again["id"])

    run(go())


def test_unknown_hardware_is_400_naming_it(host: HostProcess) -> None:
    async def go() -> None:
        async with HostClient(host.url, host.token) as client:
            with pytest.raises(UnknownHardwareError, match="H1000"):
                await client.start_kernel("H1000")

    run(go())


def test_host_listens_on_loopback_only_and_never_logs_the_token(host: HostProcess) -> None:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    mine = [line for line in out.splitlines() if f"pid={host.proc.pid}," in line]
    assert mine, out
    for line in mine:
        local = line.split()[3]
        assert local.startswith(("127.0.0.1:", "[::1]:")), line
    # The log ran at DEBUG through every request above, good and bad.
    log = host.log.read_text()
    assert "Kernel started" in log
    assert host.token not in log
    assert not re.search(r"token=[0-9a-f]{20,}", log)


def test_nvml_absent_means_cpu_only() -> None:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver; the CPU-only path cannot be seen here")
    except pynvml.NVMLError:
        pass
    inv = Inventory.discover(None)
    assert inv.devices == [] and inv.simulated is False
    assert inv.to_json()["gpus"] == []


def test_simulated_host_keeps_only_the_gpus_it_was_given() -> None:
    # A Ray session's host: Ray assigned device 1 of the node's two.
    inv = Inventory.simulate("H100:2").restrict("1")
    assert [(d.index, d.type, d.simulated) for d in inv.devices] == [(1, "H100", True)]
    assert Inventory.simulate("H100:2").restrict("SIM-H100-0,1").devices == \
        Inventory.simulate("H100:2").devices
    assert Inventory.simulate("H100:2").restrict("none").devices == []
    with pytest.raises(HostStartError, match="given GPU `3`, which it does not have"):
        Inventory.simulate("H100:2").restrict("3")


@pytest.mark.gpu
def test_real_gpus_come_from_nvml() -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        pytest.skip(f"no NVIDIA driver here ({e}); real-GPU inventory needs one")
    count = pynvml.nvmlDeviceGetCount()
    pynvml.nvmlShutdown()
    inv = Inventory.discover(None)
    assert len(inv.devices) == count > 0
    assert not inv.simulated
    assert inv.driver and inv.cuda


def test_a_scoped_token_opens_its_kernel_and_nothing_else(host: HostProcess) -> None:
    scoped = secrets.token_urlsafe(32)

    async def go() -> None:
        async with HostClient(host.url, host.token) as admin:
            mine = await admin.start_kernel("cpu", scoped_token=scoped)
            other = await admin.start_kernel("cpu")
            async with HostClient(host.url, scoped) as user:
                assert (await user.kernel(mine["id"]))["id"] == mine["id"]
                await user.interrupt(mine["id"])
                conn = await user.connect(mine["id"], lambda *a: None)
                await conn.close()
                for method, path in [("GET", "/api/kernels"), ("GET", "/api/cloudgpu/host"),
                                     ("GET", f"/api/kernels/{other['id']}"),
                                     ("DELETE", f"/api/kernels/{other['id']}"),
                                     ("POST", "/api/cloudgpu/kernels"),
                                     ("POST", f"/api/cloudgpu/kernels/{mine['id']}/stop")]:
                    with pytest.raises(AuthenticationError, match="scoped to one kernel"):
                        await user.request(method, path)
                with pytest.raises(AuthenticationError):
                    await user.connect(other["id"], lambda *a: None)
                await admin.shutdown(mine["id"])
                # The kernel is gone, and so is its token, which says so.
                with pytest.raises(AuthenticationError, match="has ended; the token no longer"):
                    await user.kernel(mine["id"])
            await admin.shutdown(other["id"])

    run(go())


def test_kernels_start_under_a_deep_runtime_dir(tmp_path: Path,
                                                host_factory: HostFactory) -> None:
    """IPC socket paths are limited to 107 bytes; a deep Jupyter runtime dir must not matter."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    host = host_factory.start(name="deep-runtime-dir", env={"JUPYTER_RUNTIME_DIR": str(deep)})
    try:
        async def go() -> None:
            async with HostClient(host.url, host.token) as client:
                kernel = await client.start_kernel("cpu")
                assert (await client.kernel(kernel["id"]))["execution_state"] != "dead"
                await client.shutdown(kernel["id"])

        run(go())
    finally:
        host.stop()


def test_big_messages_keep_the_standard_v1_framing(host: HostProcess) -> None:
    """Messages of 1 MiB+ take the host's copy-free path; Jupyter's own decoder must read them."""
    from jupyter_server.services.kernels.connection.base import deserialize_msg_from_ws_v1

    from cloudgpu import _wire

    async def go() -> dict[str, Any]:
        headers = {"Authorization": f"token {host.token}"}
        async with HostClient(host.url, host.token) as client:
            kernel = await client.request("POST", "/api/kernels", {})
        ws_url = host.url.replace("http", "ws") + f"/api/kernels/{kernel['id']}/channels"
        async with connect(ws_url, additional_headers=headers, max_size=None,
                           subprotocols=[_wire.SUBPROTOCOL]) as ws:  # type: ignore[list-item]
            msg = _wire.new_message("execute_request", {
                "code": "print('x' * 3_000_000)", "silent": False}, "s")
            await ws.send(_wire.encode("shell", msg))
            while True:
                data = await asyncio.wait_for(ws.recv(), 30)
                channel, parts = deserialize_msg_from_ws_v1(data)
                header = json.loads(parts[0])
                if channel == "iopub" and header["msg_type"] == "stream":
                    content: dict[str, Any] = json.loads(parts[3])
                    break
        async with HostClient(host.url, host.token) as client:
            await client.shutdown(kernel["id"])
        return content

    content = run(go())
    # (A timed flush can send the closing newline in a message of its own.)
    assert content["text"].rstrip("\n") == "x" * 3_000_000



def test_a_kernel_still_starting_is_listed_as_starting() -> None:
    """Jupyter keeps a starting kernel in its map a moment before it has a last_activity;
    its own model of it raised then, and every `GET /api/kernels` at that moment was a 500.

    The moment is one event-loop turn wide, so the test makes it: a real kernel manager
    that has not started yet, in the host's kernel map.
    """
    from cloudgpu.remote_host.host.kernels import GPUKernelManager
    from jupyter_client.ioloop import AsyncIOLoopKernelManager

    from cloudgpu.hardware import Catalog

    manager = GPUKernelManager(inventory=Inventory([]), catalog=Catalog.default())
    manager._kernels["k-1"] = AsyncIOLoopKernelManager(kernel_name="cloudgpu-python")
    (model,) = manager.list_kernels()
    assert model["id"] == "k-1" and model["execution_state"] == "starting"
    assert model["cloudgpu"]["gpus"] == [] and model["cloudgpu"]["environment"] == []


def test_a_client_polling_an_environment_by_version_misses_none_of_its_lines(
        tmp_path: Path) -> None:
    """uv can print several lines between two long polls: each answer carries every line
    after the version the client had (only the latest was kept, so a notebook's status
    missed some, ``+ tabulate==0.9.0`` among them)."""
    build = EnvironmentBuild("0123", ["tabulate==0.9.0"], tmp_path)
    build.update(progress="installing tabulate==0.9.0 ...")
    seen = build.to_json()
    for line in ("Resolved 1 package in 5ms", "+ tabulate==0.9.0"):
        build.update(progress=line)
    build.update(state="ready")  # no line of its own
    later = build.to_json(since=seen["version"])
    assert seen["lines"] == ["installing tabulate==0.9.0 ..."]
    assert later["lines"] == ["Resolved 1 package in 5ms", "+ tabulate==0.9.0"]
    assert later["progress"] == "+ tabulate==0.9.0" and later["state"] == "ready"
    assert build.to_json(since=later["version"])["lines"] == []


def test_environment_requests_are_checked_and_unknown_ones_are_404(host: HostProcess) -> None:
    headers = {"Authorization": f"token {host.token}"}
    response = httpx.post(f"{host.url}/api/cloudgpu/kernels", headers=headers, timeout=30,
                          json={"hardware": "cpu", "environment": "tabulate"})
    assert response.status_code == 400
    assert response.json()["error"] == "InvalidRequestError"
    assert "must be a list of pip requirement strings" in response.json()["message"]
    response = httpx.post(f"{host.url}/api/cloudgpu/environments", headers=headers, timeout=30,
                          json={"requirements": []})
    assert response.status_code == 400 and "Name the requirements" in response.text
    assert host.get("/api/cloudgpu/environments/0123456789abcdef").status_code == 404


# --- stopping a kernel only if idle (the pool's idle culling) -----------------------------

def _blocker(armed: Path, blocking: Path, go_on: Path) -> str:
    """Cell code that, once ``armed`` exists, blocks the kernel's loop (so requests wait in
    its sockets, unread, while the kernel reads as idle) until ``go_on`` exists;
    ``blocking`` says it has started."""
    return (
        "import asyncio, pathlib, threading, time\n"
        "_loop = asyncio.get_event_loop()\n"
        "def _wait(path):\n"
        "    while not pathlib.Path(path).exists():\n"
        "        time.sleep(0.01)\n"
        "def _block():\n"
        f"    pathlib.Path({str(blocking)!r}).touch()\n"
        f"    _wait({str(go_on)!r})\n"
        "def _arm():\n"
        f"    _wait({str(armed)!r})\n"
        "    _loop.call_soon_threadsafe(_block)\n"
        "threading.Thread(target=_arm, daemon=True).start()\n"
    )


def test_a_cell_the_host_relayed_keeps_the_kernel_from_an_idle_stop(host: HostProcess,
                                                                    tmp_path: Path) -> None:
    """The pool stops an idle kernel only if nothing happened after the ``last_activity``
    it read. A cell counts the moment the host relays it, before the kernel says it is
    busy: here the kernel's loop is blocked, so it cannot say so at all."""
    armed, blocking, go_on = (tmp_path / n for n in ("armed", "blocking", "go-on"))

    async def go() -> None:
        async with _plain_kernel(host) as (http, kernel_id, ws):
            async def idle_after(earlier: dict[str, Any]) -> dict[str, Any] | None:
                """The kernel's model once the host's watcher saw a cell end after
                ``earlier`` (the watcher reads IOPub beside the websocket, a moment apart)."""
                model = (await http.get(f"/api/kernels/{kernel_id}")).json()
                return model if model["execution_state"] == "idle" and \
                    model["last_activity"] > earlier["last_activity"] else None

            started = (await http.get(f"/api/kernels/{kernel_id}")).json()
            await _iopub_until_idle(ws, _blocker(armed, blocking, go_on))
            before = await _wait_for(lambda: idle_after(started),
                                     "the host never saw the first cell end")
            armed.touch()
            await _wait_for(lambda: asyncio.to_thread(blocking.exists),
                            "the kernel's loop never blocked")
            msg_id = await _execute(ws, "print('ran after all')")

            async def relayed() -> dict[str, Any] | None:
                model = (await http.get(f"/api/kernels/{kernel_id}")).json()
                return model if model["last_activity"] > before["last_activity"] else None

            after = await _wait_for(relayed, "the host never counted the relayed cell as "
                                             "activity")
            assert after["execution_state"] == "idle", after  # the kernel has not seen it
            stop = f"/api/cloudgpu/kernels/{kernel_id}/stop"
            refused = (await http.post(stop, json={
                "reason": "idle", "if_idle_since": before["last_activity"]})).json()
            assert refused["stopped"] is False and refused["id"] == kernel_id, refused
            go_on.touch()
            assert await _stream_of(ws, msg_id) == "ran after all\n"  # nothing was lost
            last = (await _wait_for(lambda: idle_after(after),
                                    "the host never saw the cell end"))["last_activity"]
            response = await http.post(stop, json={"reason": "idle: nothing ran for 2 s",
                                                   "if_idle_since": last})
            assert response.json() == {"stopped": True}, response.text
            end = (await http.get(f"/api/cloudgpu/kernels/{kernel_id}")).json()["cloudgpu"]
            assert end["state"] == "stopped", end
            assert end["stopped_for"] == "idle: nothing ran for 2 s", end

    run(go())


def test_what_a_client_sends_to_a_kernel_being_shut_down_is_dropped(host: HostProcess,
                                                                   tmp_path: Path) -> None:
    """A cell that arrives while its kernel is being shut down must not start in it."""
    armed, blocking, go_on = (tmp_path / n for n in ("armed", "blocking", "go-on"))
    ran = tmp_path / "ran"

    async def go() -> None:
        async with _plain_kernel(host) as (http, kernel_id, ws):
            await _iopub_until_idle(ws, _blocker(armed, blocking, go_on))
            armed.touch()  # the kernel cannot take the shutdown request until go_on
            await _wait_for(lambda: asyncio.to_thread(blocking.exists),
                            "the kernel's loop never blocked")
            stopping = asyncio.ensure_future(http.post(
                f"/api/cloudgpu/kernels/{kernel_id}/stop", json={"reason": "a test"},
                timeout=60))

            async def state() -> str | None:
                model = (await http.get(f"/api/cloudgpu/kernels/{kernel_id}")).json()
                return "stopping" if model["cloudgpu"]["state"] == "stopping" else None

            await _wait_for(state, "the kernel never read as stopping")
            await _execute(ws, f"import pathlib; pathlib.Path({str(ran)!r}).touch()")
            await _wait_for(lambda: asyncio.to_thread(
                lambda: f"Dropped a message for kernel {kernel_id}" in host.log.read_text()),
                "the host never said it dropped the cell")
            go_on.touch()
            assert (await stopping).json() == {"stopped": True}
            end = (await http.get(f"/api/cloudgpu/kernels/{kernel_id}")).json()["cloudgpu"]
            assert end["state"] == "stopped" and end["stopped_for"] == "a test", end
            assert not ran.exists(), "the cell ran in a kernel being shut down"

    run(go())


def test_a_bad_stop_request_is_400_saying_what_to_send(host: HostProcess) -> None:
    bad = [([], "must be a JSON object"), ({}, "`reason` must be a string"),
           ({"reason": "x" * 501}, "`reason` must be a string"),
           ({"reason": "idle", "if_idle_since": "soon"}, "`if_idle_since` must be a time"),
           ({"reason": "idle", "if_idle_since": "2026-12-07T06:00:00"}, "with its zone")]

    async def go() -> None:
        headers = {"Authorization": f"token {host.token}"}
        async with HostClient(host.url, host.token) as client, \
                httpx.AsyncClient(base_url=host.url, headers=headers, timeout=30) as http:
            kernel_id = (await client.request("POST", "/api/kernels", {}))["id"]
            stop = f"/api/cloudgpu/kernels/{kernel_id}/stop"
            for body, message in bad:
                response = await http.post(stop, json=body)
                assert response.status_code == 400, (body, response.text)
                assert response.json()["error"] == "InvalidRequestError"
                assert message in response.json()["message"], (body, response.text)
            assert await client.kernel(kernel_id) is not None  # none of them stopped it
            await client.shutdown(kernel_id)
            missing = await http.post(stop, json={"reason": "idle"})
            assert missing.status_code == 404, missing.text

    run(go())
