"""The scheduler's decisions, in process: no I/O, so these run in milliseconds."""

from __future__ import annotations

import pytest
from cloudgpu.remote_host.pool.scheduler import Scheduler, Slot

from cloudgpu.errors import HardwareUnavailableError
from cloudgpu.hardware import Catalog, parse_spec


def scheduler(*slots: Slot) -> Scheduler:
    s = Scheduler(Catalog.default())
    for slot in slots:
        s.add_slot(slot)
    return s


def grant(s: Scheduler, request_id: str, spec: str) -> tuple[str, str, int] | None:
    s.enqueue(request_id, parse_spec(spec))
    for d in s.schedule():
        if d.request_id == request_id:
            return d.slot_id, d.choice.type, d.choice.count
    return None


def test_cpu_sessions_spread_over_hosts() -> None:
    s = scheduler(Slot("a", {}), Slot("b", {}), Slot("c", {"H100": 1}))
    placed = [grant(s, f"r{i}", "cpu") for i in range(6)]
    assert sorted(p[0] for p in placed if p) == ["a", "a", "b", "b", "c", "c"]


def test_best_fit_keeps_the_big_hole_open() -> None:
    s = scheduler(Slot("big", {"H100": 4}), Slot("small", {"H100": 1}))
    assert grant(s, "one", "H100") == ("small", "H100", 1)
    assert grant(s, "four", "H100:4") == ("big", "H100", 4)


def test_no_overtaking_within_a_type_but_fallbacks_and_other_types_pass() -> None:
    s = scheduler(Slot("a", {"H100": 2, "A100-80GB": 1}))
    assert grant(s, "first", "H100") is not None
    assert grant(s, "needs-two", "H100:2") is None  # waits for both
    assert grant(s, "needs-one", "H100") is None  # fits, but must not overtake
    assert s.position("needs-one") == (1, ["H100"])
    assert grant(s, "fallback", "H100|A100-80GB") == ("a", "A100-80GB", 1)
    s.release("a", "H100", 1)
    decisions = s.schedule()
    assert [d.request_id for d in decisions] == ["needs-two"]


def test_any_takes_the_cheapest_free_gpu() -> None:
    s = scheduler(Slot("a", {"H100": 1, "T4": 1, "L4": 1}))
    assert grant(s, "x", "any") == ("a", "T4", 1)
    assert grant(s, "y", "any") == ("a", "L4", 1)
    assert grant(s, "z", "any") == ("a", "H100", 1)


def test_a_spec_no_host_can_ever_fit_is_refused_at_once() -> None:
    s = scheduler(Slot("a", {"H100": 2}), Slot("b", {"H100": 2}))
    with pytest.raises(HardwareUnavailableError, match=r"H100:3.*H100 x4 .at most 2 per host"):
        s.check_feasible(parse_spec("H100:3"))
    s.check_feasible(parse_spec("H100:3|H100:2"))  # a fallback that fits is enough


def test_hosts_that_join_leave_or_change_are_placed_by_what_they_have_now() -> None:
    s = scheduler(Slot("a", {"H100": 1}))
    with pytest.raises(HardwareUnavailableError):
        s.check_feasible(parse_spec("A100-80GB"))
    s.add_slot(Slot("b", {"A100-80GB": 2}))
    assert grant(s, "first", "A100-80GB") == ("b", "A100-80GB", 1)
    assert grant(s, "any", "any") == ("b", "A100-80GB", 1)  # cheaper than the H100
    gone = s.update_slots([Slot("a", {"H100": 1}), Slot("c", {"A100-80GB": 1})])
    assert gone == ["b"]
    assert grant(s, "moved", "A100-80GB") == ("c", "A100-80GB", 1)
    s.update_slots([Slot("a", {"L4": 2})])  # the same host, now with other GPUs
    with pytest.raises(HardwareUnavailableError):
        s.check_feasible(parse_spec("H100"))
    assert grant(s, "changed", "L4") == ("a", "L4", 1)
