"""Waiters: admitted with the engine, or failed with their own copy of the error."""

from __future__ import annotations

import asyncio
import time

import pytest

from switchd.demand import Demand, Waiter
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
    demand.remove(first)
    assert demand.oldest("m") == 2.0
    demand.remove(first)  # twice is harmless: a waiter can leave as it is admitted
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
