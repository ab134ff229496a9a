"""Serialization, chunking, websocket framing and the cell name analysis, without processes."""

from __future__ import annotations

import json
import pickle
import socket
import threading

import numpy as np
import pytest
from cloudgpu.magics._names import analyze
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudgpu import _wire
from cloudgpu._transfer import Assembler, pack
from cloudgpu.errors import SerializationError
from cloudgpu.remote import version_skew as _version_skew
from cloudgpu.serialize import Serialized, dumps, loads


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
