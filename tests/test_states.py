"""The model-state and job-stage tables, every (from, to) pair of each.

The expected tables are written out here, independently of switchd/states.py,
so that a change to either table fails a test until the other agrees.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from enum import StrEnum
from typing import TypeVar

import pytest

from switchd.states import (
    JOB_TRANSITIONS,
    MODEL_TRANSITIONS,
    IllegalTransition,
    ModelState,
    Stage,
    check,
)

_S = TypeVar("_S", bound=StrEnum)

M = ModelState
S = Stage

LEGAL_MODEL: set[tuple[ModelState, ModelState]] = {
    (M.EXITED, M.LOADING),
    (M.EXITED, M.RUNNING),  # an engine found running at start-up is adopted
    (M.EXITED, M.FAILED),  # a model found unable to run at start-up (no container)
    (M.EXITED, M.SLEEPING),  # an engine found asleep at start-up is adopted so
    (M.FAILED, M.LOADING),
    (M.FAILED, M.RUNNING),
    (M.FAILED, M.EXITED),
    (M.LOADING, M.RUNNING),
    (M.LOADING, M.STOPPING),
    (M.LOADING, M.FAILED),
    (M.LOADING, M.EXITED),
    (M.RUNNING, M.STOPPING),
    (M.RUNNING, M.SLEEPING),  # put aside: its engine keeps running, its memory goes
    (M.SLEEPING, M.LOADING),  # woken
    (M.SLEEPING, M.STOPPING),  # it must go for good (more memory, unload, TTL)
    (M.SLEEPING, M.EXITED),  # its engine ended outside switchd
    (M.SLEEPING, M.FAILED),  # ... or crashed
    (M.RUNNING, M.EXITED),
    (M.RUNNING, M.FAILED),
    (M.STOPPING, M.EXITED),
    (M.STOPPING, M.FAILED),
}

LEGAL_JOB: set[tuple[Stage, Stage]] = {
    (S.QUEUED, S.MEMORY_CHECK),
    (S.QUEUED, S.DRAIN),
    (S.QUEUED, S.UNLOAD),
    (S.QUEUED, S.START),  # an engine adopted at start-up while it still loads
    (S.QUEUED, S.DONE),
    (S.QUEUED, S.FAILED),
    (S.MEMORY_CHECK, S.DRAIN),
    (S.MEMORY_CHECK, S.UNLOAD),
    (S.MEMORY_CHECK, S.START),
    (S.MEMORY_CHECK, S.SLEEP),  # the first victim sleeps
    (S.MEMORY_CHECK, S.WAKE),  # the target sleeps and fits: woken at once
    (S.MEMORY_CHECK, S.DONE),
    (S.MEMORY_CHECK, S.FAILED),
    (S.DRAIN, S.UNLOAD),
    (S.DRAIN, S.SLEEP),
    (S.DRAIN, S.FAILED),
    (S.UNLOAD, S.UNLOADED),
    (S.UNLOAD, S.FAILED),
    (S.UNLOADED, S.DRAIN),
    (S.UNLOADED, S.UNLOAD),
    (S.UNLOADED, S.FREED),
    (S.UNLOADED, S.SLEEP),
    (S.UNLOADED, S.START),  # a target whose wake failed was stopped: it starts cold
    (S.SLEEP, S.SLEPT),
    (S.SLEEP, S.UNLOAD),  # the sleep failed: stopped instead
    (S.SLEEP, S.FAILED),
    (S.SLEPT, S.DRAIN),
    (S.SLEPT, S.UNLOAD),  # the next victim, or this one stopped: still short
    (S.SLEPT, S.SLEEP),
    (S.SLEPT, S.FREED),
    (S.SLEPT, S.FAILED),
    (S.UNLOADED, S.FAILED),
    (S.FREED, S.START),
    (S.FREED, S.WAKE),
    (S.WAKE, S.WOKEN),
    (S.WAKE, S.UNLOAD),  # the wake failed: stopped, then started cold
    (S.WAKE, S.FAILED),
    (S.WOKEN, S.READY),
    (S.WOKEN, S.FAILED),
    (S.FREED, S.DONE),
    (S.FREED, S.FAILED),
    (S.START, S.LOADING),
    (S.START, S.READY),
    (S.START, S.FAILED),
    (S.LOADING, S.LOADING),  # a `loading` event repeats while the engine loads
    (S.LOADING, S.READY),
    (S.LOADING, S.FAILED),
    (S.READY, S.DONE),
    (S.READY, S.FAILED),
}

MODEL_PAIRS = list(itertools.product(ModelState, ModelState))
JOB_PAIRS = list(itertools.product(Stage, Stage))


def pair_id(pair: tuple[StrEnum, StrEnum]) -> str:
    return f"{pair[0].value}->{pair[1].value}"


def assert_illegal(table: Mapping[_S, frozenset[_S]], current: _S, new: _S) -> None:
    with pytest.raises(IllegalTransition) as caught:
        check(table, current, new)
    assert str(caught.value) == f"{current.value} -> {new.value} is not a legal transition"


def test_every_state_has_a_row() -> None:
    assert set(MODEL_TRANSITIONS) == set(ModelState)
    assert set(JOB_TRANSITIONS) == set(Stage)


def test_tables_are_exactly_the_expected_ones() -> None:
    model = {(a, b) for a, row in MODEL_TRANSITIONS.items() for b in row}
    job = {(a, b) for a, row in JOB_TRANSITIONS.items() for b in row}
    assert model == LEGAL_MODEL
    assert job == LEGAL_JOB


@pytest.mark.parametrize("pair", MODEL_PAIRS, ids=[pair_id(p) for p in MODEL_PAIRS])
def test_model_transition(pair: tuple[ModelState, ModelState]) -> None:
    current, new = pair
    if pair in LEGAL_MODEL:
        check(MODEL_TRANSITIONS, current, new)
    else:
        assert_illegal(MODEL_TRANSITIONS, current, new)


@pytest.mark.parametrize("pair", JOB_PAIRS, ids=[pair_id(p) for p in JOB_PAIRS])
def test_job_transition(pair: tuple[Stage, Stage]) -> None:
    current, new = pair
    if pair in LEGAL_JOB:
        check(JOB_TRANSITIONS, current, new)
    else:
        assert_illegal(JOB_TRANSITIONS, current, new)


# --- the rows a reviewer looks for ---------------------------------------------------------


def test_running_cannot_go_back_to_loading() -> None:
    assert_illegal(MODEL_TRANSITIONS, M.RUNNING, M.LOADING)


def test_stopping_cannot_come_back_to_running() -> None:
    assert_illegal(MODEL_TRANSITIONS, M.STOPPING, M.RUNNING)
    assert_illegal(MODEL_TRANSITIONS, M.STOPPING, M.LOADING)


def test_exited_to_running_is_legal_for_adoption() -> None:
    check(MODEL_TRANSITIONS, M.EXITED, M.RUNNING)


def test_no_model_state_follows_itself() -> None:
    for state in ModelState:
        assert_illegal(MODEL_TRANSITIONS, state, state)


def test_exited_cannot_be_stopped_but_can_be_found_unusable() -> None:
    assert_illegal(MODEL_TRANSITIONS, M.EXITED, M.STOPPING)
    check(MODEL_TRANSITIONS, M.EXITED, M.FAILED)  # e.g. its container does not exist


@pytest.mark.parametrize("terminal", [S.DONE, S.FAILED])
def test_done_and_failed_are_terminal(terminal: Stage) -> None:
    assert JOB_TRANSITIONS[terminal] == frozenset()
    for stage in Stage:
        assert_illegal(JOB_TRANSITIONS, terminal, stage)


def test_every_live_stage_can_fail() -> None:
    for stage in Stage:
        if stage not in (S.DONE, S.FAILED):
            check(JOB_TRANSITIONS, stage, S.FAILED)


def test_stages_cannot_be_skipped_or_reversed() -> None:
    assert_illegal(JOB_TRANSITIONS, S.DRAIN, S.UNLOADED)  # must unload first
    assert_illegal(JOB_TRANSITIONS, S.UNLOAD, S.FREED)  # memory verified per victim
    assert_illegal(JOB_TRANSITIONS, S.START, S.DONE)  # never done before ready
    assert_illegal(JOB_TRANSITIONS, S.LOADING, S.START)
    assert_illegal(JOB_TRANSITIONS, S.READY, S.LOADING)
    assert_illegal(JOB_TRANSITIONS, S.MEMORY_CHECK, S.QUEUED)


def test_the_happy_path_is_legal() -> None:
    path = [
        S.QUEUED,
        S.MEMORY_CHECK,
        S.DRAIN,
        S.UNLOAD,
        S.UNLOADED,
        S.UNLOAD,
        S.UNLOADED,
        S.FREED,
        S.START,
        S.LOADING,
        S.LOADING,
        S.READY,
        S.DONE,
    ]
    for current, new in itertools.pairwise(path):
        check(JOB_TRANSITIONS, current, new)


def test_illegal_transition_is_a_runtime_error() -> None:
    assert issubclass(IllegalTransition, RuntimeError)
