"""Hardware specs and the price catalog.

A hardware spec is the string a user types to ask for hardware: ``H100``,
``H100:2``, fallbacks ``H100|A100-80GB``, ``cpu``, ``cpu:4`` or ``any``
(the cheapest free GPU). :func:`parse_spec` is the one parser for it.
The :class:`Catalog` knows every hardware type: its names, GPU memory, the
names NVML and Ray give it, and its price. The default catalog ships as
``cloudgpu/data/catalog.json``; operators override prices and add types
through config with :meth:`Catalog.with_overrides`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from cloudgpu.errors import UnknownHardwareError

__all__ = [
    "ANY",
    "CPU",
    "MAX_CPU_CORES",
    "MAX_GPU_COUNT",
    "Catalog",
    "Choice",
    "HardwareSpec",
    "HardwareType",
    "parse_spec",
]

CPU = "cpu"
"""The spec word and catalog name for CPU-only hardware; its count is cores."""

ANY = "any"
"""The spec word for the cheapest GPU that is free."""

MAX_GPU_COUNT = 64
"""More GPUs of one type than this in one choice is taken as a typo."""

MAX_CPU_CORES = 1024
"""More CPU cores than this in one choice is taken as a typo."""

_EXAMPLES = "`H100`, `H100:2`, `H100|A100-80GB`, `cpu:4` or `any`"
_DIGITS = re.compile(r"[0-9]+")
_FORBIDDEN_IN_NAME = re.compile(r"[\s:|`]")
# NVML's names carry a vendor word that older drivers spell differently
# ("Tesla T4" vs "NVIDIA T4"); compare without it.
_VENDOR_PREFIXES = ("nvidia ", "tesla ")
# A listed NVML name also matches longer reported names that extend it after
# one of these, so "NVIDIA H100" covers "NVIDIA H100 NVL" but "NVIDIA A10"
# does not cover "NVIDIA A100-SXM4-40GB".
_NVML_BOUNDARY = frozenset(" -_(")
_OVERRIDE_SOURCE = "config override"


def _fail(message: str) -> UnknownHardwareError:
    return UnknownHardwareError(message)


def _check_name(value: object, what: str, owner: str) -> str:
    if not isinstance(value, str) or not value or _FORBIDDEN_IN_NAME.search(value):
        raise _fail(
            f"Hardware type `{owner}`: {what} must be a non-empty string without spaces, "
            f"`:`, `|` or backticks; found {value!r}. Fix the catalog entry or override."
        )
    if value.casefold() == ANY:
        raise _fail(
            f"Hardware type `{owner}`: {what} `{value}` is reserved for the cheapest free GPU. "
            "Choose another name."
        )
    return value


def _check_amount(value: object, what: str, owner: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise _fail(
            f"Hardware type `{owner}`: {what} must be a non-negative number; found {value!r}. "
            "Fix the catalog entry or override."
        )
    return float(value)


def _check_strings(value: object, what: str, owner: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise _fail(
            f"Hardware type `{owner}`: {what} must be a list of strings; found {value!r}. "
            "Fix the catalog entry or override."
        )
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise _fail(
                f"Hardware type `{owner}`: every entry of {what} must be a non-empty string; "
                f"found {item!r}. Fix the catalog entry or override."
            )
    return tuple(value)


def _check_text(value: object, what: str, owner: str, *, optional: bool = False) -> Any:
    if (value is None and optional) or isinstance(value, str):
        return value
    raise _fail(
        f"Hardware type `{owner}`: {what} must be a string; found {value!r}. "
        "Fix the catalog entry or override."
    )


@dataclass(frozen=True)
class HardwareType:
    """One kind of hardware the pool can hand out, and what it costs.

    Attributes:
        name: Canonical name, as written in specs (``H100``, ``A100-80GB``, ``cpu``).
        aliases: Other names a spec may use for it (``A100`` for ``A100-40GB``).
        memory_gb: Memory of one GPU in GB; 0 for ``cpu``.
        nvml_names: Device names NVML reports for it; a reported name also matches
            when it extends a listed one after a space or dash.
        ray_name: Ray's ``accelerator_type`` for it, or None.
        price_per_hour: USD per GPU-hour on demand (per core-hour for ``cpu``).
        price_source: Where the price comes from; says "estimate" when it is one.
        price_date: When the price was read (ISO date), or "" when unknown.
    """

    name: str
    aliases: tuple[str, ...] = ()
    memory_gb: float = 0.0
    nvml_names: tuple[str, ...] = ()
    ray_name: str | None = None
    price_per_hour: float = 0.0
    price_source: str = ""
    price_date: str = ""

    def __post_init__(self) -> None:
        owner = self.name if isinstance(self.name, str) else repr(self.name)
        _check_name(self.name, "name", owner)
        aliases = _check_strings(self.aliases, "aliases", owner)
        for alias in aliases:
            _check_name(alias, "alias", owner)
        # Config hands us lists and ints; store the hashable, typed forms.
        object.__setattr__(self, "aliases", aliases)
        object.__setattr__(self, "nvml_names", _check_strings(self.nvml_names, "nvml_names", owner))
        object.__setattr__(self, "memory_gb", _check_amount(self.memory_gb, "memory_gb", owner))
        object.__setattr__(
            self, "price_per_hour", _check_amount(self.price_per_hour, "price_per_hour", owner)
        )
        _check_text(self.ray_name, "ray_name", owner, optional=True)
        _check_text(self.price_source, "price_source", owner)
        _check_text(self.price_date, "price_date", owner)

    @property
    def is_gpu(self) -> bool:
        """Whether this is a GPU type rather than plain CPU cores."""
        return self.name != CPU


_FIELDS = tuple(field.name for field in dataclasses.fields(HardwareType))
_OVERRIDABLE = tuple(name for name in _FIELDS if name != "name")


def _normalize_nvml(name: str) -> str:
    text = " ".join(name.casefold().split())
    stripped = True
    while stripped:
        stripped = False
        for prefix in _VENDOR_PREFIXES:
            if text.startswith(prefix):
                text = text[len(prefix) :]
                stripped = True
    return text


def _suggestion(name: str, index: Mapping[str, str]) -> str:
    close = difflib.get_close_matches(name.casefold(), list(index), n=1, cutoff=0.6)
    return f" Did you mean `{index[close[0]]}`?" if close else ""


class Catalog:
    """Every hardware type cloudgpu knows, looked up by name, alias, NVML or Ray name.

    A catalog is immutable; :meth:`with_overrides` returns a new one.

    Args:
        types: The hardware types. Names and aliases must be unique, ignoring case.
    """

    def __init__(self, types: Iterable[HardwareType]) -> None:
        given = list(types)
        for hw in given:
            if not isinstance(hw, HardwareType):
                raise TypeError(f"Catalog takes HardwareType objects; found {hw!r}")
        ordered = sorted(given, key=lambda t: (not t.is_gpu, t.name.casefold()))
        self._types: dict[str, HardwareType] = {}
        self._index: dict[str, HardwareType] = {}
        nvml: dict[str, HardwareType] = {}
        self._ray: dict[str, HardwareType] = {}
        for hw in ordered:
            self._types[hw.name] = hw
            for key in (hw.name, *hw.aliases):
                self._claim(self._index, key.casefold(), hw, f"name `{key}`")
            for nvml_name in hw.nvml_names:
                self._claim(nvml, _normalize_nvml(nvml_name), hw, f"NVML name `{nvml_name}`")
            if hw.ray_name is not None:
                self._claim(self._ray, hw.ray_name.casefold(), hw, f"Ray name `{hw.ray_name}`")
        # Longest first, so the most specific listed name wins.
        self._nvml = sorted(nvml.items(), key=lambda item: -len(item[0]))

    @staticmethod
    def _claim(table: dict[str, HardwareType], key: str, hw: HardwareType, what: str) -> None:
        other = table.get(key)
        if other is not None and other is not hw:
            raise _fail(
                f"Hardware catalog: {what} belongs to both `{other.name}` and `{hw.name}`. "
                "Each name, alias, NVML name and Ray name must belong to one type; "
                "fix the catalog or override."
            )
        table[key] = hw

    @classmethod
    def default(cls) -> Catalog:
        """Return the catalog shipped with cloudgpu (loaded once, then cached)."""
        return _default_catalog()

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Catalog:
        """Load a catalog from a JSON file in the shipped ``catalog.json`` format.

        Args:
            path: A JSON file holding ``{"types": [{"name": ..., ...}, ...]}``.

        Raises:
            UnknownHardwareError: The file is not valid JSON or an entry is malformed.
            OSError: The file cannot be read.
        """
        with open(path, encoding="utf-8") as file:
            text = file.read()
        return cls._from_json(text, os.fspath(path))

    @classmethod
    def _from_json(cls, text: str, origin: str) -> Catalog:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _fail(
                f"Hardware catalog `{origin}` is not valid JSON ({exc}). Fix the file."
            ) from exc
        entries = data.get("types") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise _fail(
                f"Hardware catalog `{origin}`: expected a JSON object with a `types` list; "
                f"found {type(data).__name__}. See cloudgpu/data/catalog.json for the format."
            )
        return cls(_type_from_entry(entry, origin) for entry in entries)

    def with_overrides(self, overrides: Mapping[str, Mapping[str, Any]]) -> Catalog:
        """Return a copy with some fields of known types changed and new types added.

        A key naming a known type (any case, or an alias) changes the fields given;
        overriding ``price_per_hour`` without ``price_source`` marks the source as
        ``"config override"``. Any other key adds a type of that name, which needs
        at least ``memory_gb`` and ``price_per_hour``.

        Args:
            overrides: For example ``{"H100": {"price_per_hour": 2.0},
                "MI300X": {"memory_gb": 192, "price_per_hour": 4.0}}``.

        Raises:
            UnknownHardwareError: A field is unknown or has a bad value, a new type
                lacks a required field, or names clash.
        """
        types = dict(self._types)
        for key, fields in overrides.items():
            if not isinstance(fields, Mapping):
                raise _fail(
                    f"Hardware override `{key}`: expected a mapping of fields such as "
                    f"{{'price_per_hour': 2.0}}; found {fields!r}."
                )
            unknown = sorted(set(fields) - set(_OVERRIDABLE))
            if unknown:
                raise _fail(
                    f"Hardware override `{key}`: unknown field(s) {', '.join(map(str, unknown))}. "
                    f"Known fields: {', '.join(_OVERRIDABLE)}."
                )
            changes = dict(fields)
            if "price_per_hour" in changes and "price_source" not in changes:
                changes["price_source"] = _OVERRIDE_SOURCE
                changes.setdefault("price_date", "")
            existing = self._index.get(key.strip().casefold()) if isinstance(key, str) else None
            if existing is not None:
                base = types[existing.name]
                types[existing.name] = dataclasses.replace(base, **changes)
                continue
            missing = [name for name in ("memory_gb", "price_per_hour") if name not in fields]
            if missing:
                raise _fail(
                    f"Hardware override `{key}` adds a new type but lacks {' and '.join(missing)}. "
                    f"Give them, or use a known name: {', '.join(self.names())}."
                )
            name = key.strip() if isinstance(key, str) else key
            types[name] = HardwareType(name=name, **changes)
        return Catalog(types.values())

    def names(self) -> list[str]:
        """Return the canonical names, sorted, GPU types first and ``cpu`` last."""
        return list(self._types)

    def get(self, name: str) -> HardwareType:
        """Return the type called ``name`` (canonical name or alias, any case).

        Raises:
            UnknownHardwareError: No type has that name; the message suggests the
                closest one and lists all.
        """
        found = self._lookup(name)
        if found is None:
            raise _fail(self._unknown_message(name))
        return found

    def _lookup(self, name: str) -> HardwareType | None:
        return self._index.get(name.strip().casefold()) if isinstance(name, str) else None

    def _unknown_message(self, name: str, *, context: str = "", extra: Iterable[str] = ()) -> str:
        extra = tuple(extra)
        index = {key: hw.name for key, hw in self._index.items()}
        index.update({word.casefold(): word for word in extra})
        known = ", ".join([*self.names(), *extra])
        label = f"`{name}`" if name.strip() else "(empty name)"
        return f"Unknown GPU {label}{context}.{_suggestion(name.strip(), index)} Known: {known}."

    def from_nvml_name(self, nvml_name: str) -> HardwareType | None:
        """Return the type of a device NVML reports as ``nvml_name``, or None.

        Matching ignores case, repeated spaces and a leading ``NVIDIA``/``Tesla``;
        a listed name also matches a longer reported name that extends it after a
        space or dash (``NVIDIA H100`` matches ``NVIDIA H100 NVL``).
        """
        reported = _normalize_nvml(nvml_name)
        if not reported:
            return None
        for listed, hw in self._nvml:
            if reported == listed or (
                reported.startswith(listed) and reported[len(listed)] in _NVML_BOUNDARY
            ):
                return hw
        return None

    def from_ray_name(self, ray_name: str) -> HardwareType | None:
        """Return the type Ray calls ``ray_name`` (e.g. ``A100-80G``), or None."""
        return self._ray.get(ray_name.strip().casefold())

    def __iter__(self) -> Iterator[HardwareType]:
        return iter(self._types.values())

    def __len__(self) -> int:
        return len(self._types)

    def __contains__(self, item: object) -> bool:
        if isinstance(item, HardwareType):
            return self._types.get(item.name) == item
        return isinstance(item, str) and self._lookup(item) is not None

    def __repr__(self) -> str:
        return f"Catalog({', '.join(self.names())})"


def _type_from_entry(entry: object, origin: str) -> HardwareType:
    if not isinstance(entry, dict) or "name" not in entry:
        raise _fail(
            f"Hardware catalog `{origin}`: every entry of `types` must be an object with a "
            f"`name`; found {entry!r}."
        )
    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        raise _fail(
            f"Hardware catalog `{origin}`, type `{entry['name']}`: unknown field(s) "
            f"{', '.join(map(str, unknown))}. Known fields: {', '.join(_FIELDS)}."
        )
    return HardwareType(**entry)


@functools.lru_cache(maxsize=1)
def _default_catalog() -> Catalog:
    text = (resources.files("cloudgpu") / "data" / "catalog.json").read_text(encoding="utf-8")
    return Catalog._from_json(text, "cloudgpu/data/catalog.json")


@dataclass(frozen=True)
class Choice:
    """One alternative of a hardware spec: a type and how many.

    Attributes:
        type: A canonical catalog name, ``"cpu"`` or ``"any"``.
        count: GPUs of that type, or cores for ``cpu``; at least 1.
    """

    type: str
    count: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.type, str) or not self.type or _FORBIDDEN_IN_NAME.search(self.type):
            raise _fail(
                f"Hardware choice type must be a name like `H100`, `cpu` or `any`; "
                f"found {self.type!r}."
            )
        limit = self.max_count
        if isinstance(self.count, bool) or not isinstance(self.count, int):
            raise _fail(
                f"Hardware choice `{self.type}`: count must be a whole number from 1 to "
                f"{limit}; found {self.count!r}."
            )
        if not 1 <= self.count <= limit:
            raise _fail(
                f"Hardware choice `{self.type}`: count must be from 1 to {limit}; "
                f"found {self.count}."
            )

    @property
    def is_cpu(self) -> bool:
        """Whether this choice asks for CPU cores only."""
        return self.type == CPU

    @property
    def is_any(self) -> bool:
        """Whether this choice takes the cheapest free GPU of any type."""
        return self.type == ANY

    @property
    def max_count(self) -> int:
        """The largest count a spec may ask for in this choice."""
        return MAX_CPU_CORES if self.type == CPU else MAX_GPU_COUNT

    @property
    def display(self) -> str:
        """Human text: ``1x H100``, ``2x any GPU``, ``CPU``, ``CPU (4 cores)``."""
        if self.is_cpu:
            return "CPU" if self.count == 1 else f"CPU ({self.count} cores)"
        return f"{self.count}x {'any GPU' if self.is_any else self.type}"

    def __str__(self) -> str:
        return self.type if self.count == 1 else f"{self.type}:{self.count}"


@dataclass(frozen=True)
class HardwareSpec:
    """What a user asked for: choices tried in order, the first that fits wins.

    Attributes:
        choices: The alternatives, most wanted first; never empty, no repeats.
    """

    choices: tuple[Choice, ...]

    def __post_init__(self) -> None:
        choices = tuple(self.choices)
        if not choices or not all(isinstance(choice, Choice) for choice in choices):
            raise _fail(f"A hardware spec needs at least one Choice; found {self.choices!r}.")
        if len(set(choices)) != len(choices):
            raise _fail(f"A hardware spec lists a choice twice: {'|'.join(map(str, choices))}.")
        object.__setattr__(self, "choices", choices)

    @property
    def primary(self) -> Choice:
        """The first, most wanted choice."""
        return self.choices[0]

    @property
    def is_cpu(self) -> bool:
        """Whether every choice is CPU only, so no GPU is ever needed."""
        return all(choice.is_cpu for choice in self.choices)

    @property
    def display(self) -> str:
        """Human text, e.g. ``1x H100 or 2x A100-80GB``, ``CPU``."""
        return " or ".join(choice.display for choice in self.choices)

    def __str__(self) -> str:
        return "|".join(str(choice) for choice in self.choices)


def parse_spec(text: str, catalog: Catalog | None = None) -> HardwareSpec:
    """Parse a hardware spec such as ``H100:2|A100-80GB:2``, ``cpu:4`` or ``any``.

    Names are matched without regard to case, aliases included, and become
    canonical names; whitespace around ``|`` and ``:`` is ignored.

    Args:
        text: The spec as the user wrote it.
        catalog: Where names are looked up; the default catalog when None.

    Returns:
        The parsed spec; ``str()`` of it is the canonical form.

    Raises:
        UnknownHardwareError: The spec is empty or malformed, names an unknown
            type, has a bad count, or repeats an alternative.
        TypeError: ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"A hardware spec must be a string like {_EXAMPLES}; found {text!r}")
    catalog = catalog if catalog is not None else Catalog.default()
    if not text.strip():
        raise _fail(f"Empty hardware spec. Expected a GPU type such as {_EXAMPLES}.")
    choices: list[Choice] = []
    parts = text.split("|")
    for position, part in enumerate(parts, start=1):
        choice = _parse_choice(part, position, text, catalog)
        if choice in choices:
            raise _fail(
                f"Hardware spec `{text}` lists `{choice}` twice. Each fallback after `|` must "
                f"differ; remove the repeat."
            )
        choices.append(choice)
    return HardwareSpec(tuple(choices))


def _parse_choice(part: str, position: int, text: str, catalog: Catalog) -> Choice:
    if not part.strip():
        raise _fail(
            f"Hardware spec `{text}` has an empty alternative (number {position}). Expected a "
            "GPU type on each side of `|`; remove the stray `|`."
        )
    pieces = part.split(":")
    if len(pieces) > 2:
        raise _fail(
            f"Hardware spec `{text}`: `{part.strip()}` has {len(pieces) - 1} `:`; expected "
            "TYPE or TYPE:COUNT, e.g. `H100:2`."
        )
    name = pieces[0].strip()
    if not name:
        raise _fail(
            f"Hardware spec `{text}`: `{part.strip()}` has a count but no GPU type before `:`. "
            "Write e.g. `H100:2`."
        )
    folded = name.casefold()
    if folded in (CPU, ANY):
        canonical = folded
    else:
        found = catalog._lookup(name)
        if found is None:
            context = "" if text.strip() == name else f" in hardware spec `{text}`"
            raise _fail(catalog._unknown_message(name, context=context, extra=(ANY,)))
        canonical = found.name
    if len(pieces) == 1:
        return Choice(canonical)
    return Choice(canonical, _parse_count(pieces[1].strip(), canonical, text))


def _parse_count(count_text: str, canonical: str, text: str) -> int:
    limit = MAX_CPU_CORES if canonical == CPU else MAX_GPU_COUNT
    unit = "cores" if canonical == CPU else "GPUs"
    found = f"`{count_text}`" if count_text else "nothing"
    if not _DIGITS.fullmatch(count_text):
        raise _fail(
            f"Hardware spec `{text}`: the count of `{canonical}` must be a whole number of "
            f"{unit} from 1 to {limit}; found {found} after `:`. Write e.g. `{canonical}:2`."
        )
    significant = count_text.lstrip("0") or "0"
    # Never int() a huge digit string: Python refuses past 4300 digits.
    count = int(significant) if len(significant) <= 6 else limit + 1
    if not 1 <= count <= limit:
        raise _fail(
            f"Hardware spec `{text}`: the count of `{canonical}` must be from 1 to {limit} "
            f"{unit}; found {found}. Write e.g. `{canonical}:2`."
        )
    return count
