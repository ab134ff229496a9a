"""Isolation: what running every remote kernel in a bubblewrap sandbox costs.

Two hosts in the same run, each behind a static pool of its own with no warm kernels:
one with `--isolation=none` (the baseline, what the per-user local pool runs) and one with
`--isolation=bubblewrap` (its own namespaces, the Python environment read-only, limits set
before the kernel runs). Measured on each:

- kernel start: `POST /api/cloudgpu/kernels` until the kernel's agent answers over the
  websocket (the host's side of a cold start: sandbox set-up, uid map, cgroups, ipykernel);
- cold first output: a fresh notebook kernel's first `%%remote gpu=cpu` / `print('hi')`
  to the arrival of `hi` (pool, remote kernel, websocket, cell: what start.py calls cold);
- empty cell: an empty `%%remote` cell on a warm session (median; the sandbox is not on
  this path, so the two should match).
"""

from __future__ import annotations

import asyncio
import time

from _util import QUICK, Kernel, Table, host, machine, median_ms, pool, repeat
from start import CELL, COLD, clear_sessions, first_output

from cloudgpu.host_client import HostClient
from cloudgpu.provider import Grant
from cloudgpu.session import RemoteSession

STARTS = 3 if QUICK else 10
COLD_RUNS = 2 if QUICK else 5
N = 30 if QUICK else 200


def kernel_starts(url: str, token: str, n: int) -> list[float]:
    """Seconds from asking the host for a kernel to its agent's first answer, ``n`` times."""
    async def once() -> float:
        async with HostClient(url, token) as client:
            started = time.perf_counter()
            model = await client.start_kernel("cpu")
            session = await RemoteSession.open(Grant(url, token, model["id"], "cpu"))
            took = time.perf_counter() - started
            await session.close(shutdown=True)
            return took
    return [asyncio.run(once()) for _ in range(n)]


def cold_first_outputs(pool_url: str, pool_token: str, n: int) -> list[float]:
    """First-output seconds of ``n`` fresh notebook kernels' first cell, each a new session."""
    samples = []
    for _ in range(n):
        kernel = Kernel({"CLOUDGPU_POOL": pool_url, "CLOUDGPU_TOKEN": pool_token})
        try:
            kernel.run("%load_ext cloudgpu")
            samples.append(first_output(kernel, CELL))
        finally:
            kernel.close()
            clear_sessions(pool_url, pool_token)
    return samples


def empty_cells(pool_url: str, pool_token: str, n: int) -> float:
    """Median empty `%%remote` cell on a warm session, ms."""
    with Kernel({"CLOUDGPU_POOL": pool_url, "CLOUDGPU_TOKEN": pool_token}) as kernel:
        kernel.run("%load_ext cloudgpu")
        kernel.run("%%remote gpu=cpu\npass")
        return median_ms(repeat(lambda: kernel.run("%%remote gpu=cpu\npass"), n))


def measure(isolation: str) -> dict[str, float]:
    with host(isolation=isolation) as (url, token, _), \
            pool([(url, token)], COLD) as (pool_url, pool_token):
        return {"start": median_ms(kernel_starts(url, token, STARTS)),
                "cold": median_ms(cold_first_outputs(pool_url, pool_token, COLD_RUNS)),
                "cell": empty_cells(pool_url, pool_token, N)}


def main() -> None:
    print(f"isolation on {machine()}{' (quick)' if QUICK else ''}", flush=True)
    plain, sandboxed = measure("none"), measure("bubblewrap")
    table = Table("Isolation: bubblewrap sandboxes against unisolated kernels",
                  columns=("measure", "bubblewrap", "none (baseline)", "ratio", "note"))
    table.add("kernel start (host side)", sandboxed["start"], plain["start"],
              note=f"median of {STARTS}: POST /api/cloudgpu/kernels to the agent's answer")
    table.add("cold first output", sandboxed["cold"], plain["cold"],
              note=f"median of {COLD_RUNS}: a fresh notebook's first `%%remote` cell")
    table.add("empty cell, warm session", sandboxed["cell"], plain["cell"],
              note=f"median of {N}; the sandbox is not on a cell's path")
    table.show()


if __name__ == "__main__":
    main()
