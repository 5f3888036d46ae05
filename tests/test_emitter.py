"""A job's events: stages through the stage machine, engine lines within an allowance."""

from __future__ import annotations

import pytest

from switchd import wire
from switchd.emitter import MAX_LOG_EVENTS_PER_JOB, Emitter
from switchd.events import LOG_BURST, Event, EventBus, Subscription
from switchd.jobs import Job, JobKind
from switchd.states import IllegalTransition, Stage


def available(subscription: Subscription) -> list[Event]:
    """What a reader gets now, without waiting: everything queued for it."""
    got: list[Event] = []
    while (event := subscription._next()) is not None:
        got.append(event)
    return got


@pytest.fixture
def emitting() -> tuple[Emitter, EventBus, list[float]]:
    bus = EventBus(first_id=0)
    now = [0.0]
    return Emitter(bus, clock=lambda: now[0]), bus, now


async def test_an_engine_that_prints_1500_lines_at_once_publishes_a_burst_and_a_count(
    emitting: tuple[Emitter, EventBus, list[float]],
) -> None:
    emitter, bus, _ = emitting
    job = Job(JobKind.SWITCH, "gpt-oss-20b")
    subscription = bus.subscribe()
    for n in range(1500):
        emitter.emit_log(job, "gpt-oss-20b", f"line {n}")
    assert bus.last_id == LOG_BURST
    emitter.flush_logs(job)
    got = available(subscription)
    assert [e.data["line"] for e in got[:-1]] == [f"line {n}" for n in range(LOG_BURST)]
    summary = got[-1]
    assert summary.name == wire.LOG
    assert summary.data["line"] == summary.data["message"] == "1300 more lines from gpt-oss-20b"
    assert summary.data["skipped"] == 1300
    assert summary.data["source"] == "gpt-oss-20b"
    assert summary.data["job"] == job.id
    assert job.events[-1] == summary  # the job's own replay has it too
    emitter.flush_logs(job)  # nothing left: nothing published
    assert bus.last_id == summary.id


async def test_held_lines_are_summed_up_on_the_first_line_a_second_later(
    emitting: tuple[Emitter, EventBus, list[float]],
) -> None:
    emitter, bus, now = emitting
    job = Job(JobKind.SWITCH, "gpt-oss-20b")
    subscription = bus.subscribe()
    for n in range(LOG_BURST + 30):
        emitter.emit_log(job, "gpt-oss-20b", f"line {n}")
    now[0] = 0.5
    for n in range(50):  # 50 tokens came back: these go out one by one
        emitter.emit_log(job, "gpt-oss-20b", f"later {n}")
    assert bus.last_id == LOG_BURST + 50
    now[0] = 1.0
    emitter.emit_log(job, "gpt-oss-20b", "after a second")
    got = available(subscription)
    assert [e.data["line"] for e in got[-2:]] == [
        "30 more lines from gpt-oss-20b",
        "after a second",
    ]
    emitter.flush_logs(job)
    assert available(subscription) == []


def test_a_stage_is_published_with_the_jobs_fields_and_progress_never_goes_back(
    emitting: tuple[Emitter, EventBus, list[float]],
) -> None:
    emitter, bus, _ = emitting
    job = Job(JobKind.SWITCH, "m")
    emitter.emit(job, wire.Start(3.0, pid=7), "Started m", progress=0.3)
    emitter.emit(job, wire.Loading(1.0, 3.0), "Loading m", progress=0.2)
    assert (job.stage, job.progress) == (Stage.LOADING, 0.3)
    first, second = job.events
    assert first.name == "start"
    assert {k: v for k, v in first.data.items() if k != "ts"} == {
        "job": job.id,
        "kind": "switch",
        "cause": "explicit",
        "seq": 1,
        "stage": "start",
        "model": "m",
        "progress": 0.3,
        "message": "Started m",
        "estimated_load_time_seconds": 3.0,
        "pid": 7,
    }
    assert (second.data["seq"], second.data["progress"]) == (2, 0.3)
    assert bus.last_id == second.id


def test_a_stage_out_of_order_is_refused(
    emitting: tuple[Emitter, EventBus, list[float]],
) -> None:
    emitter, bus, _ = emitting
    job = Job(JobKind.SWITCH, "m")
    with pytest.raises(IllegalTransition, match="queued -> ready is not a legal transition"):
        emitter.emit(job, wire.Ready(1.0, None), "m is ready")
    assert (job.events, bus.last_id) == ([], 0)


def test_a_jobs_replay_keeps_at_most_its_share_of_log_lines(
    emitting: tuple[Emitter, EventBus, list[float]],
) -> None:
    emitter, bus, now = emitting
    job = Job(JobKind.SWITCH, "m")
    for n in range(MAX_LOG_EVENTS_PER_JOB + 10):
        now[0] = float(n)  # a line a second: every one is published
        emitter.emit_log(job, "m", f"line {n}")
    assert bus.last_id == MAX_LOG_EVENTS_PER_JOB + 10
    assert job.log_lines == len(job.events) == MAX_LOG_EVENTS_PER_JOB
    assert job.events[-1].data["line"] == f"line {MAX_LOG_EVENTS_PER_JOB - 1}"
