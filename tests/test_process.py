"""Starting and stopping server processes (cloudgpu._process), with small real child processes."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cloudgpu._process import (
    read_json,
    running,
    spawn,
    stop,
    wait_for_info,
    write_private_json,
)
from cloudgpu.errors import HostStartError

pytestmark = pytest.mark.timeout(60)

#: A child that says it is ready the way our servers do, then waits to be stopped.
SERVER = """\
import json, os, signal, sys, time
if sys.argv[2] == "ignore-sigterm":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("listening", flush=True)
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump({"pid": os.getpid()}, f)
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(120)
"""


def _server(tmp_path: Path, how: str = "plain") -> subprocess.Popen[bytes]:
    proc, info = spawn([sys.executable, "-c", SERVER, str(tmp_path / "info.json"), how],
                       info_path=tmp_path / "info.json", log_path=tmp_path / "log",
                       what="The test server")
    assert info == {"pid": proc.pid}
    assert (tmp_path / "log").read_text() == "listening\n"
    return proc


def test_spawn_returns_once_the_info_file_is_written_and_ignores_a_stale_one(
        tmp_path: Path) -> None:
    (tmp_path / "info.json").write_text('{"pid": 1}')  # left by an earlier run
    proc = _server(tmp_path)
    assert stop(proc) and proc.returncode == -signal.SIGTERM


def test_a_server_that_exits_while_starting_is_an_error_quoting_its_log(tmp_path: Path) -> None:
    code = "import sys\nfor i in range(30): print('line', i)\nsys.exit(3)"
    with pytest.raises(HostStartError) as info:
        spawn([sys.executable, "-c", code], info_path=tmp_path / "info.json",
              log_path=tmp_path / "log", what="The test server")
    message = str(info.value)
    assert message.startswith("The test server exited with code 3 while starting.")
    assert f"Its log ({tmp_path / 'log'}) ends with:\nline 10\n" in message
    assert message.endswith("line 29") and "line 9\n" not in message


def test_a_server_that_never_gets_ready_is_stopped_and_the_error_says_so(tmp_path: Path) -> None:
    with (tmp_path / "log").open("wb") as log:
        stuck = "print('stuck', flush=True)\nimport time; time.sleep(120)"
        proc = subprocess.Popen([sys.executable, "-c", stuck], stdout=log)
    with pytest.raises(HostStartError, match="did not start within 1 s") as info:
        wait_for_info(proc, tmp_path / "info.json", log_path=tmp_path / "log",
                      what="The test server", timeout=1)
    assert proc.returncode == -signal.SIGTERM  # stopped, not left behind
    assert "ends with:\n" in str(info.value)


def test_stop_kills_what_ignores_sigterm_after_the_grace_time(tmp_path: Path) -> None:
    proc = _server(tmp_path, "ignore-sigterm")
    assert stop(proc, grace=0.5) and proc.returncode == -signal.SIGKILL


def test_stop_without_kill_leaves_it_and_says_so(tmp_path: Path) -> None:
    proc = _server(tmp_path, "ignore-sigterm")
    try:
        assert stop(proc.pid, grace=0.5, kill=False) is False
        assert running(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_stop_by_pid_waits_until_it_is_gone(tmp_path: Path) -> None:
    proc = _server(tmp_path)
    assert running(proc.pid)
    assert stop(proc.pid)
    assert not running(proc.pid)  # exited; not reaped yet, and that counts as gone
    assert proc.wait() == -signal.SIGTERM
    assert stop(proc.pid)  # already gone: nothing to do


def test_private_json_is_mode_0600_and_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "info.json"
    (tmp_path / "info.json.tmp").write_text("left over")
    os.chmod(tmp_path / "info.json.tmp", 0o644)
    write_private_json(path, {"token": "t1"})
    write_private_json(path, {"token": "t2"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_json(path) == {"token": "t2"}
    assert not (tmp_path / "info.json.tmp").exists()
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        read_json(path)
