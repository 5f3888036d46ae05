"""Placement and eviction planning: where a model goes, which models each policy
unloads there, and when it unloads none. One card first (today's semantics), then
hosts with two and four."""

from __future__ import annotations

from typing import NamedTuple

import pytest

from switchd.config import EvictionPolicy
from switchd.planner import Candidate, Devices, Need, Plan, plan

LARGEST = EvictionPolicy.LARGEST_FIRST
LRU = EvictionPolicy.LRU
SMALLEST = EvictionPolicy.SMALLEST_SUFFICIENT


def names(result: Plan) -> list[str]:
    return [victim.name for victim in result.victims]


def outcome(result: Plan) -> tuple[Devices, list[str], bool, int | None]:
    return result.devices, names(result), result.enough, result.short_device


def on(*devices: int, gb: float) -> Need:
    """A model whose config names its devices (`gpus: [0, 1]`)."""
    return Need(gb, devices, len(devices))


def any_of(count: int, gb: float) -> Need:
    """A model that asks for any `count` devices (`gpus: 2`)."""
    return Need(gb, None, count)


# ---- one card -------------------------------------------------------------------------

# A 96 GB card holding four models, 6 GB free.
RUNNING = (
    Candidate("mistral-7b", {0: 18.0}, last_used=400.0),
    Candidate("gpt-oss-20b", {0: 24.0}, last_used=100.0),
    Candidate("coder-33b", {0: 40.0}, last_used=300.0),
    Candidate("embed", {0: 8.0}, last_used=200.0),
)


def one_card(
    required: float,
    available: float,
    total: float,
    candidates: tuple[Candidate, ...],
    policy: EvictionPolicy = LARGEST,
) -> Plan:
    return plan(any_of(1, required), {0: available}, {0: total}, candidates, policy)


def held(name: str, gb: float, last_used: float = 0.0, *, pinned: bool = False) -> Candidate:
    """A model on the one card."""
    return Candidate(name, {0: gb}, last_used, pinned)


# --- largest_first


def test_largest_first_takes_the_largest_until_enough() -> None:
    result = one_card(50.0, 6.0, 96.0, RUNNING, LARGEST)
    # 6 + 40 < 50, 6 + 64 >= 50
    assert outcome(result) == ((0,), ["coder-33b", "gpt-oss-20b"], True, None)


def test_largest_first_stops_as_soon_as_one_is_enough() -> None:
    result = one_card(46.0, 6.0, 96.0, RUNNING, LARGEST)
    assert outcome(result) == ((0,), ["coder-33b"], True, None)  # 6 + 40 == 46 exactly


def test_largest_first_is_the_default_policy() -> None:
    result = plan(any_of(1, 50.0), {0: 6.0}, {0: 96.0}, RUNNING)
    assert outcome(result) == ((0,), ["coder-33b", "gpt-oss-20b"], True, None)


def test_largest_first_breaks_ties_by_name() -> None:
    tied = (held("zeta", 10.0), held("alpha", 10.0), held("mid", 10.0))
    assert names(one_card(15.0, 0.0, 30.0, tied, LARGEST)) == ["alpha", "mid"]
    assert names(one_card(15.0, 0.0, 30.0, tied[::-1], LARGEST)) == ["alpha", "mid"]


# --- lru


def test_lru_takes_the_least_recently_used_first() -> None:
    result = one_card(40.0, 6.0, 96.0, RUNNING, LRU)
    # gpt-oss-20b (t=100, 24) then embed (t=200, 8): 6 + 32 < 40, so coder-33b (t=300) too.
    assert outcome(result) == ((0,), ["gpt-oss-20b", "embed", "coder-33b"], True, None)


def test_lru_one_victim_when_the_oldest_is_enough() -> None:
    assert outcome(one_card(30.0, 6.0, 96.0, RUNNING, LRU)) == ((0,), ["gpt-oss-20b"], True, None)


def test_lru_never_used_models_go_first() -> None:
    candidates = (*RUNNING, held("idle", 2.0, last_used=0.0))
    assert names(one_card(30.0, 6.0, 96.0, candidates, LRU)) == ["idle", "gpt-oss-20b"]


def test_lru_ties_larger_first_then_by_name() -> None:
    tied = (
        held("b-small", 5.0, 10.0),
        held("z-big", 20.0, 10.0),
        held("a-small", 5.0, 10.0),
        held("newer", 50.0, 99.0),
    )
    assert names(one_card(28.0, 0.0, 80.0, tied, LRU)) == ["z-big", "a-small", "b-small"]


# --- smallest_sufficient


def test_smallest_sufficient_picks_the_single_smallest_that_is_enough() -> None:
    # Deficit 14: embed (8) is too small, mistral (18) is the smallest sufficient.
    result = one_card(20.0, 6.0, 96.0, RUNNING, SMALLEST)
    assert outcome(result) == ((0,), ["mistral-7b"], True, None)


def test_smallest_sufficient_exact_fit() -> None:
    result = one_card(30.0, 6.0, 96.0, RUNNING, SMALLEST)
    assert outcome(result) == ((0,), ["gpt-oss-20b"], True, None)  # 24 == deficit


def test_smallest_sufficient_falls_back_to_largest_first() -> None:
    # Deficit 54: no single model frees it.
    result = one_card(60.0, 6.0, 96.0, RUNNING, SMALLEST)
    assert outcome(result) == ((0,), ["coder-33b", "gpt-oss-20b"], True, None)


def test_smallest_sufficient_breaks_ties_by_name() -> None:
    tied = (held("zeta", 10.0), held("alpha", 10.0), held("big", 30.0))
    assert names(one_card(8.0, 0.0, 50.0, tied, SMALLEST)) == ["alpha"]


# --- every policy


@pytest.mark.parametrize("policy", list(EvictionPolicy))
def test_pinned_models_are_never_chosen(policy: EvictionPolicy) -> None:
    candidates = (
        held("pinned-big", 60.0, last_used=0.0, pinned=True),
        held("a", 20.0, last_used=5.0),
        held("b", 10.0, last_used=6.0),
    )
    result = one_card(25.0, 0.0, 96.0, candidates, policy)
    assert (result.devices, sorted(names(result)), result.enough) == ((0,), ["a", "b"], True)
    assert result.short_device is None
    assert result.freeable_by_device == {0: 30.0}
    assert result.total_available_gb == 30.0


@pytest.mark.parametrize("policy", list(EvictionPolicy))
def test_no_victims_when_it_already_fits(policy: EvictionPolicy) -> None:
    for required, available in ((10.0, 12.0), (6.0, 6.0)):  # below and exactly at what is free
        result = one_card(required, available, 96.0, RUNNING, policy)
        assert outcome(result) == ((0,), [], True, None)
        assert result.freeable_by_device == {0: 90.0}


@pytest.mark.parametrize("policy", list(EvictionPolicy))
def test_nothing_unloaded_when_even_everything_is_not_enough(policy: EvictionPolicy) -> None:
    candidates = (*RUNNING, held("pinned", 10.0, pinned=True))
    result = one_card(97.0, 6.0, 106.0, candidates, policy)
    assert outcome(result) == ((0,), [], False, 0)
    assert result.freeable_by_device == {0: 90.0}  # 18 + 24 + 40 + 8, not the pinned 10
    assert result.total_available_gb == 96.0
    assert (result.required_gb, result.available_gb, result.total_gb) == (97.0, 6.0, 106.0)


@pytest.mark.parametrize("policy", list(EvictionPolicy))
def test_exactly_everything_is_enough(policy: EvictionPolicy) -> None:
    result = one_card(96.0, 6.0, 96.0, RUNNING, policy)
    assert (result.devices, result.enough, result.short_device) == ((0,), True, None)
    assert sorted(names(result)) == ["coder-33b", "embed", "gpt-oss-20b", "mistral-7b"]


@pytest.mark.parametrize("policy", list(EvictionPolicy))
def test_no_candidates(policy: EvictionPolicy) -> None:
    fits = one_card(10.0, 20.0, 20.0, (), policy)
    assert outcome(fits) == ((0,), [], True, None)
    assert fits.freeable_by_device == {0: 0.0}
    short = one_card(30.0, 20.0, 20.0, (), policy)
    assert outcome(short) == ((0,), [], False, 0)
    assert short.total_available_gb == 20.0


def test_total_available_is_rounded_to_two_decimals() -> None:
    candidates = (held("a", 0.1), held("b", 0.2))
    result = one_card(99.0, 13.37, 95.59, candidates)
    assert result.freeable_by_device[0] == pytest.approx(0.3)
    assert result.total_available_gb == 13.67


def test_plan_keeps_the_candidates_themselves() -> None:
    result = one_card(46.0, 6.0, 96.0, RUNNING)
    assert result.victims == (RUNNING[2],)
    assert result.victims[0] is RUNNING[2]


def test_candidates_holding_nothing_on_the_card_are_never_victims() -> None:
    candidates = (Candidate("elsewhere", {0: 0.0}, 0.0), held("a", 10.0, 5.0))
    assert outcome(one_card(10.0, 2.0, 20.0, candidates, LRU)) == ((0,), ["a"], True, None)


# ---- several cards --------------------------------------------------------------------


class Case(NamedTuple):
    available: dict[int, float]
    candidates: tuple[Candidate, ...]
    need: Need
    policy: EvictionPolicy
    devices: Devices
    victims: list[str]
    enough: bool
    short_device: int | None


# Two and four cards, all nearly full: 4 GB free on each.
TWO_FULL = {0: 4.0, 1: 4.0}
FOUR_FULL = {0: 4.0, 1: 4.0, 2: 4.0, 3: 4.0}

CASES = [
    pytest.param(
        Case(
            {0: 2.0, 1: 10.0},
            (
                Candidate("big-on-0", {0: 40.0}, 1.0),
                Candidate("mid-on-1", {1: 30.0}, 2.0),
                Candidate("small-on-1", {1: 8.0}, 3.0),
            ),
            on(1, gb=20.0),
            LARGEST,
            (1,),
            ["mid-on-1"],
            True,
            None,
        ),
        id="fixed on [1] leaves device 0's models alone",
    ),
    pytest.param(
        Case(
            {0: 5.0, 1: 30.0},
            (Candidate("a", {0: 40.0}, 0.0),),
            any_of(1, 20.0),
            LARGEST,
            (1,),
            [],
            True,
            None,
        ),
        id="count 1 of 2 goes where it fits without unloading",
    ),
    pytest.param(
        Case({0: 40.0, 1: 25.0}, (), any_of(1, 20.0), LARGEST, (1,), [], True, None),
        id="count 1 of 2: best fit between two that fit",
    ),
    pytest.param(
        Case({0: 25.0, 1: 25.0}, (), any_of(1, 20.0), LARGEST, (0,), [], True, None),
        id="count 1 of 2: an equal fit goes to the lowest index",
    ),
    pytest.param(
        Case(
            {0: 10.0, 1: 20.0, 2: 12.0, 3: 22.0},
            (Candidate("a", {0: 20.0}, 0.0),),
            any_of(2, 11.0),
            LARGEST,
            (1, 2),  # leftover 9 + 1, against (1, 3): 9 + 11 and (2, 3): 1 + 11
            [],
            True,
            None,
        ),
        id="count 2 of 4: best fit without unloading",
    ),
    pytest.param(
        Case(
            FOUR_FULL,
            (
                Candidate("on-0", {0: 8.0}, 0.0),
                Candidate("on-1", {1: 8.0}, 0.0),
                Candidate("tp-2-3", {2: 20.0, 3: 20.0}, 0.0),
            ),
            any_of(2, 10.0),
            LARGEST,
            (2, 3),  # one victim of 40 GB beats two of 8
            ["tp-2-3"],
            True,
            None,
        ),
        id="count 2 of 4: fewest victims, one spanning both devices",
    ),
    pytest.param(
        Case(
            FOUR_FULL,
            (
                Candidate("split-0-1", {0: 8.0, 1: 10.0}, 0.0),
                Candidate("on-1", {1: 12.0}, 0.0),
                Candidate("on-2", {2: 30.0}, 0.0),
            ),
            any_of(1, 10.0),
            LARGEST,
            (1,),  # 12 GB unloaded, against 18 (split-0-1's whole footprint) or 30
            ["on-1"],
            True,
            None,
        ),
        id="count 1 of 4: least memory unloaded, whole footprints counted",
    ),
    pytest.param(
        Case(
            {0: 6.0, 1: 4.0},
            (Candidate("on-0", {0: 8.0}, 0.0), Candidate("on-1", {1: 8.0}, 0.0)),
            any_of(1, 10.0),
            LARGEST,
            (1,),  # one victim of 8 GB either way: 2 GB left on device 1, 4 on device 0
            ["on-1"],
            True,
            None,
        ),
        id="count 1 of 2: equal unloads, best fit after unloading",
    ),
    pytest.param(
        Case(
            {0: 10.0, 1: 30.0},
            (Candidate("on-0", {0: 12.0}, 0.0), Candidate("on-1", {1: 40.0}, 0.0)),
            any_of(2, 20.0),
            LARGEST,
            (0, 1),  # device 1 has room already: on-1 is not touched
            ["on-0"],
            True,
            None,
        ),
        id="count 2 of 2 spans every device, unloads only where short",
    ),
    pytest.param(
        Case(
            FOUR_FULL,
            (
                Candidate("a", {0: 5.0, 1: 5.0}, 0.0),
                Candidate("b", {2: 5.0, 3: 5.0}, 0.0),
            ),
            any_of(4, 9.0),
            LRU,
            (0, 1, 2, 3),
            ["a", "b"],
            True,
            None,
        ),
        id="count 4 of 4 spans every device",
    ),
    pytest.param(
        Case(
            {0: 2.0, 1: 6.0},
            (
                Candidate("pinned-on-0", {0: 40.0}, 0.0, pinned=True),
                Candidate("small-on-0", {0: 5.0}, 0.0),
                Candidate("on-1", {1: 30.0}, 500.0),
            ),
            any_of(1, 20.0),
            LRU,
            (1,),
            ["on-1"],
            True,
            None,
        ),
        id="pinned models on device 0 force placement on device 1",
    ),
    pytest.param(
        Case(
            {0: 2.0, 1: 2.0, 2: 6.0, 3: 4.0},
            (
                Candidate("tp-0-1", {0: 20.0, 1: 20.0}, 0.0),
                Candidate("fixed-2", {2: 10.0}, 0.0),
                Candidate("counted-3", {3: 16.0}, 0.0),
            ),
            on(2, 3, gb=12.0),
            LARGEST,
            (2, 3),
            ["counted-3", "fixed-2"],
            True,
            None,
        ),
        id="fixed on [2, 3] among fixed and counted models",
    ),
    pytest.param(
        Case(
            {0: 2.0, 1: 2.0, 2: 6.0, 3: 4.0},
            (
                Candidate("tp-0-1", {0: 20.0, 1: 20.0}, 0.0),
                Candidate("fixed-2", {2: 10.0}, 0.0),
                Candidate("counted-3", {3: 16.0}, 0.0),
            ),
            any_of(2, 12.0),
            LARGEST,
            (0, 1),  # one victim (40 GB) beats two (26 GB)
            ["tp-0-1"],
            True,
            None,
        ),
        id="count 2 of 4 among fixed and counted models",
    ),
    pytest.param(
        Case(
            {0: 10.0, 1: 5.0},
            (
                Candidate("tp", {0: 12.0, 1: 16.0}, 0.0),
                Candidate("other-0", {0: 20.0}, 0.0),
            ),
            on(0, 1, gb=20.0),
            LARGEST,
            (0, 1),  # tp frees 28 on the two short devices, other-0 20: tp alone covers both
            ["tp"],
            True,
            None,
        ),
        id="victim spanning two devices frees on both",
    ),
    pytest.param(
        Case(
            TWO_FULL,
            (
                Candidate("big-0", {0: 30.0}, 0.0),
                Candidate("also-0", {0: 18.0}, 0.0),
                Candidate("on-1", {1: 16.0}, 0.0),
            ),
            on(0, 1, gb=20.0),
            LARGEST,
            (0, 1),  # also-0 (18) comes before on-1 (16) but no longer helps
            ["big-0", "on-1"],
            True,
            None,
        ),
        id="candidates that no longer help are skipped",
    ),
    pytest.param(
        Case(
            {0: 30.0, 1: 5.0},
            (Candidate("oldest-on-0", {0: 40.0}, 0.0), Candidate("on-1", {1: 20.0}, 50.0)),
            on(0, 1, gb=20.0),
            LRU,
            (0, 1),
            ["on-1"],
            True,
            None,
        ),
        id="only devices in deficit matter",
    ),
    pytest.param(
        Case(
            {0: 10.0, 1: 5.0},
            (
                Candidate("on-0", {0: 25.0}, 0.0),
                Candidate("on-1", {1: 20.0}, 0.0),
                Candidate("pinned-on-1", {1: 10.0}, 0.0, pinned=True),
            ),
            on(0, 1, gb=30.0),
            LARGEST,
            (0, 1),  # device 0 could be freed (10 + 25), device 1 cannot (5 + 20 < 30)
            [],
            False,
            1,
        ),
        id="not enough: nothing unloaded, the short device named",
    ),
    pytest.param(
        Case(
            {0: 10.0, 1: 20.0, 2: 15.0},
            (Candidate("on-2", {2: 10.0}, 0.0),),
            any_of(2, 40.0),
            LARGEST,
            (1, 2),  # 20 + 15 + 10 possible, against 30 and 35: device 1 is 20 short, 2 is 15
            [],
            False,
            1,
        ),
        id="not enough anywhere: the set with the most memory possible",
    ),
]


@pytest.mark.parametrize("case", CASES)
def test_several_devices(case: Case) -> None:
    total = dict.fromkeys(case.available, 48.0)
    result = plan(case.need, case.available, total, case.candidates, case.policy)
    assert outcome(result) == (case.devices, case.victims, case.enough, case.short_device)


# --- policies on several devices

# Devices 0 and 1 each 15 short for a model fixed on both; three ways to cover it.
SPREAD = (
    Candidate("tp-0-1", {0: 16.0, 1: 16.0}, last_used=300.0),
    Candidate("solo-0", {0: 20.0}, last_used=100.0),
    Candidate("solo-1", {1: 20.0}, last_used=200.0),
    Candidate("tiny-0", {0: 4.0}, last_used=50.0),
)


@pytest.mark.parametrize(
    ("policy", "victims"),
    [
        (LARGEST, ["tp-0-1"]),  # frees 32 on the short devices, solo-0 and solo-1 20 each
        (LRU, ["tiny-0", "solo-0", "solo-1"]),  # tiny-0 is oldest, helps, is not enough
        (SMALLEST, ["tp-0-1"]),  # the only one covering both deficits alone
    ],
)
def test_policies_on_two_devices(policy: EvictionPolicy, victims: list[str]) -> None:
    result = plan(on(0, 1, gb=20.0), TWO_FULL, {0: 48.0, 1: 48.0}, SPREAD, policy)
    assert outcome(result) == ((0, 1), victims, True, None)


def test_smallest_sufficient_on_two_devices_falls_back_to_largest_first() -> None:
    candidates = SPREAD[1:]  # no tp-0-1: nothing covers both devices alone
    result = plan(on(0, 1, gb=20.0), TWO_FULL, {0: 48.0, 1: 48.0}, candidates, SMALLEST)
    assert outcome(result) == ((0, 1), ["solo-0", "solo-1"], True, None)


def test_smallest_sufficient_compares_whole_footprints() -> None:
    candidates = (
        Candidate("wide", {0: 8.0, 1: 10.0}, 0.0),  # frees less on device 0, 18 GB in all
        Candidate("narrow", {0: 14.0}, 0.0),
    )
    result = plan(on(0, gb=12.0), TWO_FULL, {0: 48.0, 1: 48.0}, candidates, SMALLEST)
    assert outcome(result) == ((0,), ["narrow"], True, None)


@pytest.mark.parametrize("policy", list(EvictionPolicy))
def test_every_policy_places_where_less_is_unloaded(policy: EvictionPolicy) -> None:
    candidates = (Candidate("on-0", {0: 30.0}, 0.0), Candidate("on-1", {1: 10.0}, 1.0))
    result = plan(any_of(1, 12.0), TWO_FULL, {0: 48.0, 1: 48.0}, candidates, policy)
    # One victim either way; on-1 unloads 10 GB rather than 30.
    assert outcome(result) == ((1,), ["on-1"], True, None)


# --- the plan's figures


def test_figures_are_per_chosen_device_and_summed() -> None:
    candidates = (
        Candidate("tp-1-2", {1: 10.005, 2: 10.005}, 0.0),
        Candidate("pinned-2", {2: 6.0}, 0.0, pinned=True),
        Candidate("on-0", {0: 30.0}, 0.0),
    )
    available = {0: 1.0, 1: 2.5, 2: 3.25}
    total = {0: 24.0, 1: 24.0, 2: 23.5}
    result = plan(any_of(2, 10.0), available, total, candidates)
    assert outcome(result) == ((1, 2), ["tp-1-2"], True, None)
    assert result.required_by_device == {1: 10.0, 2: 10.0}
    assert result.available_by_device == {1: 2.5, 2: 3.25}
    assert result.total_by_device == {1: 24.0, 2: 23.5}
    assert result.freeable_by_device == {1: 10.005, 2: 10.005}  # not the pinned 6
    assert (result.required_gb, result.available_gb, result.total_gb) == (20.0, 5.75, 47.5)
    assert result.total_available_gb == 25.76  # 5.75 + 20.01
    assert result.victims[0].total_gb == pytest.approx(20.01)


def test_fixed_devices_are_reported_sorted() -> None:
    result = plan(Need(5.0, (1, 0), 2), {0: 10.0, 1: 10.0}, {0: 10.0, 1: 10.0}, ())
    assert outcome(result) == ((0, 1), [], True, None)


# --- figures that cannot be planned


@pytest.mark.parametrize(
    ("fixed", "count"),
    [((0, 1), 1), ((0, 0), 2), (None, 0), ((), 0)],
)
def test_a_need_must_be_consistent(fixed: Devices | None, count: int) -> None:
    with pytest.raises(ValueError, match="device"):
        Need(10.0, fixed, count)


@pytest.mark.parametrize(
    ("need", "available", "total"),
    [
        (any_of(3, 10.0), {0: 48.0, 1: 48.0}, {0: 48.0, 1: 48.0}),
        (on(2, gb=10.0), {0: 48.0, 1: 48.0}, {0: 48.0, 1: 48.0}),
        (any_of(1, 10.0), {0: 48.0, 1: 48.0}, {0: 48.0}),
    ],
    ids=["more devices than the host has", "a device the host lacks", "no total for a device"],
)
def test_figures_the_host_cannot_hold_are_refused(
    need: Need, available: dict[int, float], total: dict[int, float]
) -> None:
    with pytest.raises(ValueError, match="device"):
        plan(need, available, total, ())
