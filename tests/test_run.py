"""``cloudgpu run`` and ``cloudgpu inspect`` as users run them, on the embedded default.

Each test runs the real command in a subprocess on this test session's local pool (a real
pool, host and kernels; the GPUs are simulated: ``CLOUDGPU_SIMULATE`` in conftest.py, hence
"simulated" in the names). Environments are made by the host with uv from PyPI: a small
pure-Python package, ``tabulate``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import nbformat
import pytest

from cloudgpu._localpool import local_pool
from cloudgpu.environment import environment_key

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.ipynb"))
TABULATE = "tabulate==0.9.0"

pytestmark = pytest.mark.timeout(240)


def cloudgpu(*args: str, timeout: float = 200) -> subprocess.CompletedProcess[str]:
    """Run ``cloudgpu ARGS`` as a user would, in this test session's private Jupyter folders."""
    return subprocess.run([sys.executable, "-m", "cloudgpu", *args], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ))


def notebook(path: Path, cells: list[str], **cloudgpu_metadata: Any) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    if cloudgpu_metadata:
        nb.metadata["cloudgpu"] = {"schema": 1, **cloudgpu_metadata}
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    nbformat.write(nb, path)
    return path


def outputs(nb: Any, kinds: tuple[str, ...] = ("stdout", "execute_result")) -> list[str]:
    """What the cells printed and returned: the results, without cloudgpu's status lines."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out["output_type"] == "stream" and out["name"] in kinds:
                found.append(out["text"])
            elif out["output_type"] in kinds:
                found.append(out["data"]["text/plain"])
    return found


def stderr_of(nb: Any) -> str:
    return "".join(o["text"] for c in nb.cells for o in c.get("outputs", [])
                   if o["output_type"] == "stream" and o["name"] == "stderr")


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_runs_under_cloudgpu_run_on_the_simulated_embedded_default(
        example: Path, tmp_path: Path) -> None:
    out = tmp_path / example.name
    done = cloudgpu("run", str(example), "-o", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{example} ran to the end" in done.stderr
    nb = nbformat.read(out, as_version=4)
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    ran_on = nb.metadata["cloudgpu"]["ran_on"]
    runs = list(ran_on.get("remote_cells", {}).values()) or [ran_on]
    assert all(r["python"] and "packages" in r and r["at"] for r in runs), ran_on
    assert example.read_text() != out.read_text(), "the example itself was left as it was"


def test_round_trip_run_records_ran_on_inspect_agrees_and_a_second_run_matches_simulated(
        tmp_path: Path) -> None:
    path = notebook(tmp_path / "round.ipynb", [
        "import os, numpy as np\nprint('gpus:', os.environ['CUDA_VISIBLE_DEVICES'])",
        "a = np.arange(10)\nint(a.sum())",
        "print(np.__name__, a.dtype)",
    ], hardware="H100")
    first = cloudgpu("run", str(path))  # in place, as by default
    assert first.returncode == 0, first.stdout + first.stderr
    assert "cell 3/3" in first.stderr  # the progress over cells, as plain lines (no TTY)
    nb = nbformat.read(path, as_version=4)
    record = nb.metadata["cloudgpu"]
    assert record["hardware"] == "H100"
    ran_on = record["ran_on"]
    assert ran_on["hardware"] == "H100:1"
    assert ran_on["gpus"] == {"type": "H100", "model": "simulated H100", "count": 1,
                              "memory_gb": 80.0, "driver": "simulated", "cuda": "simulated",
                              "simulated": True}
    assert ran_on["python"] == ".".join(map(str, sys.version_info[:3]))
    assert set(ran_on["packages"]) == {"numpy"}  # what the notebook imported, no more
    assert outputs(nb) == ["gpus: 0\n", "45", "numpy int64\n"]

    inspected = cloudgpu("inspect", str(path))
    assert inspected.returncode == 0, inspected.stderr
    report = inspected.stdout
    assert "hardware:    H100 (from metadata.cloudgpu.hardware)" in report
    assert "available:   yes, as H100: 1 of 1 H100 (simulated) free now (local pool)" in report
    assert "price:       $3.95/hour" in report
    assert "1x simulated H100 (80 GB each), driver simulated, CUDA simulated" in report
    assert f"packages:  numpy {ran_on['packages']['numpy']}" in report
    assert "differences: none" in report

    second = cloudgpu("run", str(path), "-o", str(tmp_path / "again.ipynb"))
    assert second.returncode == 0, second.stdout + second.stderr
    again = nbformat.read(tmp_path / "again.ipynb", as_version=4)
    assert outputs(again) == outputs(nb)
    rerun = again.metadata["cloudgpu"]["ran_on"]
    assert {k: v for k, v in rerun.items() if k != "at"} == \
        {k: v for k, v in ran_on.items() if k != "at"}


def test_hardware_the_pool_lacks_fails_clearly_before_anything_runs_simulated(
        tmp_path: Path) -> None:
    path = notebook(tmp_path / "big.ipynb", ["print('this must not run')"], hardware="H100:4")
    before = path.read_text()
    done = cloudgpu("run", str(path))
    assert done.returncode == 1
    assert ("Cannot run on 4x H100: the pool has no 4x H100; it has CPU, 1x A100-80GB "
            "(simulated), 1x H100 (simulated) (local pool)") in done.stderr, done.stderr
    assert "Nothing ran" in done.stderr and "Traceback" not in done.stderr
    assert path.read_text() == before
    inspected = cloudgpu("inspect", str(path))
    assert "available:   NO: the pool has no 4x H100" in inspected.stdout, inspected.stdout

    unknown = cloudgpu("run", str(path), "--hardware", "H1000")
    assert unknown.returncode == 2
    assert "Unknown GPU `H1000`" in unknown.stderr and "Known:" in unknown.stderr


def test_a_failing_cell_exits_non_zero_showing_it_with_the_outputs_written(
        tmp_path: Path) -> None:
    path = notebook(tmp_path / "fails.ipynb",
                    # Two stream messages (the flush), saved as one run of text.
                    ["import sys; sys.stdout.write('be'); sys.stdout.flush(); print('fore')",
                     "1 / 0", "print('after')"], hardware="cpu")
    done = cloudgpu("run", str(path))
    assert done.returncode == 1
    assert "cell 2 of" in done.stderr and "1 / 0" in done.stderr, done.stderr
    assert "ZeroDivisionError" in done.stderr
    nb = nbformat.read(path, as_version=4)
    assert outputs(nb) == ["before\n"]
    assert nb.metadata["cloudgpu"]["ran_on"]["gpus"]["count"] == 0  # it ran, on CPU


def _environments() -> Path:
    return Path(os.environ["JUPYTER_DATA_DIR"]) / "cloudgpu" / "environments"


def test_an_environment_is_prepared_cached_and_used_by_the_cloud_gpu_kernel(
        tmp_path: Path) -> None:
    cells = ["import tabulate, sys\nprint(tabulate.__version__)",
             "print(tabulate.tabulate([[1, 2]], headers=['a', 'b']))",
             "print(tabulate.__file__.startswith(sys.prefix), sys.prefix != sys.base_prefix)"]
    path = notebook(tmp_path / "env.ipynb", cells, hardware="cpu", environment=[TABULATE])
    first = cloudgpu("run", str(path), "--stream")
    assert first.returncode == 0, first.stdout + first.stderr
    nb = nbformat.read(path, as_version=4)
    assert outputs(nb) == ["0.9.0\n", "  a    b\n---  ---\n  1    2\n", "True True\n"]
    shown = stderr_of(nb)  # the host's progress, under the first cell
    assert f"cloudgpu: starting on CPU: environment: installing {TABULATE} ..." in shown, shown
    assert "environment: + tabulate==0.9.0" in shown
    assert "environment: environment ready in" in shown
    folder = _environments() / environment_key([TABULATE])
    log, marker = folder / "install.log", folder / "cloudgpu-environment.json"
    assert "+ tabulate==0.9.0" in log.read_text()
    assert json.loads(marker.read_text())["requirements"] == [TABULATE]
    made = (log.stat().st_mtime_ns, marker.stat().st_mtime_ns)
    ran_on = nb.metadata["cloudgpu"]["ran_on"]
    assert ran_on["packages"]["tabulate"] == "0.9.0"
    assert ran_on["environment"] == [TABULATE]

    second = cloudgpu("run", str(path), "-o", str(tmp_path / "again.ipynb"))
    assert second.returncode == 0, second.stdout + second.stderr
    again = nbformat.read(tmp_path / "again.ipynb", as_version=4)
    assert outputs(again) == outputs(nb)
    assert "environment: cached, nothing to install" in stderr_of(again)
    assert "installing" not in stderr_of(again)
    assert (log.stat().st_mtime_ns, marker.stat().st_mtime_ns) == made, "installed again"
    assert "differences: none" in cloudgpu("inspect", str(tmp_path / "again.ipynb")).stdout


def test_a_broken_requirement_fails_clearly_with_the_installers_message(tmp_path: Path) -> None:
    broken = "tabulate==0.0.0.999"
    path = notebook(tmp_path / "broken.ipynb", ["import tabulate"], hardware="cpu",
                    environment=[broken])
    done = cloudgpu("run", str(path))
    assert done.returncode == 1
    assert "EnvironmentBuildError" in done.stderr
    assert f"The remote environment [{broken}] could not be prepared; uv pip said:" \
        in done.stderr
    assert f"there is no version of {broken}" in done.stderr  # uv's own words
    assert not (_environments() / environment_key([broken])).exists(), "a half-made folder"


def test_remote_cells_take_an_environment_and_name_a_value_moving_across_versions(
        tmp_path: Path) -> None:
    """``%%remote --env``: its own session, and a pulled value whose package differs here."""
    import packaging

    old = "packaging==24.0"
    path = notebook(tmp_path / "cells.ipynb", [
        "%load_ext cloudgpu",
        f"%%remote gpu=cpu --env {old}\nimport os, packaging, packaging.version\n"
        f"v = packaging.version.Version('1.0')\nthere, pid = packaging.__version__, os.getpid()",
        "%%remote gpu=cpu\nimport os, packaging\nplain, pid2 = packaging.__version__, os.getpid()",
        "print(there, plain, pid != pid2)",
    ])
    done = cloudgpu("run", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    nb = nbformat.read(path, as_version=4)
    assert outputs(nb, ("stdout",)) == [f"24.0 {packaging.__version__} True\n"]
    warned = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    assert f"`v` is a packaging object: packaging is {packaging.__version__} here but 24.0 " \
           f"on the remote kernel" in warned, nb.cells[1].outputs
    remote_cells = nb.metadata["cloudgpu"]["ran_on"]["remote_cells"]
    assert remote_cells["cpu"]["environment"] == []  # the last session on cpu had none


def test_the_pool_refuses_an_environment_that_is_not_requirements() -> None:
    url, token = local_pool()
    headers = {"Authorization": f"token {token}"}
    for environment, says in (("tabulate", "must be a list of pip requirement strings"),
                              (["tabulate", "not a requirement!"], "is not a pip requirement")):
        response = httpx.post(f"{url}/api/sessions", headers=headers, timeout=30,
                              json={"hardware": "cpu", "environment": environment})
        assert response.status_code == 400, response.text
        assert response.json()["error"] == "InvalidRequestError"
        assert says in response.json()["message"]


def test_run_and_inspect_explain_themselves() -> None:
    for command in ("run", "inspect"):
        helped = cloudgpu(command, "--help")
        assert helped.returncode == 0
        assert f"usage: cloudgpu {command}" in helped.stdout
    assert "--hardware SPEC" in cloudgpu("run", "--help").stdout
    missing = cloudgpu("inspect", "no-such.ipynb")
    assert missing.returncode == 2 and "no notebook at no-such.ipynb" in missing.stderr
