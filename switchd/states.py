"""Model states and switch-job stages, each with its table of legal moves.

The tables are the contract: the one owner of a state asks `check` before it
changes anything, so an illegal move is a loud bug, never a silent one.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import TypeVar


class ModelState(StrEnum):
    RUNNING = "running"
    LOADING = "loading"
    STOPPING = "stopping"
    SLEEPING = "sleeping"  # its engine runs but has given most of its memory back
    EXITED = "exited"  # not running: never started, stopped, or exited cleanly
    FAILED = "failed"  # failed to load or crashed; `error` says why


class Stage(StrEnum):
    QUEUED = "queued"
    MEMORY_CHECK = "memory_check"
    DRAIN = "drain"
    UNLOAD = "unload"
    UNLOADED = "unloaded"
    SLEEP = "sleep"  # a victim is put to sleep instead of stopped
    SLEPT = "slept"
    FREED = "freed"
    WAKE = "wake"  # the target sleeps: woken instead of started
    WOKEN = "woken"
    START = "start"
    LOADING = "loading"
    READY = "ready"
    DONE = "done"
    FAILED = "failed"


_S = TypeVar("_S", bound=StrEnum)


class IllegalTransition(RuntimeError):
    """A state change the table forbids: a bug in the owner, not in the input."""


MODEL_TRANSITIONS: Mapping[ModelState, frozenset[ModelState]] = {
    # RUNNING or SLEEPING: an engine adopted at start-up; FAILED: one that cannot run.
    ModelState.EXITED: frozenset(
        {ModelState.LOADING, ModelState.RUNNING, ModelState.SLEEPING, ModelState.FAILED}
    ),
    ModelState.FAILED: frozenset({ModelState.LOADING, ModelState.RUNNING, ModelState.EXITED}),
    # LOADING also wakes a SLEEPING engine; a wake that fails stops it (STOPPING).
    ModelState.LOADING: frozenset(
        {ModelState.RUNNING, ModelState.STOPPING, ModelState.FAILED, ModelState.EXITED}
    ),
    ModelState.RUNNING: frozenset(
        {ModelState.STOPPING, ModelState.SLEEPING, ModelState.EXITED, ModelState.FAILED}
    ),
    # SLEEPING: EXITED/FAILED when its engine dies asleep; STOPPING when it must go.
    ModelState.SLEEPING: frozenset(
        {ModelState.LOADING, ModelState.STOPPING, ModelState.EXITED, ModelState.FAILED}
    ),
    ModelState.STOPPING: frozenset({ModelState.EXITED, ModelState.FAILED}),
}

# `log` and `loading` repeat while loading, so LOADING may follow itself.
JOB_TRANSITIONS: Mapping[Stage, frozenset[Stage]] = {
    # QUEUED -> START: an engine adopted at start-up while still loading.
    Stage.QUEUED: frozenset(
        {Stage.MEMORY_CHECK, Stage.DRAIN, Stage.UNLOAD, Stage.START, Stage.DONE, Stage.FAILED}
    ),
    Stage.MEMORY_CHECK: frozenset(
        {Stage.DRAIN, Stage.UNLOAD, Stage.SLEEP, Stage.START, Stage.WAKE, Stage.DONE, Stage.FAILED}
    ),
    Stage.DRAIN: frozenset({Stage.UNLOAD, Stage.SLEEP, Stage.FAILED}),
    # UNLOAD -> START: a target whose wake failed was stopped; it starts cold.
    Stage.UNLOAD: frozenset({Stage.UNLOADED, Stage.FAILED}),
    Stage.UNLOADED: frozenset(
        {Stage.DRAIN, Stage.UNLOAD, Stage.SLEEP, Stage.FREED, Stage.START, Stage.FAILED}
    ),
    # SLEEP -> UNLOAD: the sleep failed (or freed too little) and the victim is stopped.
    Stage.SLEEP: frozenset({Stage.SLEPT, Stage.UNLOAD, Stage.FAILED}),
    Stage.SLEPT: frozenset({Stage.DRAIN, Stage.UNLOAD, Stage.SLEEP, Stage.FREED, Stage.FAILED}),
    Stage.FREED: frozenset({Stage.START, Stage.WAKE, Stage.DONE, Stage.FAILED}),
    # WAKE -> UNLOAD: the wake failed; the engine is stopped and started cold.
    Stage.WAKE: frozenset({Stage.WOKEN, Stage.UNLOAD, Stage.FAILED}),
    Stage.WOKEN: frozenset({Stage.READY, Stage.FAILED}),
    Stage.START: frozenset({Stage.LOADING, Stage.READY, Stage.FAILED}),
    Stage.LOADING: frozenset({Stage.LOADING, Stage.READY, Stage.FAILED}),
    Stage.READY: frozenset({Stage.DONE, Stage.FAILED}),
    Stage.DONE: frozenset(),
    Stage.FAILED: frozenset(),
}


def check(table: Mapping[_S, frozenset[_S]], current: _S, new: _S) -> None:
    if new not in table[current]:
        raise IllegalTransition(f"{current.value} -> {new.value} is not a legal transition")
