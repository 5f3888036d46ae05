"""Bounded resources: request bodies share one budget."""

from __future__ import annotations

from switchd.limits import BodyBudget


def test_the_budget_is_shared_and_returned_when_a_request_ends() -> None:
    budget = BodyBudget(100)
    with budget.hold() as first, budget.hold() as second:
        assert first.take(60)
        assert not second.take(41), "60 + 41 is over 100"
        assert second.take(40)
        assert budget.held == 100
    assert budget.held == 0
    with budget.hold() as third:
        assert third.take(100)
