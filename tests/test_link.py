"""What the kernel link counts as running when its connection drops.

The link decides from the kernel's own status messages whether a cell goes on without us
(and so is waited for past ``reconnect_timeout``). These tests feed it the status messages
in the orders a real kernel sends them, with no connection open (what is sent is queued),
so the order that matters is exact rather than a race; the reconnecting itself, against a
real host through a proxy, is in faults/test_dropped_connections.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cloudgpu import _wire
from cloudgpu._link import KernelLink
from cloudgpu.host_client import HostClient

pytestmark = pytest.mark.timeout(30)


def status(state: str, parent: str) -> _wire.Message:
    return {"header": {"msg_type": "status", "msg_id": f"status-{parent}"},
            "parent_header": {"msg_id": parent}, "metadata": {},
            "content": {"execution_state": state}, "buffers": [], "msg_type": "status"}


async def watched_link() -> KernelLink:
    async def check() -> str | None:
        return None  # the pool keeps the session

    def ignore(*args: Any) -> None:
        pass

    # Never connected: no request goes to this address.
    host = HostClient("http://127.0.0.1:9", "unused")
    return KernelLink(host, "kernel", "session", on_message=ignore, on_notice=ignore,
                      on_gone=ignore, check=check)


def test_a_cell_sent_just_before_the_last_ones_idle_counts_as_running() -> None:
    """The idle of an earlier request, arriving after a new cell was sent and before that
    cell's busy, does not end the new cell."""
    async def go() -> list[bool]:
        link = await watched_link()
        seen = []
        await link.send(b"earlier", execute="A")
        link._receive("iopub", status("busy", "A"))
        seen.append(link._runs_on_without_us())
        await link.send(b"cell", execute="B")
        link._receive("iopub", status("idle", "A"))
        seen.append(link._runs_on_without_us())  # B has not started: it is on its way
        link._receive("iopub", status("busy", "B"))
        link._receive("iopub", status("idle", "B"))
        seen.append(link._runs_on_without_us())
        return seen

    assert asyncio.run(go()) == [True, True, False]


def test_an_idle_ends_the_requests_sent_before_it_and_other_requests_do_not_count() -> None:
    async def go() -> list[bool]:
        link = await watched_link()
        seen = []
        await link.send(b"one", execute="A")
        await link.send(b"two", execute="B")
        await link.send(b"completion")  # not an execute request: not waited for
        # A's idle never came (an outage outlasted the host's replay buffer):
        link._receive("iopub", status("busy", "B"))
        link._receive("iopub", status("idle", "B"))
        seen.append(link._runs_on_without_us())
        await link.send(b"three", execute="C")
        link._receive("iopub", status("starting", "C"))  # the kernel was restarted
        link._receive("iopub", status("idle", "other"))
        seen.append(link._runs_on_without_us())
        return seen

    assert asyncio.run(go()) == [False, False]
