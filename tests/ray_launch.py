"""Drives the Ray backend's ``launch`` directly, as the pool does, for tests/test_ray.py.

In a process of its own: a Ray driver leaves sockets and an event loop open when it
disconnects, which the test session's warnings-as-errors would blame on whatever test
runs next. Prints one JSON object: what a kernel started with ``environment`` printed,
what the backend reported lost, and the error a bad environment gave.

Usage: ``python ray_launch.py RAY_ADDRESS GOOD_REQUIREMENT BAD_REQUIREMENT``
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from typing import Any

from cloudgpu.remote_host.pool.backends import RayBackend

from cloudgpu.errors import HostStartError
from cloudgpu.hardware import Catalog, Choice
from cloudgpu.provider import Grant
from cloudgpu.session import RemoteSession

CODE = ("import inflection, os\nprint(inflection.camelize('cloud_gpu'))\n"
        "print(inflection.__file__)\nprint(os.environ['CUDA_VISIBLE_DEVICES'])")


class Events:
    """What the backend tells its pool, recorded."""

    def __init__(self) -> None:
        self.lost: list[str] = []

    def slots_changed(self, slots: list[Any]) -> None:
        """Not needed here."""

    def placement_lost(self, placement: Any, reason: str) -> None:
        self.lost.append(reason)


async def main(address: str, good: str, bad: str) -> dict[str, Any]:
    backend = RayBackend(address=address, simulated=True, namespace="cloudgpu-launch-test")
    events = Events()
    backend.connect(Catalog.default(), events)
    slots = await backend.start()
    report: dict[str, Any] = {}
    try:
        a100 = next(s.id for s in slots if s.total.get("A100-80GB"))
        scoped = secrets.token_urlsafe(32)
        placement = await backend.launch(a100, Choice("A100-80GB"), scoped, environment=[good])
        report["slot"], report["placed_on"] = a100, placement.slot_id
        session = await RemoteSession.open(
            Grant(placement.host_url, scoped, placement.kernel_id, "A100-80GB:1"))
        out: list[str] = []
        try:
            result = await session.run_cell(
                CODE, {}, [], lambda kind, msg: out.append(msg["content"].get("text", "")))
        finally:
            await session.close()
        report["status"], report["output"] = result.status, "".join(out).split()
        await backend.stop(placement)
        try:
            await backend.launch(a100, Choice("A100-80GB"), scoped, environment=[bad])
            report["bad_error"] = None
        except HostStartError as e:
            report["bad_error"] = str(e)
        report["lost"] = events.lost
    finally:
        await backend.close()
    return report


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:4]))))
