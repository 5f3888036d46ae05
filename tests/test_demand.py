"""Waiters: admitted with the engine, or failed with their own copy of the error."""

from __future__ import annotations

import asyncio
import time

import pytest

from switchd.demand import CLAIM_GRACE_SECONDS, Demand, Waiter
from switchd.jobs import SwitchError
from switchd.runtime.base import EngineInfo

ENGINE = EngineInfo("m", "m#1", "http://m.engine", time.time())


async def test_waiters_are_kept_per_model_in_arrival_order() -> None:
    demand = Demand()
    first, second, other = Waiter("m", 1.0, 10.0), Waiter("m", 2.0, 10.0), Waiter("n", 0.5, 9.0)
    for waiter in (first, second, other):
        demand.add(waiter)
    assert (len(demand), demand.models(), demand.waiting("m")) == (3, ["m", "n"], 2)
    assert (demand.oldest("m"), demand.oldest("n"), demand.oldest("x")) == (1.0, 0.5, None)
    demand.remove(first, 3.0)
    assert demand.oldest("m") == 2.0
    demand.remove(first, 3.0)  # twice is harmless: a waiter can leave as it is admitted
    assert demand.waiting("m") == 1


async def test_admission_hands_every_waiter_the_engine_and_skips_those_gone() -> None:
    demand = Demand()
    waiters = [Waiter("m", float(i), 10.0) for i in range(3)]
    for waiter in waiters:
        demand.add(waiter)
    waiters[1].future.cancel()  # its client left in the same instant
    assert demand.admit("m", ENGINE) == 2
    assert [w.admitted for w in waiters] == [True, False, True]
    assert waiters[0].future.result() is ENGINE
    assert len(demand) == 0


async def test_a_failure_reaches_each_waiter_as_its_own_exception() -> None:
    demand = Demand()
    waiters = [Waiter("m", float(i), 10.0) for i in range(2)]
    for waiter in waiters:
        demand.add(waiter)
    error = SwitchError("load_failed", 503, "m failed to load", retry_after_seconds=10)
    assert demand.fail("m", error) == 2
    raised = []
    for waiter in waiters:
        with pytest.raises(SwitchError) as caught:
            await asyncio.wait_for(waiter.future, 1)
        raised.append(caught.value)
        assert not waiter.admitted
    assert raised[0] is not raised[1]
    assert all((e.code, e.retry_after_seconds) == ("load_failed", 10) for e in raised)


async def test_a_claim_goes_on_through_clients_that_give_up_and_come_back() -> None:
    """The issue-21 starvation: each client leaves after 30 s and sends again; the
    model's claim must date from the first, not restart with each."""
    demand = Demand()
    first = Waiter("m", 100.0, 700.0)
    demand.add(first)
    demand.remove(first, 130.0)  # its client gave up
    assert demand.models() == []
    assert demand.since("m") == 100.0
    again = Waiter("m", 130.01, 730.0)  # and sent the same request again
    demand.add(again)
    assert demand.since("m") == 100.0
    assert demand.oldest("m") == 130.01  # the oldest waiter now: not the claim
    late = Waiter("m", 160.0, 760.0)
    demand.add(late)
    demand.remove(again, 160.5)
    assert demand.since("m") == 100.0  # one waiter left: the claim goes on
    claim = demand.claim("m", 161.0)
    assert claim is not None
    assert claim.given_up == 2
    assert demand.given_up["m"] == 2


async def test_a_claim_lapses_after_the_grace_and_ends_when_served_or_refused() -> None:
    demand = Demand()
    demand.add(gone := Waiter("m", 100.0, 700.0))
    demand.remove(gone, 110.0)
    assert demand.claim("m", 110.0 + CLAIM_GRACE_SECONDS) is not None
    demand.add(Waiter("m", 110.0 + CLAIM_GRACE_SECONDS + 0.1, 900.0))
    assert demand.since("m") == 110.0 + CLAIM_GRACE_SECONDS + 0.1  # a new claim
    assert demand.admit("m", ENGINE) == 1
    assert demand.since("m") is None  # met
    demand.add(Waiter("m", 200.0, 800.0))
    demand.fail("m", SwitchError("load_failed", 503, "no"))
    assert demand.since("m") is None  # answered
    assert demand.given_up["m"] == 1


async def test_waiters_past_reach_are_refused_early_and_the_rest_keep_waiting() -> None:
    demand = Demand()
    soon, later = Waiter("m", 100.0, 103.0), Waiter("m", 101.0, 200.0)
    demand.add(soon)
    demand.add(later)
    assert demand.earliest_deadline("m") == 103.0
    late = SwitchError("deadline_unreachable", 503, "m cannot be ready in time")
    assert demand.fail_late("m", 101.5, 105.0, late) == 1
    with pytest.raises(SwitchError, match="in time"):
        await asyncio.wait_for(soon.future, 1)
    assert not later.future.done()
    assert (demand.waiting("m"), demand.earliest_deadline("m"), demand.since("m")) == (
        1,
        200.0,
        100.0,
    )
    assert demand.given_up["m"] == 0  # refused, not given up
