"""Live readings per kernel: ``GET /api/cloudgpu/metrics`` on a host, ``GET /api/metrics`` on a
pool. Simulated GPUs have nothing to read: their readings are the kernel process's own CPU
use and memory from /proc, and say so. Real GPUs are read through NVML (marked ``gpu``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from servers import HostFactory, HostProcess

from cloudgpu.host_client import HostClient
from cloudgpu.provider import Grant
from cloudgpu.session import RemoteSession

T = TypeVar("T")
#: One CPU-second of work in the kernel, however loaded this machine is.
BUSY = ("import time\n"
        "t = time.process_time()\n"
        "while time.process_time() - t < 1.0: pass\n")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_metrics_need_the_host_token(host: HostProcess) -> None:
    assert host.get_as(None, "/api/cloudgpu/metrics").status_code == 403
    assert host.get_as("wrong", "/api/cloudgpu/metrics").status_code == 403


async def _readings(client: HostClient, kernel_id: str) -> dict[str, Any]:
    body = await client.request("GET", f"/api/cloudgpu/metrics?kernel={kernel_id}")
    return body["kernels"][kernel_id]  # type: ignore[no-any-return]


@pytest.mark.timeout(120)
def test_simulated_readings_are_the_kernel_process_and_say_so(host: HostProcess) -> None:
    async def go() -> None:
        async with HostClient(host.url, host.token) as client:
            model = await client.start_kernel("H100")
            kernel_id = model["id"]
            try:
                before = await _readings(client, kernel_id)
                assert before["simulated"] is True and "/proc" in before["source"]
                # A booting kernel can read just over 100% of a core (its threads): the
                # simulated utilization is capped there, as a GPU's is.
                assert before["gpus"] == [{"index": 0, "type": "H100", "memory_total_gb": 80.0,
                                           "utilization": min(before["cpu_percent"], 100),
                                           "memory_used_gb": before["rss_gb"]}]
                assert before["rss_gb"] > 0 and before["memory_total_gb"] == 80
                assert before["execution_state"] in ("idle", "starting", "busy")
                grant = Grant(host.url, host.token, kernel_id, "H100", model["cloudgpu"]["gpus"],
                              True)
                session = await RemoteSession.open(grant)
                result = await session.run_cell(BUSY, {}, [], lambda kind, msg: None)
                assert result.status == "ok"
                after = await _readings(client, kernel_id)
                # A CPU-second since the last reading: well above an idle kernel's share.
                assert after["cpu_percent"] > 10, after
                assert after["utilization"] == min(after["cpu_percent"], 100)
                await session.close()
                everything = await client.request("GET", "/api/cloudgpu/metrics")
                assert kernel_id in everything["kernels"]
                gone = await client.request("GET", "/api/cloudgpu/metrics?kernel=no-such")
                assert gone == {"kernels": {}}
            finally:
                await client.shutdown(kernel_id)

    run(go())


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_real_gpu_readings_come_from_nvml(host_factory: HostFactory) -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except pynvml.NVMLError as e:
        pytest.skip(f"no NVIDIA driver here ({e}); real-GPU readings need one")
    real = host_factory.start(None, name="nvml")

    async def go() -> None:
        async with HostClient(real.url, real.token) as client:
            model = await client.start_kernel("any")
            try:
                readings = await _readings(client, model["id"])
            finally:
                await client.shutdown(model["id"])
        assert readings["simulated"] is False and readings["source"] == "NVML"
        assert readings["gpus"] and readings["memory_total_gb"] > 0
        gpu = readings["gpus"][0]
        assert 0 <= gpu["utilization"] <= 100 and 0 <= gpu["memory_used_gb"] <= gpu[
            "memory_total_gb"]

    run(go())
