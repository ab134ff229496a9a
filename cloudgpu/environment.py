"""Environments a session asks for: pip requirement strings, checked the same way everywhere.

A notebook's ``metadata.cloudgpu.environment``, ``%%remote --env``, the Cloud GPU kernel's
``--requirement`` and the pool's ``POST /api/sessions {"environment": [...]}`` all carry
a list of requirement strings (``tabulate==0.9.0``, ``numpy>=1.26,<3``). The host turns
such a list into a virtual environment (``cloudgpu.remote_host.host.environments``), one
per :func:`environment_key`.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement

from .errors import InvalidRequestError

__all__ = ["check_requirements", "environment_key", "same_environment", "split_requirements"]

_OPERATORS = ("<", ">", "=", "!", "~")


def check_requirements(value: Any, what: str = "environment") -> list[str]:
    """``value`` as a list of requirement strings, each one pip understands, stripped.

    Raises:
        InvalidRequestError: ``value`` is not a list of strings, or one is not a requirement
            (pip options such as ``-e`` or ``--index-url`` are not requirements).
    """
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
        raise InvalidRequestError(
            f"`{what}` must be a list of pip requirement strings, like "
            f'["tabulate==0.9.0", "numpy>=1.26"]; found {value!r}.')
    found = []
    for text in (r.strip() for r in value):
        if not text:
            continue
        try:
            Requirement(text)
        except InvalidRequirement as e:
            raise InvalidRequestError(
                f"`{text}` in `{what}` is not a pip requirement ({e}). Write one package per "
                f"string: `name`, `name==1.0`, `name>=1,<2`, `name[extra]`, `name @ URL`."
            ) from None
        found.append(text)
    return found


def split_requirements(text: str) -> list[str]:
    """Requirements written in one comma-separated word: ``a==1,b>=2,<3`` -> ``a==1``, ``b>=2,<3``.

    A piece that starts with a version operator continues the requirement before it.

    Raises:
        InvalidRequestError: a piece is not a requirement.
    """
    pieces: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if piece.startswith(_OPERATORS) and pieces:
            pieces[-1] += "," + piece
        elif piece:
            pieces.append(piece)
    return check_requirements(pieces, "--env")


def same_environment(a: list[str] | None, b: list[str] | None) -> bool:
    """Whether two requirement lists ask for the same environment (order does not matter)."""
    return sorted(a or []) == sorted(b or [])


def environment_key(requirements: list[str], python: str | None = None) -> str:
    """The cache key of an environment: the requirements (sorted) and the Python it runs on."""
    python = python or f"{sys.version_info.major}.{sys.version_info.minor} {sys.executable}"
    text = json.dumps({"requirements": sorted(requirements), "python": python})
    return hashlib.sha256(text.encode()).hexdigest()[:16]
