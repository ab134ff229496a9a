"""Serialization, chunking, websocket framing and the cell name analysis, without processes."""

from __future__ import annotations

import json
import pickle
import socket
import threading
import types
from typing import cast

import numpy as np
import pytest
from cloudgpu.magics._names import CellNames, analyze
from cloudgpu.magics.remote import _cell_names
from cloudgpu.remote_host.host.held import HeldValues
from hypothesis import given, settings
from hypothesis import strategies as st
from IPython.core.inputtransformer2 import TransformerManager
from IPython.core.interactiveshell import InteractiveShell

from cloudgpu import _wire
from cloudgpu._changes import NotebookChanges
from cloudgpu._transfer import Assembler, pack
from cloudgpu.errors import SerializationError
from cloudgpu.remote import version_skew as _version_skew
from cloudgpu.serialize import HASH_CHUNK, Serialized, dumps, loads


def test_numpy_goes_out_of_band_without_a_copy() -> None:
    x = np.arange(1000, dtype=np.float64)
    s = dumps(x, "x")
    assert s.codec == "cloudpickle"
    assert s.out_of_band == 1
    assert len(s.frames[0]) < 1000  # the pickle stream holds no array data
    assert np.shares_memory(np.frombuffer(s.frames[1], dtype=np.float64), x)
    np.testing.assert_array_equal(loads(s.codec, s.frames), x)


def test_modules_travel_by_name() -> None:
    s = dumps(np, "np")
    assert s.codec == "module" and bytes(s.frames[0]) == b"numpy"
    assert loads(s.codec, s.frames) is np


def test_unpicklable_value_names_the_variable_and_its_type() -> None:
    with pytest.raises(SerializationError) as info:
        dumps((i for i in range(3)), "gen")
    assert "`gen` (generator)" in str(info.value)
    with socket.socket() as sock, pytest.raises(SerializationError, match=r"`s` .socket.socket."):
        dumps(sock, "s")


def test_dill_takes_what_cloudpickle_refuses() -> None:
    s = dumps(threading.Lock(), "lock")
    assert s.codec == "dill"
    assert hasattr(loads(s.codec, s.frames), "acquire")


def test_dill_codec_round_trips() -> None:
    import dill

    buffers: list[pickle.PickleBuffer] = []
    stream = dill.dumps({"a": np.ones(3)}, protocol=5, buffer_callback=buffers.append)
    out = loads("dill", [memoryview(stream), *(b.raw() for b in buffers)])
    np.testing.assert_array_equal(out["a"], np.ones(3))


def test_load_failure_explains_itself() -> None:
    with pytest.raises(SerializationError, match=r"Cannot load `thing`.*Install the package"):
        loads("cloudpickle", [memoryview(b"\x80\x05cnot_a_module_xyz\nThing\n.")], "thing")


frames_strategy = st.lists(st.binary(max_size=300), min_size=1, max_size=4)


@settings(deadline=None, max_examples=150)
@given(values=st.dictionaries(st.text("abcxyz", min_size=1, max_size=5), frames_strategy,
                              max_size=4),
       chunk=st.integers(1, 257))
def test_pack_and_assemble_round_trip(values: dict[str, list[bytes]], chunk: int) -> None:
    serialized = {n: Serialized("cloudpickle", [memoryview(f) for f in fr])
                  for n, fr in values.items()}
    messages = list(pack(serialized, chunk=chunk, extra={"op": "push", "id": "b"}))
    assert messages[-1][0]["final"] is True
    assert all(sum(b.nbytes for b in bufs) <= chunk for _, bufs in messages)
    assembler = Assembler()
    for data, bufs in messages:
        assert data["op"] == "push"
        # Buffers cross the wire as separate byte strings.
        assembler.feed(data, [bytes(b) for b in bufs])
    assert assembler.done
    out = assembler.values()
    assert list(out) == list(values)
    for name, frames in values.items():
        assert [bytes(f) for f in out[name].frames] == frames


def test_large_frames_are_chunked() -> None:
    big = np.random.default_rng(0).random(3 * 2**20 // 8 * 4)  # 12 MiB
    messages = list(pack({"big": dumps(big)}, chunk=4 * 2**20))
    assert len(messages) == 4  # 12 MiB of buffer + a small pickle stream
    assembler = Assembler()
    for data, bufs in messages:
        assembler.feed(data, bufs)
    s = assembler.values()["big"]
    np.testing.assert_array_equal(loads(s.codec, s.frames), big)


def test_websocket_framing_round_trip() -> None:
    msg = _wire.new_message("comm_msg", {"data": {"k": 1}}, "sess",
                            buffers=[memoryview(b"abc"), b"", memoryview(b"x" * 10)])
    channel, back = _wire.decode(_wire.encode("shell", msg))
    assert channel == "shell"
    assert back["header"] == msg["header"] and back["content"] == msg["content"]
    assert [bytes(b) for b in back["buffers"]] == [b"abc", b"", b"x" * 10]
    assert back["msg_type"] == "comm_msg"


def test_websocket_framing_is_jupyters_own_byte_for_byte() -> None:
    """Our encoder and the host's copy-free path share ``v1_header``; Jupyter's agrees."""
    from jupyter_server.services.kernels.connection.base import serialize_msg_to_ws_v1

    msg = _wire.new_message("comm_msg", {"data": {"k": 1}}, "sess",
                            buffers=[b"abc", b"", b"x" * 10])
    parts = [json.dumps(msg[k], separators=(",", ":")).encode()
             for k in ("header", "parent_header", "metadata", "content")] + msg["buffers"]
    assert _wire.encode("iopub", msg) == serialize_msg_to_ws_v1(parts, "iopub")
    assert _wire.v1_header(b"iopub", parts) + b"iopub" + b"".join(parts) == \
        serialize_msg_to_ws_v1(parts, "iopub")


def test_version_skew_names_both_versions() -> None:
    same = {"python": "3.11.7", "cloudpickle": "3.1.3"}
    assert _version_skew(same, {"python": "3.11.2", "cloudpickle": "3.1.0"}) == []
    (text,) = _version_skew(same, {"python": "3.12.1", "cloudpickle": "3.1.3"})
    assert "3.11.7" in text and "3.12.1" in text
    assert len(_version_skew(same, {"python": "3.10.0", "cloudpickle": "2.2.1"})) == 2


@pytest.mark.parametrize(("code", "reads", "writes"), [
    ("y = scale(x, 2.0)", ["scale", "x"], ["y"]),
    ("x = 1\ny = x + z", ["z"], ["x", "y"]),
    ("x += 1", ["x"], ["x"]),
    ("def f(a):\n    b = a + k\n    return b\n", ["k"], ["f"]),
    ("g = lambda q: q * w", ["w"], ["g"]),
    ("out = [i * w for i in items if i > t]", ["items", "w", "t"], ["out"]),
    ("import numpy as np\narr = np.zeros(3)", [], ["np", "arr"]),
    ("for i in rng:\n    total = total + i", ["rng", "total"], ["i", "total"]),
    ("class C(Base):\n    attr = value\n", ["Base", "value"], ["C"]),
    ("with open(p) as fh:\n    text = fh.read()", ["open", "p"], ["fh", "text"]),
    ("if (n := size) > 3:\n    del old", ["size", "old"], ["n"]),
])
def test_cell_names(code: str, reads: list[str], writes: list[str]) -> None:
    names = analyze(code)
    assert set(names.reads) == set(reads)
    assert names.writes == writes


def test_imports_are_marked_so_they_are_not_pulled() -> None:
    assert analyze("import os, numpy.linalg\nfrom x import y as z").imports == {"os", "numpy", "z"}


@pytest.mark.parametrize(("cell", "transformed"), [
    ("y = x + 1", False),
    ("total = sum(v for v in values)\nprint(total);", False),
    ("print('100% done?')\nz = w", True),  # escapes in a string: the slow path, same names
    ("files = !ls\ncount = len(files)", True),
    ("%time y = x\nz = y", True),
    ("a = %env HOME", True),
    ("x?", True),
    ("  y = x\n  z = y", True),  # IPython dedents it
    (">>> y = x", True),  # a pasted prompt
    ("def f(:", True),
])
def test_a_magic_cell_is_read_as_ipython_would_run_it(cell: str, transformed: bool) -> None:
    transform = TransformerManager().transform_cell
    calls: list[str] = []

    def counted(code: str) -> str:
        calls.append(code)
        return transform(code)

    shell = cast(InteractiveShell, types.SimpleNamespace(transform_cell=counted))
    try:
        expected: CellNames | None = analyze(transform(cell))
    except SyntaxError:
        expected = None
    assert _cell_names(shell, cell) == expected
    assert calls == ([cell] if transformed else [])  # plain Python skips IPython's transform


def test_a_v1_message_with_a_lying_offset_count_is_refused_at_once() -> None:
    good = _wire.encode("shell", _wire.new_message("comm_msg", {}, "s"))
    assert len(_wire.v1_offsets(good)) == 6
    huge = (2**60).to_bytes(8, "little") + good[8:]
    with pytest.raises(ValueError, match="cannot have 1152921504606846976 offsets"):
        _wire.v1_offsets(huge)  # at once: not a loop of 2**60 steps
    backwards = bytearray(good)
    backwards[16:24] = (10**6).to_bytes(8, "little")
    with pytest.raises(ValueError, match="offsets do not describe"):
        _wire.decode(bytes(backwards))


# --- unchanged inputs: fingerprints in chunks, what each side trusts -------------------------

def test_a_chunked_fingerprint_sees_a_change_anywhere_and_needs_no_thread_count() -> None:
    data = np.random.default_rng(1).random(5 * HASH_CHUNK // 8 + 3)  # chunks and a tail
    first = dumps(data).fingerprint
    assert dumps(data.copy()).fingerprint == first
    for at in (0, HASH_CHUNK // 8, data.size - 1):
        changed = data.copy()
        changed[at] += 1.0
        assert dumps(changed).fingerprint != first, at


def _arrived(value: object, name: str = "x") -> Serialized:
    """``value`` as the agent gets it: its frames reassembled, the sender's fingerprint."""
    sent = dumps(value, name)
    assembler = Assembler()
    for data, buffers in pack({name: Serialized(sent.codec, sent.frames, sent.fingerprint)},
                              chunk=1 << 20):
        assembler.feed(data, [bytes(b) for b in buffers])
    return assembler.values()[name]


def _held(ns: dict[str, object], name: str = "x", writes: bool = True) -> HeldValues:
    held = HeldValues(ns, writes=writes)
    value = _arrived(ns[name], name)
    ns[name] = loads(value.codec, value.frames)
    held.received(name, value)
    return held


def _execute(held: HeldValues, code: object = None) -> None:
    """One execution, as IPython announces it: ``code`` runs between the two events."""
    held.execution_starts()
    if callable(code):
        code()
    held.execution_ended()


def test_a_value_loaded_from_its_frames_takes_the_senders_fingerprint() -> None:
    ns: dict[str, object] = {"x": np.arange(400_000, dtype=np.float64)}
    value = _arrived(ns["x"])
    ns["x"] = loads(value.codec, value.frames)
    held = HeldValues(ns)
    value.digest = "the sender's"  # only taken when the frames are the very ones that came
    held.received("x", value)
    assert held.digest("x") == "the sender's"
    ns["y"] = np.arange(400_000, dtype=np.float64)  # a copy of the frames: hashed here
    held.received("y", _arrived(ns["y"], "y"))
    assert held.digest("y") == dumps(ns["y"]).fingerprint


@pytest.mark.timeout(30)
def test_the_agent_checks_held_values_after_each_execution_not_at_the_keep() -> None:
    ns: dict[str, object] = {"x": np.arange(400_000, dtype=np.float64)}
    held = _held(ns)
    assert held.unchanged("x") and held.hashed_on_keep == 0  # nothing ran since it came
    _execute(held, lambda: ns.update(m=1))
    assert held.unchanged("x") and held.hashed_on_keep == 0  # the check after it said so
    alias = ns["x"]
    assert isinstance(alias, np.ndarray)
    _execute(held, lambda: alias.__setitem__(7, -1.0))  # written through another name
    assert not held.unchanged("x")
    assert held.hashed_on_keep == 0


def test_the_agents_own_messages_and_rebinding_need_no_fingerprint() -> None:
    ns: dict[str, object] = {"x": np.arange(400_000, dtype=np.float64)}
    held = _held(ns)
    held.execution_starts()  # the comm package announces the agent's own message ...
    held.not_code()  # ... which runs nothing of the user's
    assert held.unchanged("x") and held.hashed_on_keep == 0
    held.execution_starts()
    ns["x"] = np.arange(400_000, dtype=np.float64)  # the same contents, another object
    assert not held.unchanged("x")


@pytest.mark.timeout(30)
def test_verify_sees_a_write_made_after_the_check() -> None:
    """What a thread of the user's writes after the check is not seen unless asked."""
    ns: dict[str, object] = {"x": np.arange(400_000, dtype=np.float64)}
    held = _held(ns)
    _execute(held)
    assert held.unchanged("x")
    x = ns["x"]
    assert isinstance(x, np.ndarray)
    x[3] = 1e9  # between executions, as a thread would
    assert held.unchanged("x")  # documented: not seen (held.py)
    assert not held.unchanged("x", verify=True)
    assert held.hashed_on_keep == 1


def _watched(ns: dict[str, object], name: str = "x") -> HeldValues:
    """``name`` held, checked unchanged once, then watched for writes (writes.py)."""
    held = _held(ns, name)
    if held.writes is None:
        pytest.skip("this kernel offers no asynchronous write-protect tracking (Linux 6.7); "
                    "the agent fingerprints after every execution instead")
    _execute(held)
    assert held.unchanged(name)  # fingerprinted after it: as recorded
    _execute(held)
    assert held.unchanged(name)  # watched from then on, and fingerprinted
    return held


@pytest.mark.timeout(30)
def test_a_value_seen_unchanged_is_then_watched_for_writes_and_not_fingerprinted() -> None:
    ns: dict[str, object] = {"x": np.arange(400_000, dtype=np.float64)}
    held = _watched(ns)
    hashed = held.hashed
    for _ in range(3):
        _execute(held, lambda: ns.update(m=float(np.asarray(ns["x"])[:10].sum())))  # reads
        assert held.unchanged("x")
    assert held.hashed == hashed  # the scans of its pages answered
    assert held.scanned >= 3 and held.hashed_on_keep == 0


@pytest.mark.timeout(30)
def test_a_write_to_a_watched_value_is_seen_however_it_was_made() -> None:
    def last(x: np.ndarray) -> None:
        x[-1] = -1.0

    def by_the_kernel(x: np.ndarray) -> None:  # recv-like: no Python-level store
        with open("/dev/urandom", "rb") as source:
            source.readinto(memoryview(x).cast("B")[1_600_000:1_600_008])

    def inside(x: np.ndarray) -> None:
        x[200_000:200_002] += 1.0

    for write in (last, by_the_kernel, inside):
        ns: dict[str, object] = {"x": np.arange(400_000, dtype=np.float64)}
        held = _watched(ns)
        alias = ns["x"]
        assert isinstance(alias, np.ndarray)
        _execute(held, lambda: write(alias))  # noqa: B023 (called at once)
        assert not held.unchanged("x"), write.__name__
        hashed = held.hashed
        _execute(held)
        assert not held.unchanged("x") and held.hashed == hashed  # changed stays changed


@pytest.mark.timeout(30)
def test_a_watched_value_is_only_trusted_over_the_same_live_buffers() -> None:
    ns: dict[str, object] = {"x": np.arange(400_000, dtype=np.float64)}
    held = _watched(ns)
    x = ns["x"]
    assert isinstance(x, np.ndarray)
    hashed = held.hashed
    _execute(held, lambda: x.__setitem__(200_000, x[200_000]))  # written with what was there
    assert held.unchanged("x") and held.hashed == hashed + 1  # fingerprinted, still equal

    box: dict[str, object] = {"d": {"a": np.arange(400_000, dtype=np.float64)}}
    held = _watched(box, "d")
    inner = box["d"]
    assert isinstance(inner, dict)
    hashed = held.hashed
    _execute(held, lambda: inner.update(a=np.array(inner["a"])))  # an equal copy, elsewhere
    assert held.unchanged("d") and held.hashed == hashed + 1  # not taken from a scan


@pytest.mark.timeout(30)
def test_without_write_tracking_every_check_is_a_fingerprint_and_still_sees_writes() -> None:
    ns: dict[str, object] = {"x": np.arange(400_000, dtype=np.float64)}
    held = _held(ns, writes=False)  # as where the kernel has no such tracking
    for _ in range(3):
        _execute(held)
        assert held.unchanged("x")
    assert held.hashed == 3 and held.scanned == 0
    x = ns["x"]
    assert isinstance(x, np.ndarray)
    _execute(held, lambda: x.__setitem__(200_000, -1.0))
    assert not held.unchanged("x")


@pytest.mark.timeout(30)
def test_a_keep_sees_a_write_to_a_watched_value_made_after_the_check() -> None:
    """What test_verify_sees_a_write_made_after_the_check says is not seen, is, once watched."""
    ns: dict[str, object] = {"x": np.arange(400_000, dtype=np.float64)}
    held = _watched(ns)
    _execute(held)
    x = ns["x"]
    assert isinstance(x, np.ndarray)
    x[3] = 1e9  # between executions, as a thread would
    assert not held.unchanged("x")


def test_the_notebook_trusts_a_fingerprint_until_code_runs() -> None:
    changes = NotebookChanges()
    x = np.arange(10)
    changes.remember("x", x, "f")
    assert changes.fingerprint("x", x) == "f"
    assert changes.fingerprint("x", np.arange(10)) is None  # another object
    changes._execution_starts()
    changes._cell_starts(types.SimpleNamespace(raw_cell="\n%%remote gpu=cpu\nx += 1"))
    assert changes.fingerprint("x", x) == "f"  # a %%remote cell runs nothing here
    changes._execution_starts()  # a cell, or a comm message (a widget callback)
    assert changes.fingerprint("x", x) is None
    frozen = np.frombuffer(bytes(80), dtype=np.float64)[1:]
    changes.remember("frozen", frozen, "g")
    changes._execution_starts()
    assert changes.fingerprint("frozen", frozen) == "g"  # read-only over bytes: cannot change
    writable_again = np.zeros(10)
    writable_again.flags.writeable = False  # owns its memory: may be made writable again
    changes.remember("w", writable_again, "h")
    changes._execution_starts()
    assert changes.fingerprint("w", writable_again) is None
