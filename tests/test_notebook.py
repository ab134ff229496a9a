"""metadata.cloudgpu: reading and checking it, what a kernelspec name says, whether a pool can
serve a notebook, where a last run differs; requirement strings; the ledger's new columns.

No processes here: these are the pure parts behind ``cloudgpu run`` and ``cloudgpu inspect``
(test_run.py runs them for real).
"""

from __future__ import annotations

import decimal
import importlib.metadata
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nbformat
import numpy
import pytest
from cloudgpu.kernel.kernelspec import hardware_from_name, kernelspec_name
from cloudgpu.remote_host.pool.ledger import Ledger

from cloudgpu import packages
from cloudgpu.environment import check_requirements, environment_key, split_requirements
from cloudgpu.errors import InvalidRequestError, NotebookMetadataError
from cloudgpu.hardware import parse_spec
from cloudgpu.notebook import (
    SCHEMA,
    NotebookRecord,
    availability,
    differences,
    kernelspec_hardware,
    read_record,
    write_record,
)
from cloudgpu.packages import version_differences

pytestmark = pytest.mark.timeout(30)


def _nb(cloudgpu: Any = None, kernel: str = "python3") -> Any:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": kernel, "language": "python"}
    if cloudgpu is not None:
        nb.metadata["cloudgpu"] = cloudgpu
    return nb


def test_a_record_round_trips_through_the_notebook_at_the_current_schema() -> None:
    nb = _nb()
    assert read_record(nb) == NotebookRecord()
    ran = {"at": "2026-01-01T00:00:00Z", "gpus": {"type": "H100", "count": 1}}
    write_record(nb, NotebookRecord("H100", ["tabulate==0.9.0"], ran))
    assert nb.metadata["cloudgpu"] == {"schema": SCHEMA, "hardware": "H100",
                                       "environment": ["tabulate==0.9.0"], "ran_on": ran}
    assert read_record(nb) == NotebookRecord("H100", ["tabulate==0.9.0"], ran)


@pytest.mark.parametrize(("metadata", "says"), [
    ({"schema": 99}, "newer than this cloudgpu knows"),
    ({"hardware": 3}, "must be a hardware spec"),
    ({"environment": "tabulate"}, "must be a list of pip requirement strings"),
    ({"environment": ["tabulate", "-e ."]}, "is not a pip requirement"),
    ({"ran_on": []}, "ran_on must be an object"),
    ("H100", "must be an object"),
])
def test_malformed_metadata_is_refused_naming_the_field(metadata: Any, says: str) -> None:
    with pytest.raises(NotebookMetadataError, match=says):
        read_record(_nb(metadata))


def test_requirements_are_checked_and_split_where_a_specifier_continues() -> None:
    assert split_requirements("tabulate==0.9.0,numpy>=1.26,<3, rich") == [
        "tabulate==0.9.0", "numpy>=1.26,<3", "rich"]
    assert split_requirements("") == []
    with pytest.raises(InvalidRequestError, match="`--index-url=x` in `--env`"):
        split_requirements("--index-url=x")
    with pytest.raises(InvalidRequestError, match="list of pip requirement strings"):
        check_requirements({"tabulate": "0.9"})
    assert environment_key(["b", "a"]) == environment_key(["a", "b"]) != environment_key(["a"])


@pytest.mark.parametrize("text", ["H100", "A100-80GB:2", "H100|A100-80GB:2", "cpu", "any:2"])
def test_a_cloud_gpu_kernelspec_name_says_its_hardware_when_not_installed(text: str) -> None:
    name = kernelspec_name(parse_spec(text))
    assert hardware_from_name(name) == str(parse_spec(text))
    assert kernelspec_hardware(_nb(kernel=name)) == str(parse_spec(text))
    assert hardware_from_name("python3") is None
    assert kernelspec_hardware(_nb()) is None


OFFERED = [
    {"type": "H100", "price_per_hour": 3.95, "total": 1, "free": 1, "queued": 0,
     "simulated": True},
    {"type": "A100-80GB", "price_per_hour": 1.79, "total": 0, "free": 0, "queued": 0,
     "simulated": False},
    {"type": "cpu", "price_per_hour": 0.05, "total": None, "free": None, "queued": 0,
     "simulated": False},
]


def test_availability_names_the_choice_served_its_price_and_what_is_missing() -> None:
    assert availability(parse_spec("A100-80GB|H100"), OFFERED) == (
        "H100", 3.95, "1 of 1 H100 (simulated) free now")
    served, price, note = availability(parse_spec("H100:2"), OFFERED)
    assert served is None and price == 0
    assert note == "the pool has no 2x H100; it has CPU, 1x H100 (simulated)"
    assert availability(parse_spec("cpu:2"), OFFERED)[:2] == ("cpu:2", 0.1)


def _ran(gpu_type: str, count: int, **packages: str) -> dict[str, Any]:
    return {"at": "2026-01-01T00:00:00Z", "gpus": {"type": gpu_type, "count": count},
            "packages": packages}


def test_differences_name_another_gpu_a_fallback_and_versions_outside_the_environment() -> None:
    assert differences(NotebookRecord("H100", [], _ran("H100", 1))) == []
    assert differences(NotebookRecord("H100|A100-80GB", [], _ran("A100-80GB", 1))) == [
        "the last run got the fallback 1x A100-80GB, not the first choice 1x H100"]
    assert differences(NotebookRecord("H100:2", [], _ran("H100", 1))) == [
        "the notebook asks for 2x H100, but the last run was on 1x H100"]
    assert differences(NotebookRecord("cpu", [], _ran("cpu", 0))) == []
    record = NotebookRecord("cpu", ["tabulate==0.9.0", "numpy>=2"],
                            _ran("cpu", 0, tabulate="0.8.10", numpy="2.1.0"))
    assert differences(record) == [
        "the last run had tabulate 0.8.10, but the environment asks for `tabulate==0.9.0`"]
    cells = NotebookRecord(ran_on={"at": "x", "remote_cells": {
        "cpu": _ran("cpu", 0, numpy="2.1.0")}})
    assert differences(cells, local={"numpy": "2.2.0"}) == [
        "`%%remote gpu=cpu` cells: numpy is 2.2.0 here but was 2.1.0 remotely"]


def test_a_value_moving_between_two_versions_of_its_package_is_named() -> None:
    here = {"df": ["pandas.core.frame", "pandas", "2.2.3"], "n": ["numpy", "numpy", "2.1.0"]}
    there = {"df": ["pandas.core.frame", "pandas", "2.1.0"], "n": ["numpy", "numpy", "2.1.0"]}
    (warning,) = version_differences(here, there)
    assert "`df` is a pandas object: pandas is 2.2.3 here but 2.1.0 on the remote" in warning


def test_type_versions_scan_the_installed_distributions_once_at_most(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A scan of what is installed takes 100-300 ms, and it ran on a kernel's first push
    (the WAN bench's 80 MB push lost 130 ms a cell to it): a distribution named like its
    module, the standard library and the user's own modules need none, and the answer for
    a module is kept."""
    scans = []

    def scan() -> Mapping[str, list[str]]:
        scans.append(1)
        return {"a_module_of_my_own": ["pytest"]}  # a distribution named otherwise

    monkeypatch.setattr(importlib.metadata, "packages_distributions", scan)
    monkeypatch.setattr(packages, "_distributions", None)
    monkeypatch.setattr(packages, "_owners", {})
    mine = type("Mine", (), {"__module__": "a_module_of_my_own"})()
    values = {"bytes": b"x", "dict": {}, "decimal": decimal.Decimal(1),
              "here": type("Here", (), {})(),  # this test file's: the user's own
              "array": numpy.zeros(1), "mine": mine}
    for _ in range(3):
        found = packages.type_versions(values)
    assert found == {"array": ["numpy", "numpy", numpy.__version__],
                     "mine": ["a_module_of_my_own", "pytest", pytest.__version__]}
    assert len(scans) == 1


def test_a_ledger_from_before_environments_gets_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE sessions (id TEXT PRIMARY KEY, user TEXT NOT NULL, hardware TEXT "
                "NOT NULL, state TEXT NOT NULL, created REAL NOT NULL, started REAL, ended REAL, "
                "last_seen REAL, gpu_type TEXT, count INTEGER, rate_per_hour REAL, host_id TEXT, "
                "host_url TEXT, kernel_id TEXT, token TEXT, gpus TEXT, simulated INTEGER DEFAULT "
                "0, max_cost REAL, idle_timeout REAL, notebook TEXT, stop_reason TEXT, "
                "warnings TEXT)")
    old.execute("INSERT INTO sessions (id, user, hardware, state, created, gpus, warnings) "
                "VALUES ('a1', 'me', 'H100', 'stopped', 1.0, '[]', '[]')")
    old.commit()
    old.close()
    ledger = Ledger(path)
    rec = ledger.get("a1")
    assert rec is not None and rec.environment == [] and rec.error is None
    rec.environment, rec.error = ["tabulate==0.9.0"], "EnvironmentBuildError"
    ledger.save(rec)
    ledger.close()
    again = Ledger(path).get("a1")
    assert again is not None and again.environment == ["tabulate==0.9.0"]
    assert again.error == "EnvironmentBuildError"


@pytest.mark.gpu
def test_ran_on_describes_a_real_gpu_from_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        pytest.skip(f"no NVIDIA driver here ({e}); a real GPU's ran_on needs one")
    name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
    pynvml.nvmlShutdown()
    from cloudgpu.remote_host.host.ran_on import gpus

    monkeypatch.delenv("CLOUDGPU_SIMULATED_GPUS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    found = gpus()
    assert found["count"] == 1 and not found["simulated"]
    assert found["model"] == (name.decode() if isinstance(name, bytes) else name)
    assert found["memory_gb"] > 0 and found["driver"] and found["cuda"]
