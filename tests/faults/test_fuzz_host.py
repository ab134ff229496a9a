"""A fuzzer against a live host: malformed frames, messages and JSON never crash it, and a
healthy session beside them keeps working.

Hypothesis generates what a broken or hostile client could send: random bytes, v1 frames
whose offsets lie, Jupyter messages with missing or mistyped fields, wrong channels, text
frames on a binary protocol, garbage JSON bodies to the REST API. Each example goes to a
real ``cloudgpu host`` over a real websocket (or HTTP); after each, the host must still
answer, and a real session on another kernel must still run a cell to the end.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import HostProcess
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from cloudgpu import _wire
from cloudgpu.host_client import HostClient
from cloudgpu.provider import Grant
from cloudgpu.session import RemoteSession

pytestmark = pytest.mark.timeout(300)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
msg_types = st.sampled_from(["execute_request", "comm_msg", "comm_open", "kernel_info_request",
                             "complete_request", "shutdown_request", "input_reply", "bogus"])
channels = st.sampled_from(["shell", "control", "stdin", "iopub", "hb", "nope", ""])


@st.composite
def jupyter_messages(draw: st.DrawFn) -> dict[str, Any]:
    """A Jupyter message with each field possibly missing, mistyped or strange."""
    header: Any = {"msg_id": draw(st.text(max_size=10)), "msg_type": draw(msg_types),
                   "session": draw(st.text(max_size=10)), "username": "fuzz",
                   "version": draw(st.sampled_from(["5.3", "", "99"]))}
    if draw(st.booleans()):
        header = draw(json_values)
    msg = {"header": header, "parent_header": draw(json_values),
           "metadata": draw(json_values), "content": draw(json_values)}
    for key in draw(st.sets(st.sampled_from(list(msg)), max_size=2)):
        del msg[key]
    return msg


@st.composite
def frames(draw: st.DrawFn) -> bytes | str:
    """One websocket message a broken client might send on the v1 protocol."""
    kind = draw(st.sampled_from(["bytes", "text", "v1", "lying-offsets", "json-parts"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "text":
        return draw(st.text(max_size=200))
    msg = draw(jupyter_messages())
    parts = [json.dumps(msg.get(k, {})).encode() for k in
             ("header", "parent_header", "metadata", "content")]
    if kind == "json-parts":
        parts = [draw(st.binary(max_size=40)) for _ in parts]
    channel = draw(channels).encode()
    frame = _wire.v1_header(channel, parts) + channel + b"".join(parts)
    if kind == "lying-offsets":
        count = draw(st.integers(0, 12))
        offsets = draw(st.lists(st.integers(-2**40, 2**40), min_size=count, max_size=count))
        head = struct.pack("<q", count) + b"".join(struct.pack("<q", o) for o in offsets)
        return head + frame[8 + 8 * len(parts) + 16:]
    return frame


class Fuzzer:
    """A websocket to a fuzzed kernel (reopened when the host closes it) and a healthy
    session on another kernel, both on their own event loop."""

    def __init__(self, host: HostProcess) -> None:
        self.host = host
        self.loop = asyncio.new_event_loop()
        self.ws: ClientConnection | None = None
        self.admin = HostClient(host.url, host.token)
        self.run(self._start())

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 60))

    async def _start(self) -> None:
        self.victim = (await self.admin.start_kernel("cpu"))["id"]
        healthy = (await self.admin.start_kernel("cpu"))["id"]
        self.session = await RemoteSession.open(
            Grant(self.host.url, self.host.token, healthy, "cpu"))

    async def _socket(self) -> ClientConnection:
        if self.ws is None or self.ws.close_code is not None:
            url = self.host.url.replace("http", "ws") + f"/api/kernels/{self.victim}/channels"
            headers = {"Authorization": f"token {self.host.token}"}
            self.ws = await connect(url, max_size=None, additional_headers=headers,
                                    subprotocols=[_wire.SUBPROTOCOL])  # type: ignore[list-item]
        return self.ws

    async def send(self, frame: bytes | str) -> None:
        ws = await self._socket()
        try:
            await ws.send(frame)
        except ConnectionClosed:
            self.ws = None

    async def healthy(self) -> str:
        out: list[str] = []
        result = await self.session.run_cell(
            "print(sum(range(10)))", {}, [],
            lambda kind, msg: out.append(msg["content"].get("text", ""))
            if kind == "output" else None)
        assert result.status == "ok", result.error
        return "".join(out)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        await self.session.close(shutdown=True)
        await self.admin.shutdown(self.victim)
        await self.admin.aclose()


@pytest.fixture(scope="module")
def fuzzer(host: HostProcess) -> Iterator[Fuzzer]:
    started = Fuzzer(host)
    yield started
    started.run(started.close())
    started.loop.close()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.data_too_large])
@given(batch=st.lists(frames(), min_size=1, max_size=5))
def test_malformed_websocket_frames_never_hurt_the_host_or_a_session_beside_them(
        fuzzer: Fuzzer, host: HostProcess, batch: list[bytes | str]) -> None:
    for frame in batch:
        fuzzer.run(fuzzer.send(frame))
    assert host.proc.poll() is None, "the host died"
    assert fuzzer.run(fuzzer.healthy()) == "45\n"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.one_of(json_values.map(json.dumps), st.binary(max_size=200).map(repr)),
       path=st.sampled_from(["/api/cloudgpu/kernels", "/api/kernels",
                             "/api/cloudgpu/kernels/0000", "/api/kernels/0000/interrupt"]))
def test_malformed_rest_bodies_get_client_errors_never_500(
        host: HostProcess, body: str, path: str) -> None:
    response = httpx.post(host.url + path, content=body, timeout=30,
                          headers={"Authorization": f"token {host.token}",
                                   "Content-Type": "application/json"})
    assert response.status_code < 500, (path, body, response.status_code, response.text)
    if response.status_code == 201:  # a body that happened to be a valid request
        httpx.delete(f"{host.url}/api/kernels/{response.json()['id']}", timeout=30,
                     headers={"Authorization": f"token {host.token}"})


def test_a_websocket_to_a_kernel_that_does_not_exist_is_refused(host: HostProcess) -> None:
    async def go() -> int:
        url = host.url.replace("http", "ws") + "/api/kernels/not-a-kernel/channels"
        try:
            async with connect(url, additional_headers={"Authorization": f"token {host.token}"}):
                return 101
        except InvalidStatus as e:
            return e.response.status_code

    assert asyncio.run(go()) == 404


@pytest.mark.parametrize(("body", "says"), [
    ("[]", "must be a JSON object"),
    ('{"name": 5}', "`name` must be a string"),
    ('{"kernel_id": "../../etc"}', "`kernel_id` must be a UUID"),
])
def test_jupyters_kernel_api_refuses_malformed_bodies_with_400(host: HostProcess, body: str,
                                                                says: str) -> None:
    response = httpx.post(f"{host.url}/api/kernels", content=body, timeout=30,
                          headers={"Authorization": f"token {host.token}"})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "InvalidRequestError"
    assert says in response.json()["message"]
