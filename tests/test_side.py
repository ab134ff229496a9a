"""The side channel for big values (cloudgpu._side), against a real host and real kernels.

Values of several sizes and dtypes go out and come back exactly; the frames of 1 MiB and
more are seen to skip the comm messages. The host refuses a wrong token and another
session's token, saying so; with the side channel off (client or host), or refused,
values take the websocket as before. Dropped side connections: tests/faults.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import secrets
import socket
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from servers import HostFactory, HostProcess, wait_until

from cloudgpu._http import tls_context
from cloudgpu._prefault import Prefault
from cloudgpu._side import MAPPED_MIN, SIDE_MIN, SideChannel, SideError, receive_buffer
from cloudgpu._spares import SPARE_MAX, SPARES, Spares
from cloudgpu.errors import SerializationError
from cloudgpu.host_client import HostClient
from cloudgpu.provider import Grant
from cloudgpu.remote import AgentBatch
from cloudgpu.serialize import Serialized, dumps, loads
from cloudgpu.session import RemoteSession

pytestmark = pytest.mark.timeout(180)

MIB = 2**20


def values() -> dict[str, Any]:
    """Several sizes and dtypes: under, at and over the side channel's 1 MiB, odd lengths,
    several big frames in one value, and small values beside them."""
    rng = np.random.default_rng(7)
    return {
        "f64": rng.standard_normal(3 * MIB // 8 + 5),
        "i8": rng.integers(-128, 127, SIDE_MIN, dtype=np.int8),  # exactly at the threshold
        "just_under": rng.integers(0, 255, SIDE_MIN - 1, dtype=np.uint8),
        "c64": (rng.standard_normal(300_001) + 1j).astype(np.complex64),
        "f16_2d": rng.standard_normal((1024, 777)).astype(np.float16),
        "raw": rng.bytes(2 * MIB + 3),
        "pair": (np.arange(400_000, dtype=np.int64), np.ones(200_000, dtype=np.float32)),
        "small": {"a": 1, "b": [1.5, "x"]},
    }


def digest(value: Any) -> str:
    """What the remote side computes too: the pickle of the value, hashed."""
    return hashlib.sha256(repr(value).encode() if isinstance(value, dict) else
                          b"".join(memoryview(np.ascontiguousarray(v)).cast("B").tobytes()
                                   if isinstance(v, np.ndarray) else bytes(v)
                                   for v in (value if isinstance(value, tuple) else [value]))
                          ).hexdigest()


DIGESTS_REMOTELY = """
import hashlib, numpy as np
def _digest(value):
    if isinstance(value, dict):
        return hashlib.sha256(repr(value).encode()).hexdigest()
    parts = value if isinstance(value, tuple) else [value]
    return hashlib.sha256(b"".join(memoryview(np.ascontiguousarray(v)).cast("B").tobytes()
                                   if isinstance(v, np.ndarray) else bytes(v)
                                   for v in parts)).hexdigest()
digests = {name: _digest(globals()[name]) for name in NAMES}
back = {name: globals()[name] for name in NAMES}
"""


def equal(a: Any, b: Any) -> bool:
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(map(equal, a, b))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape \
            and bool(np.array_equal(a, b))
    return bool(a == b)


class Watched:
    """Records the biggest binary buffer of each comm message to or from the agent."""

    def __init__(self, session: RemoteSession) -> None:
        self.sent: list[int] = []
        self.received: list[int] = []
        kernel = session.kernel
        send, on_agent = kernel.agent_send, kernel._on_agent

        async def agent_send(data: dict[str, Any], buffers: list[Any] | None = None,
                             **kw: Any) -> None:
            self.sent.append(max((memoryview(b).nbytes for b in buffers or []), default=0))
            await send(data, buffers, **kw)

        def received(data: dict[str, Any], buffers: list[Any]) -> None:
            self.received.append(max((memoryview(b).nbytes for b in buffers), default=0))
            on_agent(data, buffers)

        kernel.agent_send = agent_send  # type: ignore[method-assign]
        kernel._on_agent = received  # type: ignore[method-assign]


async def round_trip(session: RemoteSession) -> tuple[Watched, dict[str, Any]]:
    """Push ``values()``, have the remote side hash them and send them back; check both."""
    sent = values()
    watched = Watched(session)
    push = {name: dumps(v, name) for name, v in sent.items()}
    push["NAMES"] = dumps(list(sent), "NAMES")
    result = await session.run_cell(DIGESTS_REMOTELY, push, ["digests", "back"],
                                    lambda kind, payload: None)
    assert result.status == "ok", result.error
    assert not result.push_errors and not result.pull_errors
    remote_digests = _load(result.pulled["digests"])
    assert remote_digests == {name: digest(v) for name, v in sent.items()}
    back = _load(result.pulled["back"])
    assert set(back) == set(sent)
    for name, value in sent.items():
        assert equal(value, back[name]), name
    return watched, back


def _load(value: Serialized) -> Any:
    return loads(value.codec, value.frames)


async def open_session(host: HostProcess, token: str | None = None, kernel_id: str | None = None,
                       **kw: Any) -> tuple[RemoteSession, HostClient]:
    admin = HostClient(host.url, host.token)
    if kernel_id is None:
        kernel_id = (await admin.start_kernel("cpu"))["id"]
    session = await RemoteSession.open(Grant(host.url, token or host.token, kernel_id, "cpu"),
                                       **kw)
    return session, admin


async def close(session: RemoteSession, admin: HostClient) -> None:
    await session.close()
    await admin.shutdown(session.kernel_id)
    await admin.aclose()


def run(coro: Callable[[], Any]) -> Any:
    return asyncio.run(coro())


def test_values_of_many_sizes_and_dtypes_round_trip_exactly_by_the_side_channel(
        host: HostProcess) -> None:
    async def go() -> None:
        session, admin = await open_session(host)
        try:
            watched, _ = await round_trip(session)
            side = await session.kernel.side_channel()
            assert side is not None and side.broken is None
            # Every frame of 1 MiB or more went by the side channel, both ways.
            assert 0 < max(watched.sent) < SIDE_MIN
            assert 0 < max(watched.received) < SIDE_MIN
            await round_trip(session)  # and again, on the same side connection
            assert await session.kernel.side_channel() is side
        finally:
            await close(session, admin)

    run(go)


def test_a_batch_no_cell_claims_is_freed_once_a_later_one_is_claimed(
        host: HostProcess) -> None:
    """Frames that came for a cell that was given up (aborted by the kernel, or cancelled
    between its frames and its message) would be held for as long as the side connection
    lasts: the next claim after ``given_up_after`` frees them, and takes its own whole."""
    async def waiting(session: RemoteSession) -> int:
        result = await session.run_cell("waiting = get_ipython().cloudgpu_agent.side."
                                        "unclaimed()", {}, ["waiting"], lambda *_: None)
        return int(_load(result.pulled["waiting"]))

    async def go() -> None:
        session, admin = await open_session(host)
        try:
            await session.run_cell("get_ipython().cloudgpu_agent.side.given_up_after = 0",
                                   {}, [], lambda *_: None)
            side = await session.kernel.side_channel()
            assert side is not None
            await side.send("given-up", [memoryview(bytes(2 * MIB))])  # no message follows
            deadline = asyncio.get_running_loop().time() + 30
            while await waiting(session) != 2 * MIB:  # the agent reads it in a thread
                assert asyncio.get_running_loop().time() < deadline, "it never arrived"
            x = np.arange(MIB, dtype=np.float64)
            result = await session.run_cell("total = float(x.sum())", {"x": dumps(x, "x")},
                                            ["total"], lambda *_: None)
            assert not result.push_errors, result.push_errors
            assert _load(result.pulled["total"]) == float(x.sum())
            assert await waiting(session) == 0
        finally:
            await close(session, admin)

    run(go)


def test_turned_off_in_the_client_big_values_take_the_websocket(host: HostProcess) -> None:
    async def go() -> None:
        session, admin = await open_session(host, side_channel=False)
        try:
            watched, _ = await round_trip(session)
            assert await session.kernel.side_channel() is None
            assert session.kernel.side_off == "turned off"
            assert max(watched.sent) >= SIDE_MIN and max(watched.received) >= SIDE_MIN
        finally:
            await close(session, admin)

    run(go)


def test_a_host_with_it_turned_off_refuses_and_values_take_the_websocket(
        host_factory: HostFactory) -> None:
    off = host_factory.start(name="no-side", args=["--GPUKernelManager.side_channel=False"])

    async def go() -> None:
        session, admin = await open_session(off)
        try:
            watched, _ = await round_trip(session)
            assert await session.kernel.side_channel() is None
            assert "turned off on this host" in str(session.kernel.side_off)
            assert max(watched.sent) >= SIDE_MIN and max(watched.received) >= SIDE_MIN
        finally:
            await close(session, admin)

    try:
        run(go)
    finally:
        off.stop()


def test_the_side_channel_refuses_a_wrong_token_and_another_sessions_token(
        host: HostProcess) -> None:
    async def go() -> None:
        admin = HostClient(host.url, host.token)
        mine_token, other_token = secrets.token_hex(16), secrets.token_hex(16)
        mine = (await admin.start_kernel("cpu", scoped_token=mine_token))["id"]
        other = (await admin.start_kernel("cpu", scoped_token=other_token))["id"]
        try:
            # Its own token opens it (once its agent greeted us, it serves one).
            session, _ = await open_session(host, mine_token, mine)
            try:
                (await SideChannel.open(host.url, mine_token, mine, tls_context)).close()
                with pytest.raises(SideError, match=r"HTTP 403.*requires its token") as wrong:
                    await SideChannel.open(host.url, "not-the-token", mine, tls_context)
                assert wrong.value.permanent
                with pytest.raises(SideError, match=r"HTTP 403.*scoped to one kernel"):
                    await SideChannel.open(host.url, other_token, mine, tls_context)
                # ... and the session on it moves values by it.
                await round_trip(session)
                assert await session.kernel.side_channel() is not None
            finally:
                await session.close()
        finally:
            for kernel_id in (mine, other):
                await admin.shutdown(kernel_id)
            await admin.aclose()

    run(go)


def test_a_session_refused_the_side_channel_still_moves_its_values(host: HostProcess) -> None:
    """A session whose side channel is refused (here: a wrong token, as from a proxy that
    rewrites headers) moves its values by the websocket, unharmed."""
    async def go() -> None:
        session, admin = await open_session(host)
        try:
            session.kernel.grant = Grant(session.grant.host_url, "wrong-token",
                                         session.kernel_id, "cpu")
            session.kernel._close_side()
            watched, _ = await round_trip(session)
            assert "HTTP 403" in str(session.kernel.side_off)
            assert max(watched.sent) >= SIDE_MIN
        finally:
            await close(session, admin)

    run(go)


@pytest.mark.parametrize("size", [0, 5, MAPPED_MIN - 1, MAPPED_MIN, 3 * MIB + 7])
def test_receive_buffers_are_writable_zeroed_and_exactly_the_size(size: int) -> None:
    buffer = receive_buffer(size)
    view = memoryview(buffer)
    assert view.nbytes == size and not view.readonly
    assert not any(view[::4096]) and (size == 0 or view[-1] == 0)
    if size:
        view[-1] = 255  # written at the very end: no page of it is missing
        assert buffer[-1] == 255
    view.release()


@pytest.mark.timeout(60)
def test_populating_ahead_of_the_reader_never_changes_what_it_wrote() -> None:
    buffers = [receive_buffer(n) for n in (3 * MIB + 5, 100, 9 * MIB)]
    views = [memoryview(b) for b in buffers]
    views[0][:2 * MIB] = b"\x07" * (2 * MIB)  # received before the populating began
    ahead = Prefault(buffers)
    assert ahead.thread is not None
    ahead.reached(2 * MIB)
    for at in range(0, 9 * MIB, MIB // 2):  # received while it runs, in order
        views[2][at: at + 3] = b"abc"
        ahead.reached(3 * MIB + 105 + at + 3)
    ahead.thread.join()
    assert bytes(views[0][:2 * MIB]) == b"\x07" * (2 * MIB)
    assert not any(views[0][2 * MIB:]) and not any(views[1])
    for at in range(0, 9 * MIB, MIB // 2):
        assert bytes(views[2][at: at + 3]) == b"abc"
        assert not any(views[2][at + 3: at + MIB // 2])
    for view in views:
        view.release()


READY_REMOTELY = ("from cloudgpu._spares import SPARES as _spares\n"
                  "ready, taken = _spares.ready(), _spares.taken")


def test_values_of_a_size_seen_again_arrive_in_spares_and_exactly(host: HostProcess) -> None:
    """A loop sending values of one shape: from the third time on, both sides receive into
    buffers made ready beforehand, and every value still arrives exactly, none of them
    overwriting another."""
    sizes = (3 * MIB + 5, 2 * MIB)
    compute = ("import hashlib\ndigests = [hashlib.sha256(a).hexdigest(), "
               "hashlib.sha256(b).hexdigest()]\nra, rb = a[::-1].copy(), b[::-1].copy()")

    def fresh(seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]

    async def remote_spares(session: RemoteSession) -> tuple[dict[int, int], int]:
        result = await session.run_cell(READY_REMOTELY, {}, ["ready", "taken"],
                                        lambda kind, payload: None)
        assert result.status == "ok", result.error
        return _load(result.pulled["ready"]), _load(result.pulled["taken"])

    async def until_ready(session: RemoteSession) -> int:
        """Wait for a spare of each size on both sides; the remote side's count taken."""
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            ready, taken = await remote_spares(session)
            if all(ready.get(n) for n in sizes) and all(SPARES.ready().get(n) for n in sizes):
                return int(taken)
            assert asyncio.get_running_loop().time() < deadline, \
                f"no spares of {sizes} made within 30 s: remote {ready}, here {SPARES.ready()}"
            await asyncio.sleep(0.05)

    async def go() -> None:
        session, admin = await open_session(host)
        kept: list[tuple[list[np.ndarray], Any, Any]] = []
        try:
            for seed in range(4):
                if seed == 2:  # each size has come twice, each way
                    taken_there, taken_here = await until_ready(session), SPARES.taken
                sent = fresh(seed)
                push = {"a": dumps(sent[0], "a"), "b": dumps(sent[1], "b")}
                result = await session.run_cell(compute, push, ["digests", "ra", "rb"],
                                                lambda kind, payload: None)
                assert result.status == "ok", result.error
                assert _load(result.pulled["digests"]) == \
                    [hashlib.sha256(v).hexdigest() for v in sent]
                kept.append((sent, _load(result.pulled["ra"]), _load(result.pulled["rb"])))
                if seed == 2:
                    assert (await remote_spares(session))[1] >= taken_there + 2
                    assert SPARES.taken >= taken_here + 2
            for sent, ra, rb in kept:  # each pulled value intact, later ones beside it
                assert np.array_equal(ra, sent[0][::-1]) and np.array_equal(rb, sent[1][::-1])
        finally:
            await close(session, admin)

    run(go)


def test_spares_are_zeroed_kept_to_their_budget_and_unmapped_when_not_taken(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    spares = Spares(budget=5 * MIB, delay=0, idle=30, clock=lambda: now[0])
    too_big = SPARE_MAX + 1
    for _ in range(2):  # a size is spared once it comes again
        spares.arrived([2 * MIB, 2 * MIB, 2 * MIB, MAPPED_MIN - 1, too_big])
    wait_until(lambda: spares.ready() == {2 * MIB: 2}, within=30,
               what="two 2 MiB spares (the third is over the 5 MiB budget)")
    assert spares.take(MAPPED_MIN - 1) is None and spares.take(too_big) is None
    first = spares.take(2 * MIB)
    assert first is not None and len(first) == 2 * MIB
    view = memoryview(first)
    assert not any(view[::4096]) and view[-1] == 0  # as fresh memory reads
    view[:] = b"\x01" * len(view)
    second = spares.take(2 * MIB)
    assert second is not None and not any(memoryview(second)[::4096])  # another buffer
    assert spares.taken == 2 and spares.ready() == {}
    spares.arrived([2 * MIB])
    wait_until(lambda: spares.ready() == {2 * MIB: 1}, what="a new 2 MiB spare")
    now[0] += 31  # not taken in time: unmapped
    assert spares.take(2 * MIB) is None and spares.ready() == {}
    view.release()

    monkeypatch.setenv("CLOUDGPU_SPARE_MB", "0")
    off = Spares(delay=0)
    off.arrived([2 * MIB])
    off.arrived([2 * MIB])
    assert off.budget == 0 and off.take(2 * MIB) is None and off.ready() == {}
    monkeypatch.setenv("CLOUDGPU_SPARE_MB", "lots")
    assert Spares().budget == 64 * MIB  # said in a warning; the default holds


def test_a_side_failed_message_stops_the_wait_only_on_the_channel_it_names() -> None:
    """The agent answers a pull on the comm first and sends its big frames after; if they
    could not go, it says so, naming the channel. A late word about a channel that was
    already replaced (the client asked again on a new one) must not break the new one."""
    async def go() -> None:
        loop = asyncio.get_running_loop()
        ends = [socket.socketpair() for _ in range(2)]
        old, new = (SideChannel(a, f"channel-{i}") for i, (a, _) in enumerate(ends))
        batch = AgentBatch(loop, None)
        asked: list[str] = []

        async def ask_again() -> None:
            asked.append("again")

        batch.expect_side(new, ask_again)
        batch.feed({"op": "side_failed", "id": batch.id, "side": old.id, "why": "reset"}, [])
        assert new.broken is None and not asked
        batch.feed({"op": "side_failed", "id": batch.id, "side": new.id, "why": "reset"}, [])
        assert new.broken is not None
        for a, b in ends:
            a.close()
            b.close()

    asyncio.run(go())


def test_a_pull_too_big_for_this_process_fails_clearly_and_loses_nothing(
        host: HostProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """No room here for the frames the side channel brings: the cell fails saying so,
    instead of waiting for ever, and the value stays remote, to be pulled later."""
    import cloudgpu._side as side_module
    room = side_module.receive_buffer

    def no_room(size: int) -> Any:
        if size >= SIDE_MIN:
            raise MemoryError(f"no room for {size:,} bytes")
        return room(size)

    async def go() -> None:
        session, admin = await open_session(host)
        try:
            made = "import numpy as np\ny = np.arange(3 * 2**20 // 8, dtype=np.float64)"
            monkeypatch.setattr(side_module, "receive_buffer", no_room)
            monkeypatch.setattr(side_module, "SPARES", Spares(budget=0))  # none ready either
            with pytest.raises(SerializationError, match="do not fit in this process's memory"):
                await session.run_cell(made, {}, ["y"], lambda kind, payload: None)
            monkeypatch.setattr(side_module, "receive_buffer", room)
            result = await session.run_cell("", {}, ["y"], lambda kind, payload: None)
            assert result.status == "ok", result.error
            assert equal(_load(result.pulled["y"]), np.arange(3 * MIB // 8, dtype=np.float64))
        finally:
            await close(session, admin)

    run(go)


def test_a_side_connection_cut_before_the_host_answers_is_closed_not_leaked() -> None:
    """A network that takes the connection and drops it (a proxy in an outage) fails the
    open with the reason, and the socket it made is closed there, not left to the GC."""
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"

    def cut() -> None:
        conn, _ = listener.accept()
        conn.close()

    async def go() -> str:
        cutting = asyncio.ensure_future(asyncio.to_thread(cut))
        with pytest.raises(SideError) as info:
            await SideChannel.open(url, "token", "kernel", tls_context)
        await cutting
        return str(info.value)

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            said = asyncio.run(go())
            gc.collect()
    finally:
        listener.close()
    assert said.startswith(f"cannot open the side channel to {url}: "), said
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == [], \
        [str(w.message) for w in caught]
