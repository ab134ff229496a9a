"""Which installed distributions modules come from, and their versions, on either side.

The remote agent reports the packages a notebook imported (``ran_on``) and the packages
that define the types of the values it sends or receives; the magic compares those with
its own, so a value that moves between two versions of its package is named in a warning.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["distribution_of", "imported_packages", "type_versions", "version_differences"]

_distributions: Mapping[str, list[str]] | None = None
#: ``{top-level module: (distribution, version) or None}``, as found: the version of the
#: code already imported, which is what a value was made with.
_owners: dict[str, tuple[str, str] | None] = {}
_SITE_DIRS = ("site-packages", "dist-packages")


def _top_level(module: str) -> str:
    return module.partition(".")[0]


def distribution_of(module: str) -> tuple[str, str] | None:
    """The distribution (name, version) that installed ``module``, or None (the standard
    library, ``__main__``, a file of the user's own).

    Asked on every push and pull, so it must be cheap. A full scan of what is installed
    (``packages_distributions``) takes 100-300 ms, paid on a kernel's first push before
    this looked first for the distribution named after the module (numpy, pandas, torch:
    about 1 ms). A module imported from outside every site-packages folder is the user's
    own, and is not looked up further (an editable install whose distribution is named
    otherwise than its module is missed this way). Only what is left (``sklearn`` from
    scikit-learn, ``PIL`` from pillow) needs the scan, once; the answer for each module is
    remembered.
    """
    top = _top_level(module)
    if not top or top in sys.stdlib_module_names or top in ("builtins", "__main__"):
        return None
    if top not in _owners:
        _owners[top] = _by_name(top)
        if _owners[top] is None and not _user_module(top):
            _owners[top] = _by_scan(top)
    return _owners[top]


def _by_name(top: str) -> tuple[str, str] | None:
    try:
        dist = importlib.metadata.distribution(top)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None
    provides = dist.read_text("top_level.txt")
    if provides is not None and top not in provides.split():
        return None  # a distribution named like the module that installs other modules
    name = dist.metadata["Name"] or top
    return name, dist.version


def _user_module(top: str) -> bool:
    mod = sys.modules.get(top)
    where = getattr(mod, "__file__", None)
    return isinstance(where, str) and not any(part in _SITE_DIRS for part in Path(where).parts)


def _by_scan(top: str) -> tuple[str, str] | None:
    global _distributions
    if _distributions is None or top not in _distributions:
        # Again when a module shows up that no scan has seen: it may be installed since.
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
