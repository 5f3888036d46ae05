"""The policy's decisions, from figures alone."""

from __future__ import annotations

import pytest

from switchd.policy import ACTIVE_GRACE_SECONDS, Holder, Want, hold_seconds, order, yields_at

HOLD = 10.0


def holder(
    *,
    ready_at: float = 100.0,
    residency: float = 5.0,
    in_flight: int = 0,
    waiting: int = 0,
    last_active: float = 100.0,
) -> Holder:
    return Holder("a", ready_at, residency, in_flight, waiting, last_active)


@pytest.mark.parametrize(
    ("case", "loaded", "wanted_since", "expected"),
    [
        # Idle: it makes room once its residency is over, not before.
        ("idle, resident long enough", holder(last_active=100.0), 90.0, 105.0),
        ("idle since its last use", holder(last_active=200.0), 195.0, 200.5),
        ("used while others waited past the hold", holder(last_active=200.0), 150.0, 160.0),
        # Busy: it keeps the GPU for the hold, counted from when the others began to wait.
        ("busy, others waited since before it loaded", holder(in_flight=2), 50.0, 110.0),
        ("busy, others came later", holder(in_flight=1), 120.0, 130.0),
        ("its own waiters count as busy", holder(waiting=3), 120.0, 130.0),
        # The residency wins over a shorter hold: a slow load buys a longer turn.
        ("busy, residency longer than the hold", holder(residency=60.0, in_flight=1), 100.0, 160.0),
        # Used a moment ago: still busy until the grace runs out, then idle.
        ("just used", holder(last_active=130.0), 120.0, 130.0),
    ],
)
def test_when_a_loaded_model_makes_room(
    case: str, loaded: Holder, wanted_since: float, expected: float
) -> None:
    assert yields_at(loaded, wanted_since, HOLD) == pytest.approx(expected), case


def test_a_holder_used_within_the_grace_keeps_the_gpu_until_the_grace_or_the_hold_ends() -> None:
    recently = holder(last_active=108.0)
    assert yields_at(recently, 100.0, HOLD) == pytest.approx(108.0 + ACTIVE_GRACE_SECONDS)
    assert yields_at(recently, 90.0, HOLD) == pytest.approx(108.0 + ACTIVE_GRACE_SECONDS)
    # The hold caps even a holder in use just now.
    assert yields_at(holder(last_active=115.0), 95.0, HOLD) == pytest.approx(110.0)


def test_the_longest_waiting_model_goes_first_and_priority_breaks_ties() -> None:
    wants = [
        Want("late", 30.0),
        Want("tie-low", 10.0, 0),
        Want("tie-high", 10.0, 5),
        Want("first", 5.0),
    ]
    assert [w.name for w in order(wants)] == ["first", "tie-high", "tie-low", "late"]


def test_priority_does_not_jump_a_longer_wait() -> None:
    assert [w.name for w in order([Want("vip", 20.0, 100), Want("patient", 10.0)])] == [
        "patient",
        "vip",
    ]


@pytest.mark.parametrize(
    ("case", "switch", "expected"),
    [
        # Switching at most a fifth of the time: hold four times what a switch costs.
        ("a cheap switch holds the floor", 0.6, 5.0),
        ("a switch of 3 s", 3.0, 12.0),
        ("a switch of 10 s", 10.0, 40.0),
        ("an expensive switch holds the ceiling", 60.0, 60.0),
        ("a free switch", 0.0, 5.0),
        ("a negative estimate counts as free", -1.0, 5.0),
    ],
)
def test_the_hold_scales_with_the_cost_of_the_switch(
    case: str, switch: float, expected: float
) -> None:
    assert hold_seconds(switch, 0.2, 5.0, 60.0) == pytest.approx(expected), case


def test_the_share_sets_the_ratio_of_holding_to_switching() -> None:
    assert hold_seconds(10.0, 0.5, 0.0, 600.0) == pytest.approx(10.0)
    assert hold_seconds(10.0, 0.1, 0.0, 600.0) == pytest.approx(90.0)
    assert hold_seconds(10.0, 1.0, 2.0, 600.0) == 2.0  # switching may take all: the floor


def test_the_ceiling_wins_where_the_bounds_cross() -> None:
    """`min_residency 1, max_hold 0`: no batching at all."""
    assert hold_seconds(10.0, 0.2, 1.0, 0.0) == 0.0


def test_a_deadline_brings_the_turn_forward_but_not_before_the_residency() -> None:
    busy = holder(in_flight=2)  # ready at 100, resident until 105
    assert yields_at(busy, 100.0, HOLD) == pytest.approx(110.0)
    assert yields_at(busy, 100.0, HOLD, start_by=107.0) == pytest.approx(107.0)
    assert yields_at(busy, 100.0, HOLD, start_by=102.0) == pytest.approx(105.0)
