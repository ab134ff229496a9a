"""Which installed distributions modules come from, and their versions, on either side.

The remote agent reports the packages a notebook imported (``ran_on``) and the packages
that define the types of the values it sends or receives; the magic compares those with
its own, so a value that moves between two versions of its package is named in a warning.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["distribution_of", "imported_packages", "type_versions", "version_differences"]

_distributions: Mapping[str, list[str]] | None = None


def _top_level(module: str) -> str:
    return module.partition(".")[0]


def distribution_of(module: str) -> tuple[str, str] | None:
    """The distribution (name, version) that installed ``module``, or None (the standard
    library, ``__main__``, a file of the user's own)."""
    global _distributions
    top = _top_level(module)
    if _distributions is None or top not in _distributions:
        # Computed once; again when a module shows up that was installed since.
        _distributions = importlib.metadata.packages_distributions()
    names = _distributions.get(top)
    if not names:
        return None
    try:
        return names[0], importlib.metadata.version(names[0])
    except importlib.metadata.PackageNotFoundError:
        return None


def imported_packages(modules: Iterable[str]) -> dict[str, str]:
    """``{distribution: version}`` for the installed packages among ``modules``, sorted."""
    found: dict[str, str] = {}
    for top in sorted({_top_level(m) for m in modules}):
        dist = distribution_of(top)
        if dist is not None:
            found[dist[0]] = dist[1]
    return dict(sorted(found.items(), key=lambda item: item[0].lower()))


def type_versions(values: Mapping[str, Any]) -> dict[str, list[str]]:
    """For each value whose type an installed package defines: ``{name: [module, dist,
    version]}`` (``df: ["pandas.core.frame", "pandas", "2.2.3"]``)."""
    found = {}
    for name, value in values.items():
        module = getattr(type(value), "__module__", None) or ""
        dist = distribution_of(module) if module else None
        if dist is not None:
            found[name] = [module, *dist]
    return found


def version_differences(local: Mapping[str, list[str]],
                        remote: Mapping[str, list[str]]) -> list[str]:
    """Sentences naming each moved value whose package differs between the two sides."""
    found = []
    for name, theirs in remote.items():
        mine = local.get(name)
        if mine is None or len(mine) != 3 or len(theirs) != 3:
            continue
        if mine[1] == theirs[1] and mine[2] != theirs[2]:
            found.append(
                f"`{name}` is a {theirs[1]} object: {theirs[1]} is {mine[2]} here but "
                f"{theirs[2]} on the remote kernel. Values may not load, or may behave "
                f"differently, across versions; pin {theirs[1]}=={mine[2]} in the remote "
                f"environment (`%%remote --env {theirs[1]}=={mine[2]}`) or install "
                f"{theirs[2]} here.")
    return found
