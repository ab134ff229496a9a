"""Which host folders a Python interpreter needs to run a kernel: asked of the interpreter.

A sandboxed kernel sees the host's filesystem only where its sandbox binds it, read-only.
Whatever interpreter the kernel command names (the host's own, or a per-session
environment's), it is asked once for its prefixes, its ``sys.path`` and the folders its
editable installs map packages to; those are what the kernel gets.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from collections.abc import Iterable

from cloudgpu.errors import IsolationUnavailableError

__all__ = ["python_paths", "top_level"]

#: Run by the kernel's interpreter: every folder its imports can come from.
_PROBE = """\
import json, sys
paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path]
for finder in sys.meta_path:  # setuptools' editable installs map packages to folders
    mapping = getattr(sys.modules.get(getattr(finder, "__module__", "")), "MAPPING", None)
    if isinstance(mapping, dict):
        paths += [p for p in mapping.values() if isinstance(p, str)]
print(json.dumps(paths))
"""


@functools.lru_cache(maxsize=32)
def _ask(interpreter: str, pythonpath: str) -> tuple[str, ...]:
    env = {"PATH": os.defpath, "PYTHONPATH": pythonpath} if pythonpath else \
        {"PATH": os.defpath}
    try:
        out = subprocess.run([interpreter, "-c", _PROBE], capture_output=True, text=True,
                             env=env, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise IsolationUnavailableError(
            f"The kernel's interpreter `{interpreter}` could not be asked where its packages "
            f"are ({e}); a sandboxed kernel needs a Python it can run.") from e
    return tuple(json.loads(out))


def python_paths(interpreter: str, env: dict[str, str]) -> list[str]:
    """The folders ``interpreter`` imports from (with ``env``'s ``PYTHONPATH``), outermost
    only, each existing and absolute; the interpreter's own folder included, and where a
    path goes through a symbolic link, its target too."""
    found = [os.path.dirname(os.path.abspath(interpreter)),
             *_ask(interpreter, env.get("PYTHONPATH", ""))]
    absolute = [os.path.normpath(p) for p in found if p and os.path.isabs(p)]
    return top_level([*absolute, *(os.path.realpath(p) for p in absolute)])


def top_level(paths: Iterable[str]) -> list[str]:
    """``paths`` that exist, without any that lies inside another, sorted."""
    kept: list[str] = []
    for path in sorted(set(p.rstrip("/") or "/" for p in paths if os.path.exists(p))):
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept
