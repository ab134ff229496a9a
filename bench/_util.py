"""What every benchmark shares: real processes to measure, timing, and the result table.

Every server listens on 127.0.0.1 (or inside the namespace of ``_wan``); every process
started here is stopped on exit. Figures are medians unless a table says otherwise.
"""

from __future__ import annotations

import contextlib
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel

from cloudgpu._process import spawn, stop

QUICK = "--quick" in sys.argv


def machine() -> str:
    """One line describing where the figures were taken."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


@dataclass
class Table:
    """Rows of (what, ours, baseline, ratio, note), printed as Markdown."""

    title: str
    columns: Sequence[str] = ("measure", "cloudgpu", "baseline", "ratio", "note")
    rows: list[list[str]] = field(default_factory=list)

    def add(self, measure: str, ours: float | str, baseline: float | str | None,
            unit: str = "ms", note: str = "", higher_is_better: bool = False) -> None:
        """Add a row; the ratio is always ours/baseline, marked (↑) where higher is better."""
        def fmt(v: float | str | None) -> str:
            if v is None:
                return "-"
            return v if isinstance(v, str) else f"{v:,.3g} {unit}".strip()
        ratio = "-"
        if isinstance(ours, (int, float)) and isinstance(baseline, (int, float)) and baseline:
            r = ours / baseline
            ratio = f"{r:.2f}x" + (" (↑)" if higher_is_better else "")
        self.rows.append([measure, fmt(ours), fmt(baseline), ratio, note])

    def render(self) -> str:
        """The table as Markdown."""
        rows = [list(self.columns), ["---"] * len(self.columns), *self.rows]
        return f"### {self.title}\n\n" + "\n".join("| " + " | ".join(r) + " |" for r in rows)

    def show(self) -> None:
        """Print the table and append it to bench/last-run.md."""
        text = self.render()
        print("\n" + text + "\n", flush=True)
        with open(Path(__file__).with_name("last-run.md"), "a") as f:
            f.write(text + "\n\n")


def median_ms(samples: Sequence[float]) -> float:
    """Median of seconds, in milliseconds."""
    return statistics.median(samples) * 1000


def p99_ms(samples: Sequence[float]) -> float:
    """99th percentile of seconds, in milliseconds."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000


@contextlib.contextmanager
def host(simulate: str = "", prefix: Sequence[str] = (), ip: str = "127.0.0.1",
         isolation: str = "none") -> Iterator[tuple[str, str, int]]:
    """A `cloudgpu host` (optionally inside a namespace via ``prefix``), its kernels
    sandboxed as ``isolation`` says: (url, token, pid)."""
    workdir = tempfile.TemporaryDirectory(prefix="cgb-")
    tmp = Path(workdir.name)
    token, info, log = secrets.token_hex(24), tmp / "host.json", tmp / "host.log"
    cmd = [*prefix, sys.executable, "-m", "cloudgpu", "host", f"--ip={ip}", "--port=0",
           f"--info-file={info}", f"--isolation={isolation}"]
    if simulate:
        cmd.append(f"--simulate={simulate}")
    try:
        proc, found = spawn(cmd, env=dict(os.environ, CLOUDGPU_HOST_TOKEN=token),
                            info_path=info, log_path=log, what="The benchmark's host", timeout=90)
        try:
            yield str(found["url"]).rstrip("/"), token, proc.pid
        finally:
            stop(proc, grace=20)
    finally:
        workdir.cleanup()


@contextlib.contextmanager
def pool(hosts: Sequence[tuple[str, str]], config: str = "") -> Iterator[tuple[str, str]]:
    """A static-backend `cloudgpu pool` over ``hosts`` [(url, token)]: (url, token).

    One user, the benchmark: hosts without isolation are accepted."""
    workdir = tempfile.TemporaryDirectory(prefix="cgb-")
    tmp = Path(workdir.name)
    token, info, log = secrets.token_hex(24), tmp / "pool.json", tmp / "pool.log"
    (tmp / "config.py").write_text(config)
    urls = ",".join(f"{u}?token={t}" for u, t in hosts)
    cmd = [sys.executable, "-m", "cloudgpu", "pool", "--backend=static", f"--hosts={urls}",
           "--port=0", f"--db={tmp / 'ledger.sqlite'}", f"--config={tmp / 'config.py'}",
           f"--info-file={info}", "--allow-unisolated"]
    try:
        proc, found = spawn(cmd, env=dict(os.environ, CLOUDGPU_POOL_TOKEN=token),
                            info_path=info, log_path=log, what="The benchmark's pool", timeout=90)
        try:
            yield str(found["url"]), token
        finally:
            stop(proc, grace=30)
    finally:
        workdir.cleanup()


class Kernel:
    """A real local ipykernel driven through jupyter_client, as a notebook frontend would."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.km: KernelManager
        self.kc: BlockingKernelClient
        self.km, self.kc = start_new_kernel(kernel_name="python3",
                                            env=dict(os.environ, **(env or {})),
                                            startup_timeout=90)

    def run(self, code: str, timeout: float = 600,
            on_output: Callable[[dict[str, Any], float], None] | None = None) -> float:
        """Execute ``code``; seconds from request to idle. Raises if the cell failed."""
        start = time.perf_counter()
        msg_id = self.kc.execute(code)
        while True:
            msg = self.kc.get_iopub_msg(timeout=timeout)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if on_output is not None and msg["msg_type"] in ("stream", "display_data"):
                on_output(msg, time.perf_counter())
            if msg["msg_type"] == "error":
                raise RuntimeError("\n".join(msg["content"]["traceback"])[-3000:])
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                elapsed = time.perf_counter() - start
                break
        while self.kc.get_shell_msg(timeout=timeout)["parent_header"].get("msg_id") != msg_id:
            pass
        return elapsed

    def value(self, expr: str) -> Any:
        """Evaluate ``expr`` in the kernel (its repr must be a Python literal)."""
        import ast

        msg_id = self.kc.execute("", silent=True, user_expressions={"v": f"repr({expr})"})
        while True:
            reply = self.kc.get_shell_msg(timeout=60)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        data = reply["content"]["user_expressions"]["v"]
        if data["status"] != "ok":
            raise RuntimeError(str(data))
        return ast.literal_eval(ast.literal_eval(data["data"]["text/plain"]))

    def pid(self) -> int:
        """The kernel's process id."""
        return int(self.value("__import__('os').getpid()"))

    def close(self) -> None:
        """Shut the kernel down."""
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reset_peak_rss(pid: int) -> None:
    """Make /proc's high-water mark start again from the current RSS."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def rss(pid: int) -> int:
    """The process's resident memory now (VmRSS) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def repeat(fn: Callable[[], float], n: int, warmup: int = 2) -> list[float]:
    """Call ``fn`` ``warmup + n`` times; the last ``n`` results."""
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(n)]


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out
