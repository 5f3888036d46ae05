"""Eviction planning: which models each policy unloads, and when it unloads none."""

from __future__ import annotations

import pytest

from switchd.config import EvictionPolicy
from switchd.planner import Candidate, Plan, plan

LARGEST = EvictionPolicy.LARGEST_FIRST
LRU = EvictionPolicy.LRU
SMALLEST = EvictionPolicy.SMALLEST_SUFFICIENT

# A 96 GB card holding four models, 6 GB free.
RUNNING = (
    Candidate("mistral-7b", 18.0, last_used=400.0),
    Candidate("gpt-oss-20b", 24.0, last_used=100.0),
    Candidate("coder-33b", 40.0, last_used=300.0),
    Candidate("embed", 8.0, last_used=200.0),
)


def names(result: Plan) -> list[str]:
    return [victim.name for victim in result.victims]


# --- largest_first -------------------------------------------------------------------------


def test_largest_first_takes_the_largest_until_enough() -> None:
    result = plan(50.0, 6.0, 96.0, RUNNING, LARGEST)
    assert names(result) == ["coder-33b", "gpt-oss-20b"]  # 6 + 40 < 50, 6 + 64 >= 50
    assert result.enough is True


def test_largest_first_stops_as_soon_as_one_is_enough() -> None:
    result = plan(46.0, 6.0, 96.0, RUNNING, LARGEST)
    assert names(result) == ["coder-33b"]  # 6 + 40 == 46 exactly
    assert result.enough is True


def test_largest_first_is_the_default_policy() -> None:
    assert names(plan(50.0, 6.0, 96.0, RUNNING)) == ["coder-33b", "gpt-oss-20b"]


def test_largest_first_breaks_ties_by_name() -> None:
    tied = (
        Candidate("zeta", 10.0, 0.0),
        Candidate("alpha", 10.0, 0.0),
        Candidate("mid", 10.0, 0.0),
    )
    assert names(plan(15.0, 0.0, 30.0, tied, LARGEST)) == ["alpha", "mid"]
    assert names(plan(15.0, 0.0, 30.0, tuple(reversed(tied)), LARGEST)) == ["alpha", "mid"]


# --- lru -----------------------------------------------------------------------------------


def test_lru_takes_the_least_recently_used_first() -> None:
    result = plan(40.0, 6.0, 96.0, RUNNING, LRU)
    # gpt-oss-20b (t=100, 24) then embed (t=200, 8): 6 + 32 < 40, so coder-33b (t=300) too.
    assert names(result) == ["gpt-oss-20b", "embed", "coder-33b"]
    assert result.enough is True


def test_lru_one_victim_when_the_oldest_is_enough() -> None:
    assert names(plan(30.0, 6.0, 96.0, RUNNING, LRU)) == ["gpt-oss-20b"]


def test_lru_never_used_models_go_first() -> None:
    candidates = (*RUNNING, Candidate("idle", 2.0, last_used=0.0))
    assert names(plan(30.0, 6.0, 96.0, candidates, LRU)) == ["idle", "gpt-oss-20b"]


def test_lru_ties_larger_first_then_by_name() -> None:
    tied = (
        Candidate("b-small", 5.0, 10.0),
        Candidate("z-big", 20.0, 10.0),
        Candidate("a-small", 5.0, 10.0),
        Candidate("newer", 50.0, 99.0),
    )
    assert names(plan(28.0, 0.0, 80.0, tied, LRU)) == ["z-big", "a-small", "b-small"]


# --- smallest_sufficient -------------------------------------------------------------------


def test_smallest_sufficient_picks_the_single_smallest_that_is_enough() -> None:
    # Deficit 14: embed (8) is too small, mistral (18) is the smallest sufficient.
    result = plan(20.0, 6.0, 96.0, RUNNING, SMALLEST)
    assert names(result) == ["mistral-7b"]
    assert result.enough is True


def test_smallest_sufficient_exact_fit() -> None:
    assert names(plan(30.0, 6.0, 96.0, RUNNING, SMALLEST)) == ["gpt-oss-20b"]  # 24 == deficit


def test_smallest_sufficient_falls_back_to_largest_first() -> None:
    # Deficit 54: no single model frees it.
    result = plan(60.0, 6.0, 96.0, RUNNING, SMALLEST)
    assert names(result) == ["coder-33b", "gpt-oss-20b"]
    assert result.enough is True


def test_smallest_sufficient_breaks_ties_by_name() -> None:
    tied = (
        Candidate("zeta", 10.0, 0.0),
        Candidate("alpha", 10.0, 0.0),
        Candidate("big", 30.0, 0.0),
    )
    assert names(plan(8.0, 0.0, 50.0, tied, SMALLEST)) == ["alpha"]


# --- every policy --------------------------------------------------------------------------


@pytest.mark.parametrize("policy", list(EvictionPolicy))
def test_pinned_models_are_never_chosen(policy: EvictionPolicy) -> None:
    candidates = (
        Candidate("pinned-big", 60.0, last_used=0.0, pinned=True),
        Candidate("a", 20.0, last_used=5.0),
        Candidate("b", 10.0, last_used=6.0),
    )
    result = plan(25.0, 0.0, 96.0, candidates, policy)
    assert "pinned-big" not in names(result)
    assert sorted(names(result)) == ["a", "b"]
    assert result.freeable_gb == 30.0
    assert result.total_available_gb == 30.0


@pytest.mark.parametrize("policy", list(EvictionPolicy))
def test_no_victims_when_it_already_fits(policy: EvictionPolicy) -> None:
    for required, available in ((10.0, 12.0), (6.0, 6.0)):  # below and exactly at what is free
        result = plan(required, available, 96.0, RUNNING, policy)
        assert result.victims == ()
        assert result.enough is True
        assert result.freeable_gb == 90.0


@pytest.mark.parametrize("policy", list(EvictionPolicy))
def test_nothing_unloaded_when_even_everything_is_not_enough(policy: EvictionPolicy) -> None:
    candidates = (*RUNNING, Candidate("pinned", 10.0, 0.0, pinned=True))
    result = plan(97.0, 6.0, 106.0, candidates, policy)
    assert result.victims == ()
    assert result.enough is False
    assert result.freeable_gb == 90.0  # 18 + 24 + 40 + 8, not the pinned 10
    assert result.total_available_gb == 96.0
    assert (result.required_gb, result.available_gb, result.total_gb) == (97.0, 6.0, 106.0)


@pytest.mark.parametrize("policy", list(EvictionPolicy))
def test_exactly_everything_is_enough(policy: EvictionPolicy) -> None:
    result = plan(96.0, 6.0, 96.0, RUNNING, policy)
    assert sorted(names(result)) == ["coder-33b", "embed", "gpt-oss-20b", "mistral-7b"]
    assert result.enough is True


@pytest.mark.parametrize("policy", list(EvictionPolicy))
def test_no_candidates(policy: EvictionPolicy) -> None:
    fits = plan(10.0, 20.0, 20.0, (), policy)
    assert (fits.victims, fits.enough, fits.freeable_gb) == ((), True, 0.0)
    short = plan(30.0, 20.0, 20.0, (), policy)
    assert (short.victims, short.enough, short.total_available_gb) == ((), False, 20.0)


def test_total_available_is_rounded_to_two_decimals() -> None:
    candidates = (Candidate("a", 0.1, 0.0), Candidate("b", 0.2, 0.0))
    result = plan(99.0, 13.37, 95.59, candidates)
    assert result.freeable_gb == pytest.approx(0.3)
    assert result.total_available_gb == 13.67


def test_plan_keeps_the_candidates_themselves() -> None:
    result = plan(46.0, 6.0, 96.0, RUNNING)
    assert result.victims == (RUNNING[2],)
    assert result.victims[0] is RUNNING[2]


def test_enough_counts_victims_with_what_is_free() -> None:
    victims = (Candidate("a", 10.0, 0.0),)
    assert Plan(20.0, 10.0, 96.0, victims, 10.0).enough is True
    assert Plan(20.5, 10.0, 96.0, victims, 10.0).enough is False
