"""Tests for hardware specs and the price catalog (cloudgpu.hardware)."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudgpu.errors import CloudGPUError, UnknownHardwareError
from cloudgpu.hardware import (
    MAX_CPU_CORES,
    Catalog,
    Choice,
    HardwareSpec,
    HardwareType,
    parse_spec,
)

FAST = settings(deadline=None, max_examples=200, database=None)

CATALOG = Catalog.default()
GPU_NAMES = [name for name in CATALOG.names() if name != "cpu"]
# Every spelling a spec may use, paired with the canonical type it means.
SPELLINGS = [(hw.name, key) for hw in CATALOG for key in (hw.name, *hw.aliases)]
SPELLINGS += [("any", "any")]


def _shipped_json() -> dict[str, Any]:
    text = (resources.files("cloudgpu") / "data" / "catalog.json").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


# --- the default catalog ---------------------------------------------------


def test_default_catalog_has_the_documented_types_gpus_first_then_cpu() -> None:
    assert CATALOG.names() == [
        "A100-40GB", "A100-80GB", "A10G", "H100", "H200", "L4", "L40S", "T4", "cpu",
    ]  # fmt: skip
    assert [hw.name for hw in CATALOG] == CATALOG.names()
    assert len(CATALOG) == 9
    assert Catalog.default() is CATALOG


def test_every_type_has_a_positive_price_with_source_and_date() -> None:
    for hw in CATALOG:
        assert hw.price_per_hour > 0, hw.name
        assert hw.price_source.strip(), hw.name
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", hw.price_date), hw.name


def test_shipped_json_writes_source_and_date_beside_each_price() -> None:
    entries = _shipped_json()["types"]
    assert {entry["name"] for entry in entries} == set(CATALOG.names())
    for entry in entries:
        assert isinstance(entry["price_per_hour"], (int, float)), entry["name"]
        assert entry["price_source"].strip(), entry["name"]
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", entry["price_date"]), entry["name"]


def test_prices_follow_the_gathered_figures_and_estimates_say_so() -> None:
    assert CATALOG.get("H100").price_per_hour == 3.95
    assert CATALOG.get("A100-80GB").price_per_hour == 2.50
    assert CATALOG.get("T4").price_per_hour == 0.59
    assert "estimate" in CATALOG.get("H200").price_source
    assert "estimate" in CATALOG.get("cpu").price_source
    assert CATALOG.get("H200").price_per_hour > CATALOG.get("H100").price_per_hour


def test_memory_and_gpu_flag() -> None:
    assert CATALOG.get("H200").memory_gb == 141
    assert CATALOG.get("A100").memory_gb == 40
    assert CATALOG.get("A100-80GB").memory_gb == 80
    assert all(CATALOG.get(name).is_gpu for name in GPU_NAMES)
    assert not CATALOG.get("cpu").is_gpu


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("H100", "H100"),
        ("h100", "H100"),
        (" H100-80GB ", "H100"),
        ("h100-sxm", "H100"),
        ("A100", "A100-40GB"),
        ("a100-80g", "A100-80GB"),
        ("A10", "A10G"),
        ("CPU", "cpu"),
    ],
)
def test_get_accepts_any_case_and_aliases(spelling: str, canonical: str) -> None:
    assert CATALOG.get(spelling).name == canonical
    assert spelling in CATALOG


def test_get_unknown_suggests_the_closest_name_and_lists_all() -> None:
    with pytest.raises(UnknownHardwareError) as info:
        CATALOG.get("H1000")
    message = str(info.value)
    assert message.startswith("Unknown GPU `H1000`. Did you mean `H100`? Known: A100-40GB, ")
    for name in CATALOG.names():
        assert name in message
    assert "H1000" not in CATALOG
    assert isinstance(info.value, CloudGPUError)


def test_get_unknown_without_a_close_name_does_not_guess() -> None:
    with pytest.raises(UnknownHardwareError) as info:
        CATALOG.get("zzzzzz")
    assert "Did you mean" not in str(info.value)
    assert "Known: A100-40GB" in str(info.value)


def test_alias_suggestion_names_the_canonical_type() -> None:
    with pytest.raises(UnknownHardwareError, match=r"Did you mean `A100-80GB`\?"):
        CATALOG.get("A100-80GG")


@pytest.mark.parametrize(
    ("nvml_name", "canonical"),
    [
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA A100 80GB PCIe", "A100-80GB"),
        ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
        ("NVIDIA A100-PCIE-40GB", "A100-40GB"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100"),
        ("NVIDIA H100 NVL", "H100"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA A10", "A10G"),
        ("NVIDIA L4", "L4"),
        ("Tesla T4", "T4"),
        ("nvidia  h100  80gb hbm3", "H100"),
    ],
)
def test_from_nvml_name_matches_reported_device_names(nvml_name: str, canonical: str) -> None:
    found = CATALOG.from_nvml_name(nvml_name)
    assert found is not None
    assert found.name == canonical


@pytest.mark.parametrize(
    "nvml_name",
    ["NVIDIA GH200 480GB", "NVIDIA L40", "NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-16GB", ""],
)
def test_from_nvml_name_does_not_guess_at_other_devices(nvml_name: str) -> None:
    # Prefix look-alikes (L40 vs L40S, GH200 vs H200, A10 vs A100) must not match.
    assert CATALOG.from_nvml_name(nvml_name) is None


def test_from_ray_name_uses_rays_spelling() -> None:
    assert CATALOG.from_ray_name("A100-80G") == CATALOG.get("A100-80GB")
    assert CATALOG.from_ray_name("A100-40G") == CATALOG.get("A100-40GB")
    assert CATALOG.from_ray_name("H100") == CATALOG.get("H100")
    assert CATALOG.from_ray_name("L4") == CATALOG.get("L4")
    assert CATALOG.from_ray_name("A100-80GB") is None
    assert CATALOG.get("H200").ray_name == "H200"
    assert CATALOG.get("cpu").ray_name is None


# --- overrides and other catalogs --------------------------------------------


def test_overrides_change_a_price_and_add_a_type() -> None:
    changed = CATALOG.with_overrides(
        {
            "h100": {"price_per_hour": 2.0},
            "MI300X": {"memory_gb": 192, "price_per_hour": 4.0, "nvml_names": ["AMD MI300X"]},
        }
    )
    assert changed.get("H100").price_per_hour == 2.0
    assert changed.get("H100").price_source == "config override"
    assert changed.get("H100").aliases == CATALOG.get("H100").aliases
    mi300x = changed.get("mi300x")
    assert (mi300x.name, mi300x.memory_gb, mi300x.price_per_hour) == ("MI300X", 192.0, 4.0)
    assert changed.from_nvml_name("AMD MI300X") == mi300x
    assert changed.names()[-1] == "cpu"
    assert "MI300X" in changed.names()
    assert str(parse_spec("mi300x:8|H100", changed)) == "MI300X:8|H100"
    # The shipped catalog is untouched.
    assert CATALOG.get("H100").price_per_hour == 3.95
    assert "MI300X" not in CATALOG
    with pytest.raises(UnknownHardwareError):
        parse_spec("MI300X")


def test_override_of_an_alias_changes_the_canonical_type() -> None:
    changed = CATALOG.with_overrides({"A100": {"price_per_hour": 1.5, "price_source": "our deal"}})
    assert changed.get("A100-40GB").price_per_hour == 1.5
    assert changed.get("A100-40GB").price_source == "our deal"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"H100": {"price": 2.0}}, r"unknown field\(s\) price\. Known fields: aliases"),
        ({"MI300X": {"price_per_hour": 4.0}}, r"`MI300X` adds a new type but lacks memory_gb"),
        ({"H100": {"price_per_hour": -1}}, r"price_per_hour must be a non-negative number"),
        ({"H100": {"memory_gb": "lots"}}, r"memory_gb must be a non-negative number"),
        ({"H100": 2.0}, r"expected a mapping of fields"),
        ({"X1": {"memory_gb": 1, "price_per_hour": 1, "aliases": ["H100"]}}, r"belongs to both"),
        ({"any": {"memory_gb": 1, "price_per_hour": 1}}, r"reserved for the cheapest free GPU"),
        ({"H 1": {"memory_gb": 1, "price_per_hour": 1}}, r"without spaces"),
    ],
)
def test_bad_overrides_are_clear_errors(overrides: dict[str, Any], expected: str) -> None:
    with pytest.raises(UnknownHardwareError, match=expected):
        CATALOG.with_overrides(overrides)


def test_from_file_round_trips_the_shipped_format(tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(_shipped_json()), encoding="utf-8")
    loaded = Catalog.from_file(path)
    assert list(loaded) == list(CATALOG)


def test_from_file_reports_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(UnknownHardwareError, match="is not valid JSON"):
        Catalog.from_file(path)
    path.write_text('{"types": [{"name": "X", "colour": "red"}]}', encoding="utf-8")
    with pytest.raises(UnknownHardwareError, match=r"unknown field\(s\) colour"):
        Catalog.from_file(path)


def test_catalog_rejects_clashing_names() -> None:
    with pytest.raises(UnknownHardwareError, match="belongs to both `A` and `a`"):
        Catalog([HardwareType("A"), HardwareType("a")])


# --- parsing specs -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("H100", "H100"),
        ("h100", "H100"),
        ("H100:2", "H100:2"),
        ("H100:1", "H100"),
        ("A100-80GB", "A100-80GB"),
        ("a100", "A100-40GB"),
        ("H100|A100-80GB", "H100|A100-80GB"),
        ("  H100 : 2 |  A100-80GB:02 ", "H100:2|A100-80GB:2"),
        ("cpu", "cpu"),
        ("CPU", "cpu"),
        ("cpu:4", "cpu:4"),
        ("H100|cpu", "H100|cpu"),
        ("any", "any"),
        ("ANY:2", "any:2"),
        ("H100:2|H100", "H100:2|H100"),
        ("H100:64", "H100:64"),
    ],
)
def test_parse_valid_specs(text: str, canonical: str) -> None:
    spec = parse_spec(text)
    assert str(spec) == canonical
    assert parse_spec(canonical) == spec


def test_spec_parts() -> None:
    spec = parse_spec("h100:2|a100-80gb")
    assert spec.choices == (Choice("H100", 2), Choice("A100-80GB", 1))
    assert spec.primary == Choice("H100", 2)
    assert spec.display == "2x H100 or 1x A100-80GB"
    assert not spec.is_cpu
    assert parse_spec("H100").display == "1x H100"
    assert parse_spec("cpu").display == "CPU"
    assert parse_spec("cpu").is_cpu
    assert parse_spec("cpu:4").primary == Choice("cpu", 4)
    assert parse_spec("cpu:4").is_cpu
    assert not parse_spec("H100|cpu").is_cpu
    assert parse_spec("any").primary.is_any
    assert str(Choice("H100")) == "H100"
    assert str(Choice("H100", 2)) == "H100:2"


def test_parse_uses_the_given_catalog() -> None:
    only_t4 = Catalog([CATALOG.get("T4"), CATALOG.get("cpu")])
    assert str(parse_spec("t4|cpu", only_t4)) == "T4|cpu"
    with pytest.raises(UnknownHardwareError, match=r"Unknown GPU `H100`.*Known: T4, cpu, any\."):
        parse_spec("H100", only_t4)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", r"^Empty hardware spec\. Expected a GPU type such as `H100`"),
        ("   ", r"^Empty hardware spec"),
        ("H100|", r"`H100\|` has an empty alternative \(number 2\).*remove the stray `\|`"),
        ("|H100", r"empty alternative \(number 1\)"),
        ("H100||A100", r"empty alternative \(number 2\)"),
        ("H100:0", r"count of `H100` must be from 1 to 64 GPUs; found `0`"),
        ("H100:-1", r"count of `H100` must be a whole number of GPUs from 1 to 64; found `-1`"),
        ("H100:x", r"whole number.*found `x` after `:`\. Write e\.g\. `H100:2`"),
        ("H100:1.5", r"whole number.*found `1\.5`"),
        ("H100:", r"whole number.*found nothing after `:`"),
        ("H100:+2", r"whole number.*found `\+2`"),
        ("H100:²", r"whole number.*found `²`"),
        ("H100:2:3", r"`H100:2:3` has 2 `:`; expected TYPE or TYPE:COUNT"),
        (":2", r"has a count but no GPU type before `:`"),
        ("H100:65", r"from 1 to 64 GPUs; found `65`"),
        ("any:65", r"from 1 to 64 GPUs; found `65`"),
        ("H100:" + "9" * 5000, r"from 1 to 64 GPUs"),
        ("cpu:0", r"count of `cpu` must be from 1 to 1024 cores"),
        ("cpu:1025", r"count of `cpu` must be from 1 to 1024 cores"),
        ("H1000", r"^Unknown GPU `H1000`\. Did you mean `H100`\? Known: A100-40GB, A100-80GB"),
        ("H100|H1000:2", r"^Unknown GPU `H1000` in hardware spec `H100\|H1000:2`\. Did you mean"),
        ("ani", r"Did you mean `any`\?"),
        ("H 100", r"^Unknown GPU `H 100`"),
        ("H100|h100", r"`H100\|h100` lists `H100` twice.*remove the repeat"),
        ("A100|a100-40gb", r"lists `A100-40GB` twice"),
        ("cpu|CPU:1", r"lists `cpu` twice"),
    ],
)
def test_bad_specs_are_clear_errors(text: str, expected: str) -> None:
    with pytest.raises(UnknownHardwareError, match=expected):
        parse_spec(text)


def test_unknown_name_with_nothing_close_lists_names_without_guessing() -> None:
    with pytest.raises(UnknownHardwareError) as info:
        parse_spec("quantum")
    assert "Did you mean" not in str(info.value)
    assert str(info.value).endswith(
        "Known: A100-40GB, A100-80GB, A10G, H100, H200, L4, L40S, T4, cpu, any."
    )


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match="must be a string"):
        parse_spec(2)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "build",
    [
        lambda: Choice("H100", 0),
        lambda: Choice("H100", 65),
        lambda: Choice("H100", True),
        lambda: Choice("cpu", 1025),
        lambda: Choice("H100|A100"),
        lambda: HardwareSpec(()),
        lambda: HardwareSpec((Choice("H100"), Choice("H100"))),
    ],
)
def test_spec_objects_refuse_invalid_values(build: Any) -> None:
    with pytest.raises(UnknownHardwareError):
        build()


# --- properties --------------------------------------------------------------


def _random_case(draw: st.DrawFn, text: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.upper() if flip else c.lower() for c, flip in zip(text, flips, strict=True))


@st.composite
def spec_texts(draw: st.DrawFn) -> tuple[str, tuple[Choice, ...]]:
    """A valid spec as a user might type it, and the choices it must parse to."""
    spaces = st.sampled_from(["", " ", "  ", "\t"])
    picked = draw(
        st.lists(
            st.tuples(st.sampled_from([*SPELLINGS, ("cpu", "cpu")]), st.integers(1, 64)),
            min_size=1,
            max_size=4,
            unique_by=lambda item: (item[0][0], item[1]),
        )
    )
    parts: list[str] = []
    expected: list[Choice] = []
    for (canonical, spelling), count in picked:
        if canonical == "cpu":
            count = draw(st.integers(1, MAX_CPU_CORES))
        written = _random_case(draw, spelling)
        if count == 1 and draw(st.booleans()):
            part = written
        else:
            part = f"{written}{draw(spaces)}:{draw(spaces)}{count}"
        parts.append(f"{draw(spaces)}{part}{draw(spaces)}")
        expected.append(Choice(canonical, count))
    if len(set(expected)) != len(expected):
        # Two cpu choices whose redrawn core counts collided; keep the first.
        deduped = list(dict.fromkeys(expected))
        keep = [expected.index(choice) for choice in deduped]
        parts = [parts[i] for i in keep]
        expected = deduped
    return "|".join(parts), tuple(expected)


@FAST
@given(spec_texts())
def test_property_valid_specs_parse_and_round_trip(case: tuple[str, tuple[Choice, ...]]) -> None:
    text, expected = case
    spec = parse_spec(text)
    assert spec.choices == expected
    assert parse_spec(str(spec)) == spec
    assert str(parse_spec(str(spec))) == str(spec)


@FAST
@given(spec_texts())
def test_property_case_does_not_matter(case: tuple[str, tuple[Choice, ...]]) -> None:
    text, _ = case
    assert parse_spec(text.upper()) == parse_spec(text.lower()) == parse_spec(text)


@FAST
@given(
    st.one_of(
        st.text(),
        st.text(alphabet="H100A8GBcpuanyL4T:|-. 9x\t", max_size=30),
        st.lists(st.sampled_from([s for _, s in SPELLINGS] + ["cpu", ":", "|", "2", "0", " "])).map(
            "".join
        ),
    )
)
def test_property_garbage_only_ever_raises_unknown_hardware_error(text: str) -> None:
    try:
        spec = parse_spec(text)
    except UnknownHardwareError as exc:
        assert str(exc)
    else:
        assert parse_spec(str(spec)) == spec
