"""Turning Python values into frames and back: cloudpickle, protocol 5, out-of-band buffers.

A value becomes a list of frames: the pickle stream first, then each out-of-band buffer
(numpy arrays, torch CPU tensors, ``bytes`` in a ``PickleBuffer``) as a zero-copy memoryview.
What cloudpickle refuses, dill tries. Only exchange these with a peer you trust:
unpickling runs code.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import pickle
import platform
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import xxhash

from .errors import SerializationError

__all__ = ["FINGERPRINT_MIN", "Serialized", "describe_type", "dumps", "flat", "loads",
           "versions"]

#: Values at least this big are fingerprinted, and not sent again while unchanged.
FINGERPRINT_MIN = 1 << 20
#: Frames this big are hashed in chunks of this size, in parallel.
HASH_CHUNK = 16 << 20


def flat(frame: memoryview) -> memoryview:
    """``frame`` as one-dimensional bytes (a numpy array's buffer has its shape and dtype)."""
    return frame.cast("B") if frame.ndim != 1 or frame.format != "B" else frame


def _digest(chunk: memoryview) -> bytes:
    return xxhash.xxh3_128_digest(chunk)


@functools.lru_cache(maxsize=1)
def _hashers() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(
        max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="cloudgpu-hash")


@dataclass
class Serialized:
    """One value as frames.

    Attributes:
        codec: ``cloudpickle``, ``dill`` or ``module`` (a module travels as its name).
        frames: the pickle stream, then the out-of-band buffers.
    """

    codec: str
    frames: list[memoryview] = field(default_factory=list)
    digest: str | None = None

    @property
    def fingerprint(self) -> str:
        """A 128-bit xxh3 hash of codec and frames, computed once.

        A frame of ``HASH_CHUNK`` bytes or more is hashed in chunks, on several threads at
        once (xxhash lets go of the GIL on big buffers, so the kernel stays responsive).
        How much that gains depends on the memory bandwidth: on the 2-core VM of
        ``bench/RESULTS.md``, 800 MB take 25 ms against 32 on one thread. The chunks are
        fixed, so the result does not depend on how many threads there are.
        """
        return self.take_fingerprint()

    def take_fingerprint(self, parallel: bool = True) -> str:
        """:attr:`fingerprint`; without ``parallel``, on this thread alone (a check in the
        background, which should leave the other cores to the work in the foreground)."""
        if self.digest is None:
            h = xxhash.xxh3_128(self.codec.encode())
            for frame in self.frames:
                data = flat(frame)
                h.update(data.nbytes.to_bytes(8, "little"))
                if data.nbytes < HASH_CHUNK:
                    h.update(data)
                    continue
                chunks = [data[i: i + HASH_CHUNK] for i in range(0, data.nbytes, HASH_CHUNK)]
                for digest in (_hashers().map if parallel else map)(_digest, chunks):
                    h.update(digest)
            self.digest = h.hexdigest()
        return self.digest

    @property
    def nbytes(self) -> int:
        """Total size of the frames."""
        return sum(f.nbytes for f in self.frames)

    @property
    def out_of_band(self) -> int:
        """How many frames went out of band (not copied into the pickle stream)."""
        return max(len(self.frames) - 1, 0)


def describe_type(value: Any) -> str:
    """A short, readable name of a value's type: ``numpy.ndarray``, ``_io.TextIOWrapper``."""
    cls = type(value)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def dumps(value: Any, name: str = "value") -> Serialized:
    """Serialize ``value``; ``name`` is what an error calls it.

    Raises:
        SerializationError: when neither cloudpickle nor dill can pickle it.
    """
    if isinstance(value, types.ModuleType):
        return Serialized("module", [memoryview(value.__name__.encode())])
    errors = []
    for codec in ("cloudpickle", "dill"):
        buffers: list[pickle.PickleBuffer] = []
        try:
            if codec == "cloudpickle":
                stream = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
            else:
                import dill

                stream = dill.dumps(value, protocol=5, buffer_callback=buffers.append)
        except Exception as e:  # both libraries raise a zoo of types for "cannot pickle"
            errors.append(f"{codec}: {type(e).__name__}: {e}")
            continue
        return Serialized(codec, [memoryview(stream), *(b.raw() for b in buffers)])
    raise SerializationError(
        f"Cannot send `{name}` ({describe_type(value)}): it cannot be pickled "
        f"({'; '.join(errors)}). Recreate it inside the remote cell, or leave it out of the "
        f"cell's inputs."
    )


def loads(codec: str, frames: list[Any], name: str = "value") -> Any:
    """Rebuild a value from its frames.

    Raises:
        SerializationError: when unpickling fails here (a missing module, version skew).
    """
    try:
        if codec == "module":
            import importlib

            return importlib.import_module(bytes(frames[0]).decode())
        if codec == "dill":
            import dill

            return dill.loads(frames[0], buffers=frames[1:])
        return pickle.loads(frames[0], buffers=frames[1:])
    except Exception as e:
        raise SerializationError(
            f"Cannot load `{name}` on {platform.node()} (Python {platform.python_version()}): "
            f"{type(e).__name__}: {e}. Install the package it needs there, or check that both "
            f"sides run the same Python and cloudpickle versions."
        ) from e


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """What the two sides compare before exchanging pickles (computed once: imports dill)."""
    import dill

    return {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "cloudpickle": cloudpickle.__version__,
        "dill": dill.__version__,
    }
