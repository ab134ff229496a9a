"""The JupyterLab extension's server side: every handler under /cloudgpu/api/, in a real
JupyterLab, on the test session's local pool with its simulated GPUs.

Sessions come from a real ipykernel running ``%%remote`` cells, started with
``JPY_SESSION_NAME`` as Jupyter Server starts a notebook's kernel, so the API can name
their notebook as JupyterLab does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kernel_driver import ok, start_kernel, stop_kernel, vanish
from servers import LabProcess, wait_until

from cloudgpu._localpool import local_pool

ENDPOINTS = [("GET", "status"), ("GET", "hardware"), ("GET", "sessions"), ("GET", "metrics"),
             ("GET", "sessions/0123456789abcdef"), ("DELETE", "sessions/0123456789abcdef")]
API = "/cloudgpu/api/"
#: One CPU-second of work in the remote kernel, however loaded this machine is.
BUSY = ("import time\n"
        "t = time.process_time()\n"
        "while time.process_time() - t < 1.0: pass\n")


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
@pytest.mark.timeout(120)
def test_every_endpoint_refuses_a_request_without_the_token(lab: LabProcess, method: str,
                                                            path: str) -> None:
    response = lab.request(method, API + path, token=None)
    assert response.status_code == 403, response.text
    assert lab.request(method, API + path, token="wrong").status_code == 403


@pytest.mark.timeout(120)
def test_hardware_lists_the_simulated_catalog_with_prices_free_counts_and_queues(
        lab: LabProcess) -> None:
    response = lab.request("GET", API + "hardware")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["pool"] == "local pool" and body["simulated"] is True
    by_type = {h["type"]: h for h in body["hardware"]}
    h100 = by_type["H100"]
    assert (h100["total"], h100["simulated"], h100["queued"]) == (1, True, 0)
    assert h100["free"] in (0, 1) and h100["price_per_hour"] > 0 and h100["memory_gb"] == 80
    assert by_type["cpu"]["available"] is True and by_type["cpu"]["total"] is None
    assert by_type["H200"]["available"] is False  # in the catalog, not on this pool


@pytest.fixture(scope="module")
def two_remote_sessions(lab: LabProcess) -> Iterator[dict[str, Any]]:
    """A notebook kernel with %%remote cells on H100 and A100-80GB (simulated), as Jupyter
    Server starts it for ``two.ipynb``."""
    notebook = lab.root / "two.ipynb"
    km, kc = start_kernel("python3", JPY_SESSION_NAME=str(notebook))
    try:
        ok(kc, "%load_ext cloudgpu")
        ok(kc, f"%%remote gpu=H100 --no-pull\n{BUSY}", timeout=120)
        ok(kc, "%%remote gpu=A100-80GB --no-pull\nz = 1", timeout=120)
        yield {"kernel": kc, "path": "two.ipynb"}
    finally:
        stop_kernel(km, kc)


def _status(lab: LabProcess) -> dict[str, Any]:
    response = lab.request("GET", API + "status")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


@pytest.mark.timeout(240)
def test_status_shows_both_remote_sessions_of_a_notebook_with_cost_and_simulated_readings(
        lab: LabProcess, two_remote_sessions: dict[str, Any]) -> None:
    status = _status(lab)
    mine = {s["gpu_type"]: s for s in status["sessions"] if s["path"] == "two.ipynb"}
    assert set(mine) == {"H100", "A100-80GB"}, status
    h100 = mine["H100"]
    assert h100["display"] == "1x H100 (simulated)" and h100["simulated"] is True
    assert h100["state"] in ("running", "idle") and h100["uptime"] > 0
    assert h100["rate_per_hour"] > 0 and h100["cost"] > 0
    readings = h100["readings"]
    assert readings["simulated"] is True and "/proc" in readings["source"]
    assert readings["gpus"][0]["type"] == "H100" and readings["memory_total_gb"] == 80
    assert readings["rss_gb"] > 0 and readings["cpu_percent"] is not None
    assert status["total_cost"] >= h100["cost"] + mine["A100-80GB"]["cost"]
    assert status["total_rate_per_hour"] >= h100["rate_per_hour"]
    assert status["today"] >= h100["cost"] and status["pool"] == "local pool"
    # Cost is metered live: a later answer has more of it.
    wait_until(lambda: _status(lab)["total_cost"] > status["total_cost"], 30,
               "the total cost rising")


@pytest.mark.timeout(240)
def test_an_idle_session_says_since_when_and_a_busy_one_that_it_runs(
        lab: LabProcess, two_remote_sessions: dict[str, Any]) -> None:
    def h100() -> dict[str, Any]:
        return next(s for s in _status(lab)["sessions"]
                    if s["path"] == "two.ipynb" and s["gpu_type"] == "H100")

    wait_until(lambda: h100()["state"] == "idle", 30, "the H100 session reading idle")
    assert h100()["idle_for"] is not None


@pytest.mark.timeout(240)
def test_a_session_no_notebook_is_connected_to_says_so_and_what_the_pool_does_about_it(
        lab: LabProcess, two_remote_sessions: dict[str, Any], tmp_path: Path) -> None:
    """A client that went away while its cell runs: the panel's status and ``%remote
    status`` say that no notebook is connected, and that the cell keeps the session."""
    url, token = local_pool()
    sid = vanish(url, token, tmp_path, mid_cell=True, hardware="cpu")
    try:
        def away() -> str | None:
            return next((s["away"] for s in _status(lab)["sessions"] if s["id"] == sid), None)

        wait_until(lambda: away() is not None, 30, "the status saying no notebook is connected")
        text = away()
        assert text is not None and text.startswith("no notebook connected for "), text
        assert "; kept while its cell runs, for 24 h more at most" in text, text
        connected = [s for s in _status(lab)["sessions"] if s["path"] == "two.ipynb"]
        assert connected and all(s["away"] is None for s in connected), connected
        out = ok(two_remote_sessions["kernel"], "%remote status").stream()
        assert f"{sid}: no notebook connected for " in out, out
        assert "kept while its cell runs" in out, out
    finally:
        (tmp_path / "release").write_text("1")
        wait_until(lambda: sid not in {s["id"] for s in _status(lab)["sessions"]}, 60,
                   "the pool stopping the away session once its cell ended")


@pytest.mark.timeout(240)
def test_metrics_and_sessions_answer_by_session_id(
        lab: LabProcess, two_remote_sessions: dict[str, Any]) -> None:
    sessions = lab.request("GET", API + "sessions").json()["sessions"]
    ids = {s["id"] for s in sessions if s["path"] == "two.ipynb"}
    assert len(ids) == 2
    metrics = lab.request("GET", API + "metrics").json()["metrics"]
    assert ids <= set(metrics)
    for session_id in ids:
        assert metrics[session_id]["simulated"] is True
        assert metrics[session_id]["execution_state"] in ("idle", "busy")


@pytest.mark.timeout(240)
def test_delete_stops_a_session_and_an_unknown_one_is_404(
        lab: LabProcess, two_remote_sessions: dict[str, Any]) -> None:
    before = _status(lab)
    a100 = next(s for s in before["sessions"]
                if s["path"] == "two.ipynb" and s["gpu_type"] == "A100-80GB")
    response = lab.request("DELETE", API + f"sessions/{a100['id']}")
    assert response.status_code == 200, response.text
    assert response.json()["session"]["id"] == a100["id"]
    after = _status(lab)
    assert a100["id"] not in [s["id"] for s in after["sessions"]]
    assert after["ended"] == []  # asked without ended_since: the first poll of a lab
    # Asked since the last answer, the status lists what ended meanwhile, and why.
    since = lab.request("GET", API + f"status?ended_since={before['now']}")
    assert since.status_code == 200, since.text
    [told] = [e for e in since.json()["ended"] if e["id"] == a100["id"]]
    assert told["stop_reason"] == "stopped by its owner", told
    assert (told["display"], told["path"]) == (a100["display"], "two.ipynb"), told
    bad = lab.request("GET", API + "status?ended_since=soon")
    assert bad.status_code == 400 and "ended_since" in bad.json()["message"], bad.text
    # Asked after its end, it says why it ended (the panel tells what the pool stopped).
    ended = lab.request("GET", API + f"sessions/{a100['id']}")
    assert ended.status_code == 200, ended.text
    assert ended.json()["session"]["stop_reason"] == "stopped by its owner", ended.text
    assert "token" not in ended.json()["session"]
    missing = lab.request("DELETE", API + "sessions/0123456789abcdef")
    assert missing.status_code == 404
    assert lab.request("GET", API + "sessions/0123456789abcdef").status_code == 404
    assert missing.json()["error"] == "SessionNotFoundError" and missing.json()["message"]
    # The notebook's next A100 cell says why its session ended and gets a new one.
    again = ok(two_remote_sessions["kernel"], "%%remote gpu=A100-80GB --no-pull\nz = 2",
               timeout=120)
    assert any("stopped by its owner" in line for line in again.status_lines()), \
        again.describe()
