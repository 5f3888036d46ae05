"""The switch state machine against a recording fake runtime and the simulated GPU."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from switchd import progress
from switchd.config import Settings
from switchd.events import Event, EventBus
from switchd.gpu import ProcessMemory, SimulatedGpu
from switchd.jobs import Job, SwitchError
from switchd.runtime.base import EngineInfo
from switchd.scheduler import Scheduler
from switchd.states import ModelState
from switchd.stats import LearnedStats
from switchd.units import gib_to_bytes
from tests.fakes import FakeRuntime, make_settings


@dataclass
class Rig:
    scheduler: Scheduler
    runtime: FakeRuntime
    gpu: SimulatedGpu
    bus: EventBus
    settings: Settings


@asynccontextmanager
async def rig(
    settings: Settings, runtime: FakeRuntime | None = None, gpu: SimulatedGpu | None = None
) -> AsyncIterator[Rig]:
    runtime = runtime or FakeRuntime()
    gpu = gpu or SimulatedGpu(settings.simulated_gpu)
    bus = EventBus()
    stats = LearnedStats(settings.state_dir)
    await stats.load()
    async with httpx.AsyncClient(transport=runtime.transport()) as http:
        scheduler = Scheduler(
            settings, runtime=runtime, gpu=gpu, ledger=gpu, bus=bus, stats=stats, http=http
        )
        await scheduler.start()
        try:
            yield Rig(scheduler, runtime, gpu, bus, settings)
        finally:
            await scheduler.close()
            await runtime.close()


async def said(scheduler: Scheduler, model: str) -> str:
    """What a request for `model` is told of where it stands."""
    return progress.describe(await scheduler.standing(model))


async def finish(job: Job) -> list[Event]:
    await asyncio.wait_for(job.done.wait(), 10)
    return list(job.events)


def stages(events: list[Event]) -> list[str]:
    """Stage names with repeats of `loading`/`log` folded, for exact comparisons."""
    names: list[str] = []
    for event in events:
        if event.name in ("loading", "log") and names and names[-1] == event.name:
            continue
        names.append(event.name)
    return names


def by_stage(events: list[Event], name: str) -> dict[str, Any]:
    return dict(next(e.data for e in events if e.name == name))


def adopted(*names: str) -> list[EngineInfo]:
    return [EngineInfo(n, f"{n}#0", f"http://{n}.engine", time.time()) for n in names]


async def test_switch_into_free_memory_loads_without_unloading(tmp_path: Path) -> None:
    async with rig(make_settings(tmp_path)) as r:
        events = await finish(r.scheduler.request_switch("gpt-oss-20b"))
        assert stages(events) == ["memory_check", "start", "loading", "ready", "result"]
        check = by_stage(events, "memory_check")
        assert check["required_gb"] == 24.0
        assert check["available_gb"] == 95.59
        assert check["total_gb"] == 95.59
        assert check["to_unload"] == []
        assert check["enough"] is True
        assert by_stage(events, "ready")["gpu_memory_used_gb"] == 24.0
        assert r.runtime.calls == ["start gpt-oss-20b"]
        assert r.scheduler.records["gpt-oss-20b"].state is ModelState.RUNNING


async def test_seed_scenario_unloads_the_largest_and_measures_what_came_back(
    tmp_path: Path,
) -> None:
    runtime = FakeRuntime(adopted=adopted("gpt-oss-120b"))
    async with rig(make_settings(tmp_path), runtime) as r:
        job = r.scheduler.request_switch("gpt-oss-20b")
        events = await finish(job)
        assert stages(events) == [
            "memory_check",
            "unload",
            "unloaded",
            "freed",
            "start",
            "loading",
            "ready",
            "result",
        ]
        assert by_stage(events, "memory_check")["to_unload"] == ["gpt-oss-120b"]
        assert by_stage(events, "memory_check")["available_gb"] == 15.59
        assert by_stage(events, "unload")["expected_gb"] == 80.0
        assert by_stage(events, "unloaded")["freed_gb"] == 80.0
        assert by_stage(events, "freed")["available_gb"] == 95.59
        result = job.result
        assert result is not None
        assert result["unloaded_models"] == ["gpt-oss-120b"]
        assert result["memory_info"] == {
            "required_gb": 24.0,
            "available_before_gb": 15.59,
            "freed_gb": 80.0,
        }
        assert runtime.calls == ["stop gpt-oss-120b", "start gpt-oss-20b"]
        assert r.scheduler.records["gpt-oss-120b"].state is ModelState.EXITED


async def test_ids_increase_and_progress_never_decreases_and_ends_at_one(
    tmp_path: Path,
) -> None:
    runtime = FakeRuntime(adopted=adopted("gpt-oss-120b"), default_load_seconds=1.2)
    async with rig(make_settings(tmp_path), runtime) as r:
        events = await finish(r.scheduler.request_switch("gpt-oss-20b"))
        ids = [e.id for e in events]
        assert ids == sorted(ids)
        assert len(set(ids)) == len(ids)
        progress = [e.data["progress"] for e in events]
        assert progress == sorted(progress)
        assert progress[-1] == 1.0
        assert [e.data["seq"] for e in events] == list(range(1, len(events) + 1))
        loading = [e for e in events if e.name == "loading"]
        assert len(loading) >= 2, "loading is reported at least once a second"
        assert 0.3 <= loading[0].data["progress"] < loading[-1].data["progress"] < 0.99


async def test_already_running_target_answers_already_loaded(tmp_path: Path) -> None:
    runtime = FakeRuntime(adopted=adopted("gpt-oss-20b"))
    async with rig(make_settings(tmp_path), runtime) as r:
        job = r.scheduler.request_switch("20b")  # by alias
        events = await finish(job)
        assert stages(events) == ["result"]
        assert events[0].data["status"] == "already_loaded"
        assert events[0].data["progress"] == 1.0
        assert job.result is not None
        assert job.result["status"] == "already_loaded"
        assert runtime.calls == []


async def test_insufficient_memory_fails_and_unloads_nothing(tmp_path: Path) -> None:
    models = {
        "small": {"cmd": "e", "size_gb": 30},
        "pinned": {"cmd": "e", "size_gb": 60, "pinned": True},
        "big": {"cmd": "e", "size_gb": 40},
    }
    runtime = FakeRuntime(adopted=adopted("small", "pinned"))
    async with rig(make_settings(tmp_path, models), runtime) as r:
        job = r.scheduler.request_switch("big")
        events = await finish(job)
        assert stages(events) == ["memory_check", "error"]
        error = by_stage(events, "error")
        assert error["error"] == "insufficient_memory"
        assert error["required_gb"] == 40.0
        assert error["available_gb"] == 5.59
        assert error["freed_gb"] == 0.0
        assert error["total_available_gb"] == 35.59
        assert job.error is not None
        assert job.error.http_status == 409
        assert runtime.calls == []
        assert r.scheduler.records["small"].state is ModelState.RUNNING


async def test_pinned_models_are_never_unloaded_to_make_room(tmp_path: Path) -> None:
    models = {
        "pinned-big": {"cmd": "e", "size_gb": 50, "pinned": True},
        "other": {"cmd": "e", "size_gb": 20},
        "target": {"cmd": "e", "size_gb": 40},
    }
    runtime = FakeRuntime(adopted=adopted("pinned-big", "other"))
    async with rig(make_settings(tmp_path, models), runtime) as r:
        events = await finish(r.scheduler.request_switch("target"))
        assert by_stage(events, "memory_check")["to_unload"] == ["other"]
        assert runtime.calls == ["stop other", "start target"]


async def test_engine_that_exits_while_loading_fails_with_its_last_lines(
    tmp_path: Path,
) -> None:
    runtime = FakeRuntime(load_seconds={"gpt-oss-20b": 30})
    async with rig(make_settings(tmp_path), runtime) as r:
        job = r.scheduler.request_switch("gpt-oss-20b")
        await asyncio.wait_for(job.started.wait(), 5)
        runtime.print_line("gpt-oss-20b", "INFO loading weights")
        runtime.print_line("gpt-oss-20b", "ERROR CUDA out of memory")
        runtime.crash("gpt-oss-20b", code=1)
        events = await finish(job)
        assert stages(events) == ["memory_check", "start", "loading", "log", "error"]
        assert [e.data["line"] for e in events if e.name == "log"] == [
            "INFO loading weights",
            "ERROR CUDA out of memory",
        ]
        error = by_stage(events, "error")
        assert error["error"] == "engine_failed"
        assert error["exit_code"] == 1
        assert error["last_lines"] == ["INFO loading weights", "ERROR CUDA out of memory"]
        assert "ERROR CUDA out of memory" in error["message"]
        record = r.scheduler.records["gpt-oss-20b"]
        assert record.state is ModelState.FAILED
        assert record.error is not None
        assert "CUDA out of memory" in record.error


async def test_start_failure_fails_the_job_with_502(tmp_path: Path) -> None:
    runtime = FakeRuntime(fail_start={"gpt-oss-20b"})
    async with rig(make_settings(tmp_path), runtime) as r:
        job = r.scheduler.request_switch("gpt-oss-20b")
        events = await finish(job)
        assert stages(events) == ["memory_check", "error"]
        assert job.error is not None
        assert (job.error.code, job.error.http_status) == ("engine_failed", 502)
        assert r.scheduler.records["gpt-oss-20b"].state is ModelState.FAILED


async def test_engine_never_healthy_times_out_with_504_and_is_stopped(tmp_path: Path) -> None:
    runtime = FakeRuntime(load_seconds={"gpt-oss-20b": 60})
    settings = make_settings(tmp_path, health_timeout_seconds=0.5)
    async with rig(settings, runtime) as r:
        job = r.scheduler.request_switch("gpt-oss-20b")
        events = await finish(job)
        assert stages(events)[-1] == "error"
        assert job.error is not None
        assert (job.error.code, job.error.http_status) == ("health_timeout", 504)
        assert runtime.calls == ["start gpt-oss-20b", "stop gpt-oss-20b"]
        assert r.scheduler.records["gpt-oss-20b"].state is ModelState.FAILED


async def test_same_target_joins_and_other_target_queues_fifo(tmp_path: Path) -> None:
    runtime = FakeRuntime(default_load_seconds=0.3)
    async with rig(make_settings(tmp_path), runtime) as r:
        first = r.scheduler.request_switch("gpt-oss-20b")
        joined = r.scheduler.request_switch("20b")
        second = r.scheduler.request_switch("mistral-7b-v0.1")
        assert joined is first
        assert second is not first
        second_events = await finish(second)
        assert first.done.is_set()
        queued = second_events[0]
        assert queued.name == "queued"
        assert queued.data["position"] == 1
        assert queued.data["behind"] == "gpt-oss-20b"
        assert runtime.calls == ["start gpt-oss-20b", "start mistral-7b-v0.1"]
        assert first.events[-1].id < second_events[1].id


async def test_slow_memory_release_is_waited_for_and_measured(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, simulated_gpu={"total_gb": 95.59, "release_delay_seconds": 0.4}
    )
    runtime = FakeRuntime(adopted=adopted("gpt-oss-120b"))
    async with rig(settings, runtime) as r:
        events = await finish(r.scheduler.request_switch("gpt-oss-20b"))
        unloaded = by_stage(events, "unloaded")
        assert unloaded["freed_gb"] == 80.0
        assert unloaded["verified"] is True
        assert unloaded["seconds"] >= 0.4


async def test_memory_that_never_comes_back_is_reported_as_measured(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        simulated_gpu={"total_gb": 95.59, "release_delay_seconds": 30},
        memory_release_timeout_seconds=0.3,
    )
    runtime = FakeRuntime(adopted=adopted("gpt-oss-120b"))
    async with rig(settings, runtime) as r:
        events = await finish(r.scheduler.request_switch("gpt-oss-20b"))
        unloaded = by_stage(events, "unloaded")
        assert unloaded["verified"] is False
        assert unloaded["freed_gb"] == 0.0
        assert "had not come back" in unloaded["message"]
        assert by_stage(events, "freed")["freed_gb"] == 0.0


async def test_drain_waits_for_requests_in_flight_before_unloading(tmp_path: Path) -> None:
    runtime = FakeRuntime(adopted=adopted("gpt-oss-120b"))
    async with rig(make_settings(tmp_path), runtime) as r:
        async with r.scheduler.serving("gpt-oss-120b"):
            job = r.scheduler.request_switch("gpt-oss-20b")
            await asyncio.sleep(0.3)
            assert runtime.calls == [], "nothing stops while a request is in flight"
        events = await finish(job)
        assert stages(events)[:3] == ["memory_check", "drain", "unload"]
        drain = by_stage(events, "drain")
        assert (drain["victim"], drain["in_flight"]) == ("gpt-oss-120b", 1)
        assert drain["model"] == "gpt-oss-20b"
        assert runtime.calls == ["stop gpt-oss-120b", "start gpt-oss-20b"]


async def test_learned_load_time_and_footprint_survive_a_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    runtime = FakeRuntime(load_seconds={"gpt-oss-20b": 0.5})
    async with rig(settings, runtime) as r:
        before = await r.scheduler.status()
        assert before["models"]["gpt-oss-20b"]["estimated_load_time_seconds"] == 3.0
        await finish(r.scheduler.request_switch("gpt-oss-20b"))
        learned = (await r.scheduler.status())["models"]["gpt-oss-20b"]
        assert 0.5 <= learned["estimated_load_time_seconds"] < 1.5
    async with rig(settings, FakeRuntime()) as again:
        status = await again.scheduler.status()
        estimate = status["models"]["gpt-oss-20b"]["estimated_load_time_seconds"]
        assert estimate == learned["estimated_load_time_seconds"]
        events = await finish(again.scheduler.request_switch("gpt-oss-20b"))
        assert by_stage(events, "start")["estimated_load_time_seconds"] == estimate


async def test_engine_that_crashes_while_running_shows_failed(tmp_path: Path) -> None:
    runtime = FakeRuntime(adopted=adopted("gpt-oss-20b"))
    async with rig(make_settings(tmp_path), runtime) as r:
        subscription = r.bus.subscribe()
        runtime.lines["gpt-oss-20b"] = ["Segmentation fault"]
        runtime.crash("gpt-oss-20b", code=139)
        event = await asyncio.wait_for(anext(aiter(subscription)), 5)
        assert event.name == "model_state"
        assert dict(event.data) == {
            "model": "gpt-oss-20b",
            "from": "running",
            "to": "failed",
            "error": "exited with code 139 outside switchd:\nSegmentation fault",
            "ts": event.data["ts"],  # when: every event carries it
        }
        status = await r.scheduler.status()
        assert status["models"]["gpt-oss-20b"]["status"] == "failed"
        assert status["gpu"]["used_gb"] == 0.0


async def test_unload_all_spares_pinned_models(tmp_path: Path) -> None:
    models = {
        "a": {"cmd": "e", "size_gb": 10},
        "b": {"cmd": "e", "size_gb": 20},
        "keep": {"cmd": "e", "size_gb": 5, "pinned": True},
    }
    runtime = FakeRuntime(adopted=adopted("a", "b", "keep"))
    async with rig(make_settings(tmp_path, models), runtime) as r:
        job = r.scheduler.request_unload("all")
        events = await finish(job)
        assert stages(events) == ["unload", "unloaded", "unload", "unloaded", "freed", "result"]
        assert job.result is not None
        assert job.result["unloaded_models"] == ["a", "b"]
        assert job.result["freed_gb"] == 30.0
        assert r.scheduler.records["keep"].state is ModelState.RUNNING
        again = r.scheduler.request_unload("a")
        await finish(again)
        assert again.result is not None
        assert again.result["status"] == "not_loaded"
        assert again.result["message"] == "Nothing to unload: a is not running"
        everything = r.scheduler.request_unload("all")  # only the pinned one is left
        events = await finish(everything)
        assert everything.result == {
            "status": "not_loaded",
            "job": everything.id,
            "unloaded_models": [],
            "freed_gb": 0.0,
            "message": "Nothing to unload: no unpinned model is loaded",
        }
        assert events[-1].data["message"] == "Nothing to unload: no unpinned model is loaded"


def test_unknown_model_is_refused_before_any_job(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with rig(make_settings(tmp_path)) as r:
            with pytest.raises(Exception, match="Unknown model 'nope'") as info:
                r.scheduler.request_switch("nope")
            assert getattr(info.value, "http_status", None) == 404

    asyncio.run(scenario())


async def test_ensure_returns_once_running_and_raises_the_jobs_error(tmp_path: Path) -> None:
    runtime = FakeRuntime(fail_start={"mistral-7b-v0.1"})
    async with rig(make_settings(tmp_path), runtime) as r:
        await asyncio.wait_for(r.scheduler.ensure("20b"), 5)
        assert r.scheduler.records["gpt-oss-20b"].state is ModelState.RUNNING
        await asyncio.wait_for(r.scheduler.ensure("gpt-oss-20b"), 1)  # already running
        assert runtime.calls == ["start gpt-oss-20b"]
        with pytest.raises(SwitchError) as failure:
            await asyncio.wait_for(r.scheduler.ensure("mistral-7b-v0.1"), 5)
        # A request waiting for a load that fails gets a 503 to retry later.
        assert (failure.value.code, failure.value.http_status) == ("load_failed", 503)
        assert failure.value.retry_after_seconds == 10


async def test_closing_fails_the_running_and_queued_jobs(tmp_path: Path) -> None:
    runtime = FakeRuntime(default_load_seconds=30)
    async with rig(make_settings(tmp_path), runtime) as r:
        running = r.scheduler.request_switch("gpt-oss-20b")
        queued = r.scheduler.request_switch("mistral-7b-v0.1")
        await asyncio.wait_for(running.started.wait(), 5)
        await r.scheduler.close()
        for job in (running, queued):
            assert job.done.is_set()
            assert job.error is not None
            assert job.error.code == "shutting_down"
            assert job.events[-1].name == "error"


async def test_serving_loads_on_demand_and_counts_the_request_in_flight(tmp_path: Path) -> None:
    async with rig(make_settings(tmp_path)) as r:
        async with r.scheduler.serving("20b") as engine:
            record = r.scheduler.records["gpt-oss-20b"]
            assert engine.model == "gpt-oss-20b"
            assert record.state is ModelState.RUNNING
            assert record.in_flight == 1
        assert record.in_flight == 0
        assert record.last_used > 0


async def test_serving_without_auto_switch_refuses_with_503(tmp_path: Path) -> None:
    async with rig(make_settings(tmp_path, auto_switch=False)) as r:
        with pytest.raises(SwitchError) as refused:
            async with r.scheduler.serving("gpt-oss-20b"):
                pass
        assert (refused.value.code, refused.value.http_status) == ("model_not_loaded", 503)
        assert refused.value.retry_after_seconds == 3
        assert r.runtime.calls == []


def ttl_models(ttl: float) -> dict[str, Any]:
    return {"m": {"cmd": "e", "size_gb": 10, "ttl_seconds": ttl}}


async def wait_for_state(r: Rig, model: str, state: ModelState, within: float) -> None:
    async with asyncio.timeout(within):
        while r.scheduler.records[model].state is not state:  # noqa: ASYNC110 - polling a state in a test
            await asyncio.sleep(0.02)


async def test_ttl_unloads_an_idle_model_but_never_one_in_use(tmp_path: Path) -> None:
    async with rig(make_settings(tmp_path, ttl_models(0.3))) as r:
        async with r.scheduler.serving("m"):
            await asyncio.sleep(1.2)  # well past the TTL, but a request is in flight
            assert r.scheduler.records["m"].state is ModelState.RUNNING
        started = time.monotonic()
        await wait_for_state(r, "m", ModelState.EXITED, within=3)
        assert time.monotonic() - started >= 0.3, "idle is counted from the last request"
        assert r.runtime.calls == ["start m", "stop m"]


async def test_a_request_racing_a_ttl_unload_waits_for_a_clean_reload(tmp_path: Path) -> None:
    runtime = FakeRuntime(stop_seconds=0.5)
    async with rig(make_settings(tmp_path, ttl_models(0.2)), runtime) as r:
        await r.scheduler.ensure("m")
        await wait_for_state(r, "m", ModelState.STOPPING, within=3)
        async with asyncio.timeout(5), r.scheduler.serving("m") as engine:
            assert r.scheduler.records["m"].state is ModelState.RUNNING
            assert engine.instance == "m#2", "served by the reloaded engine"
        assert runtime.calls == ["start m", "stop m", "start m"]


async def test_a_victim_that_dies_while_draining_does_not_fail_the_switch(
    tmp_path: Path,
) -> None:
    runtime = FakeRuntime(adopted=adopted("gpt-oss-120b"))
    async with rig(make_settings(tmp_path), runtime) as r:
        async with r.scheduler.serving("gpt-oss-120b"):
            job = r.scheduler.request_switch("gpt-oss-20b")
            await asyncio.sleep(0.1)  # the job drains gpt-oss-120b
            runtime.crash("gpt-oss-120b", code=1)
            await asyncio.sleep(0.1)
        events = await finish(job)
        assert job.error is None
        assert stages(events)[:4] == ["memory_check", "drain", "unload", "unloaded"]
        unloaded = by_stage(events, "unloaded")
        assert unloaded["freed_gb"] == 0.0
        assert "had already exited" in unloaded["message"]
        assert r.scheduler.records["gpt-oss-20b"].state is ModelState.RUNNING


async def test_an_explicit_unload_joining_a_ttl_unload_always_unloads(tmp_path: Path) -> None:
    models = {
        "a": {"cmd": "e", "size_gb": 10, "ttl_seconds": 0.8},
        "slow": {"cmd": "e", "size_gb": 10},
    }
    runtime = FakeRuntime(adopted=adopted("a"), load_seconds={"slow": 2.0})
    async with rig(make_settings(tmp_path, models), runtime) as r:
        busy = r.scheduler.request_switch("slow")  # holds the worker while the TTL job queues
        await asyncio.sleep(1.6)
        async with r.scheduler.serving("a"):
            pass  # used again: the TTL job alone would keep it
        explicit = r.scheduler.request_unload("a")
        await finish(busy)
        await finish(explicit)
        assert explicit.result is not None
        assert explicit.result["status"] == "success"
        assert r.scheduler.records["a"].state is ModelState.EXITED


async def test_each_waiter_gets_its_own_copy_of_the_jobs_error(tmp_path: Path) -> None:
    runtime = FakeRuntime(fail_start={"gpt-oss-20b"})
    async with rig(make_settings(tmp_path), runtime) as r:
        errors = await asyncio.gather(
            *(r.scheduler.ensure("gpt-oss-20b") for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(e, SwitchError) and e.code == "load_failed" for e in errors)
        assert len({id(e) for e in errors}) == 3


class HookedGpu(SimulatedGpu):
    """A simulated GPU that runs `hook` inside a snapshot: the await a race needs."""

    hook: Any = None

    async def snapshot(self) -> Any:
        if self.hook is not None:
            await self.hook()
        return await super().snapshot()


async def test_race_engine_exit_while_ready_is_measured_is_not_lost(tmp_path: Path) -> None:
    runtime = FakeRuntime(load_seconds={"gpt-oss-20b": 0.2})
    settings = make_settings(tmp_path)
    gpu = HookedGpu(settings.simulated_gpu)  # the race needs an await just after health
    async with rig(settings, runtime, gpu) as r:
        record = r.scheduler.records["gpt-oss-20b"]

        async def crash_once_healthy() -> None:
            ready = runtime.ready_at.get("gpt-oss-20b")
            if record.state is ModelState.LOADING and ready and time.monotonic() >= ready:
                gpu.hook = None
                runtime.crash("gpt-oss-20b", code=137)
                await asyncio.sleep(0.05)  # the runtime's report arrives during the await

        gpu.hook = crash_once_healthy
        job = r.scheduler.request_switch("gpt-oss-20b")
        await finish(job)
        await asyncio.sleep(0.1)
        assert job.error is not None
        assert job.error.code == "engine_failed"
        assert record.state is ModelState.FAILED


async def test_race_victim_exit_before_stopping_does_not_fail_the_switch(tmp_path: Path) -> None:
    runtime = FakeRuntime(adopted=adopted("gpt-oss-120b"))
    settings = make_settings(tmp_path)
    gpu = HookedGpu(settings.simulated_gpu)
    async with rig(settings, runtime, gpu) as r:
        victim = r.scheduler.records["gpt-oss-120b"]
        calls = 0

        async def crash_on_second_snapshot() -> None:
            nonlocal calls
            calls += 1
            if calls == 2 and victim.state is ModelState.RUNNING:  # the unload's own read
                runtime.crash("gpt-oss-120b", code=1)
                await asyncio.sleep(0.05)

        gpu.hook = crash_on_second_snapshot
        job = r.scheduler.request_switch("gpt-oss-20b")
        await finish(job)
        assert job.error is None, job.error
        assert r.scheduler.records["gpt-oss-20b"].state is ModelState.RUNNING


# ---- several clients at once ------------------------------------------------------

CONTENDED = {"min_residency_seconds": 0.2, "max_hold_seconds": 0.5}
# Learned or configured load times set the residency: keep them short here.
QUICK = {
    "gpt-oss-120b": {"cmd": "e", "size_gb": 80, "load_time_seconds": 0.1},
    "gpt-oss-20b": {"cmd": "e", "size_gb": 24, "load_time_seconds": 0.1},
}


async def test_concurrent_demand_for_two_models_that_do_not_fit_is_served_in_two_loads(
    tmp_path: Path,
) -> None:
    runtime = FakeRuntime(default_load_seconds=0.1)
    async with rig(make_settings(tmp_path, QUICK, **CONTENDED), runtime) as r:
        seen: list[tuple[str, str]] = []

        async def request(model: str) -> None:
            async with r.scheduler.serving(model) as engine:
                record = r.scheduler.records[model]
                # Admitted means in flight on a running engine: it cannot be gone.
                assert record.state is ModelState.RUNNING
                assert record.engine == engine
                assert record.in_flight >= 1
                await asyncio.sleep(0.05)
                assert r.scheduler.records[model].engine == engine
                seen.append((model, engine.instance))

        models = ["gpt-oss-120b", "gpt-oss-20b"] * 5
        await asyncio.wait_for(asyncio.gather(*(request(m) for m in models)), 10)
        assert sorted(m for m, _ in seen) == sorted(models)
        assert runtime.calls == ["start gpt-oss-120b", "stop gpt-oss-120b", "start gpt-oss-20b"]
        assert r.scheduler.waiting == 0
        assert all(record.in_flight == 0 for record in r.scheduler.records.values())


async def test_a_busy_model_keeps_the_gpu_for_its_hold_then_makes_room(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, QUICK, min_residency_seconds=0.1, max_hold_seconds=0.6)
    runtime = FakeRuntime(adopted=adopted("gpt-oss-120b"))
    async with rig(settings, runtime) as r:
        async with r.scheduler.serving("gpt-oss-120b"):
            started = time.monotonic()
            waiting = asyncio.create_task(r.scheduler.ensure("gpt-oss-20b"))
            await asyncio.sleep(0.3)
            status = await r.scheduler.status()
            small = status["models"]["gpt-oss-20b"]
            assert (small["waiting"], status["waiting"]) == (1, 1)
            assert small["oldest_wait_seconds"] >= 0.25
            assert runtime.calls == [], "within the hold: nothing is unloaded"
            await asyncio.sleep(0.5)  # past the hold: the big model is now draining
            assert r.scheduler.records["gpt-oss-120b"].draining
            assert r.scheduler.records["gpt-oss-120b"].state is ModelState.RUNNING
        await asyncio.wait_for(waiting, 5)
        assert time.monotonic() - started >= 0.6
        assert runtime.calls == ["stop gpt-oss-120b", "start gpt-oss-20b"]


async def test_people_waiting_hear_where_their_model_stands_in_line(tmp_path: Path) -> None:
    models = {  # no two of them fit together
        "x": {"cmd": "e", "size_gb": 60, "load_time_seconds": 2},
        "y": {"cmd": "e", "size_gb": 55, "load_time_seconds": 2},
        "z": {"cmd": "e", "size_gb": 45, "load_time_seconds": 3},
    }
    settings = make_settings(tmp_path, models, min_residency_seconds=30, max_hold_seconds=30)
    async with rig(settings, FakeRuntime(adopted=adopted("x"))) as r:
        async with r.scheduler.serving("x"):  # x is busy and within its hold
            waiting = [asyncio.create_task(r.scheduler.ensure("y")) for _ in range(2)]
            await asyncio.sleep(0.05)
            waiting += [asyncio.create_task(r.scheduler.ensure("z")) for _ in range(3)]
            await asyncio.sleep(0.05)
            assert await said(r.scheduler, "y") == (
                "y is exited; x serves other requests first; 2 request(s) wait for it, "
                "the first for 0 s; next in line; loading it takes about 2 s"
            )
            assert await said(r.scheduler, "z") == (
                "z is exited; x serves other requests first; 3 request(s) wait for it, "
                "the first for 0 s; in line behind y, wanted earlier; loading it takes "
                "about 3 s"
            )
            # An operator's switches: to z (under way: x drains), then to y (queued).
            r.scheduler.request_switch("z")
            r.scheduler.request_switch("y")
            assert "; its switch is queued behind z; " in await said(r.scheduler, "y")
            await asyncio.sleep(0.05)  # the switch to z begins: x drains (it is busy)
            assert "; its switch is next in the queue; " in await said(r.scheduler, "y")
            assert "; switchd is switching to z (" in await said(r.scheduler, "z")
            assert "line" not in await said(r.scheduler, "z"), "its own switch is under way"
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
        assert r.scheduler.waiting == 0


async def test_a_model_that_fits_beside_those_serving_is_told_it_loads_now(
    tmp_path: Path,
) -> None:
    runtime = FakeRuntime(adopted=adopted("gpt-oss-20b", "mistral-7b-v0.1"))
    async with rig(make_settings(tmp_path), runtime) as r:
        # 24 + 18 GB run; 40 more fit beside them on the 95.59 GB card.
        assert await said(r.scheduler, "deepseek-coder-33b-instruct") == (
            "deepseek-coder-33b-instruct is exited; it fits beside gpt-oss-20b, "
            "mistral-7b-v0.1: it loads now; next in line; loading it takes about 30 s"
        )
        # gpt-oss-120b (80 GB) does not: they serve first, as the policy holds them.
        assert await said(r.scheduler, "gpt-oss-120b") == (
            "gpt-oss-120b is exited; gpt-oss-20b, mistral-7b-v0.1 serves other requests "
            "first; next in line; loading it takes about 8 s"
        )


async def test_a_model_that_can_never_fit_fails_its_waiters_with_409(
    tmp_path: Path,
) -> None:
    models = {
        "base": {"cmd": "e", "size_gb": 60, "pinned": True},
        "huge": {"cmd": "e", "size_gb": 40},  # 60 + 40 > 95.59, and base never goes
        "small": {"cmd": "e", "size_gb": 10},
    }
    async with rig(make_settings(tmp_path, models), FakeRuntime(adopted=adopted("base"))) as r:
        results = await asyncio.gather(
            *(r.scheduler.ensure("huge") for _ in range(3)),
            r.scheduler.ensure("small"),
            return_exceptions=True,
        )
        for error in results[:3]:
            assert isinstance(error, SwitchError)
            assert (error.code, error.http_status) == ("insufficient_memory", 409)
            assert error.fields["required_gb"] == 40.0
        assert results[3] is None
        assert r.runtime.calls == ["start small"]


async def test_a_waiter_whose_client_leaves_gives_up_its_place(tmp_path: Path) -> None:
    runtime = FakeRuntime(default_load_seconds=0.3)
    async with rig(make_settings(tmp_path), runtime) as r:
        leaving = asyncio.create_task(r.scheduler.ensure("gpt-oss-20b"))
        staying = asyncio.create_task(r.scheduler.ensure("gpt-oss-20b"))
        await asyncio.sleep(0.1)
        assert r.scheduler.waiting == 2
        leaving.cancel()
        await asyncio.sleep(0)
        assert r.scheduler.waiting == 1
        await asyncio.wait_for(staying, 5)
        assert r.scheduler.records["gpt-oss-20b"].in_flight == 0


async def test_a_failed_load_cools_down_and_an_explicit_switch_clears_it(tmp_path: Path) -> None:
    runtime = FakeRuntime(fail_start={"gpt-oss-20b"})
    async with rig(make_settings(tmp_path, load_failure_cooldown_seconds=30), runtime) as r:
        with pytest.raises(SwitchError):
            await r.scheduler.ensure("gpt-oss-20b")
        with pytest.raises(SwitchError) as refused:
            await r.scheduler.ensure("gpt-oss-20b")
        assert (refused.value.code, refused.value.http_status) == ("load_failed", 503)
        assert 29 <= (refused.value.retry_after_seconds or 0) <= 30
        assert runtime.calls == ["start gpt-oss-20b"], "not restarted per request"
        status = (await r.scheduler.status())["models"]["gpt-oss-20b"]
        assert status["failures"] == 1
        assert status["cooldown_until"] is not None
        runtime.fail_start.clear()
        await finish(r.scheduler.request_switch("gpt-oss-20b"))
        assert runtime.calls == ["start gpt-oss-20b", "start gpt-oss-20b"]
        status = (await r.scheduler.status())["models"]["gpt-oss-20b"]
        assert (status["failures"], status["cooldown_until"]) == (0, None)


async def test_queued_jobs_say_their_position_and_what_is_ahead(tmp_path: Path) -> None:
    runtime = FakeRuntime(default_load_seconds=0.2)
    async with rig(make_settings(tmp_path), runtime) as r:
        first = r.scheduler.request_switch("gpt-oss-20b")
        second = r.scheduler.request_switch("mistral-7b-v0.1")
        third = r.scheduler.request_unload("gpt-oss-20b")
        await finish(third)
        ahead_of_second = by_stage(second.events, "queued")
        assert (ahead_of_second["position"], ahead_of_second["ahead"]) == (1, ["gpt-oss-20b"])
        queued = by_stage(third.events, "queued")
        assert (queued["position"], queued["behind"], queued["ahead"]) == (
            2,
            "gpt-oss-20b",
            ["gpt-oss-20b", "mistral-7b-v0.1"],
        )
        assert (queued["kind"], queued["cause"]) == ("unload", "explicit")
        assert first.result is not None


async def test_only_the_scheduler_s_tasks_change_model_state(tmp_path: Path) -> None:
    async with rig(make_settings(tmp_path)) as r:
        record = r.scheduler.records["gpt-oss-20b"]
        with pytest.raises(AssertionError, match="outside the scheduler's tasks"):
            r.scheduler.catalog.transition(record, ModelState.EXITED, ModelState.LOADING)
        assert record.state is ModelState.EXITED


# ---- learned footprints that survive faults ------------------------------------------


async def test_a_footprint_is_not_learned_while_another_engine_dies_during_the_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's repro: mistral dies 0.2 s into a load of a big model; free memory
    rises by mistral's 18 GB meanwhile, which must not be taken for the big one's."""
    models = {
        "big": {"cmd": "e", "size_gb": 70},
        "mistral-7b-v0.1": {"cmd": "e", "size_gb": 18},  # 88 GB together: both fit
    }
    runtime = FakeRuntime(adopted=adopted("mistral-7b-v0.1"), load_seconds={"big": 0.6})
    async with rig(make_settings(tmp_path, models), runtime) as r:
        job = r.scheduler.request_switch("big")
        await asyncio.wait_for(job.started.wait(), 5)
        await asyncio.sleep(0.2)
        runtime.crash("mistral-7b-v0.1", code=137)
        with caplog.at_level(logging.INFO, logger="switchd.loading"):
            events = await finish(job)
        assert by_stage(events, "ready")["gpu_memory_used_gb"] is None
        assert "footprint of big not learned" in caplog.text
        learned = LearnedStats(r.settings.state_dir)
        await learned.load()
        assert learned.get("big").samples == ()
        assert learned.get("big").loads == 1
        status = await r.scheduler.status()
        assert status["models"]["big"]["status"] == "running"
        assert status["models"]["mistral-7b-v0.1"]["status"] == "failed"
        # Planned with what it is known to need, not with the 52 GB the window showed.
        assert r.scheduler.catalog.held_gb(r.scheduler.records["big"]) == 70.0


async def test_a_clean_load_learns_its_footprint_from_free_memory(tmp_path: Path) -> None:
    async with rig(make_settings(tmp_path)) as r:
        events = await finish(r.scheduler.request_switch("gpt-oss-20b"))
        assert by_stage(events, "ready")["gpu_memory_used_gb"] == 24.0


class ProcessGpu(SimulatedGpu):
    """A simulated card that also reports per-process figures, as NVML does."""

    processes: tuple[Any, ...] = ()

    async def snapshot(self) -> Any:
        taken = await super().snapshot()
        return dataclasses.replace(taken, processes=self.processes)


async def test_per_process_figures_of_the_engines_pids_win(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    gpu = ProcessGpu(settings.simulated_gpu)
    # The engine's PID (4242, the fake runtime's) holds 21.5 GB on device 0; another
    # process's memory on the card is not the engine's.
    gpu.processes = (
        ProcessMemory(4242, 0, gib_to_bytes(21.5)),
        ProcessMemory(999, 0, gib_to_bytes(30)),
    )
    async with rig(settings, FakeRuntime(), gpu) as r:
        events = await finish(r.scheduler.request_switch("gpt-oss-20b"))
        assert by_stage(events, "ready")["gpu_memory_used_gb"] == 21.5


async def test_an_implausibly_small_sample_is_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The card's ledger says 24 GB for gpt-oss-20b; a window showing 5 GB is dropped.
    models = {"gpt-oss-20b": {"cmd": "e", "size_gb": 24}}
    settings = make_settings(tmp_path, models)
    gpu = HookedGpu(settings.simulated_gpu)
    runtime = FakeRuntime()

    async def release_something_unseen() -> None:
        ready = runtime.ready_at.get("gpt-oss-20b")
        if ready is not None and time.monotonic() >= ready:  # the read after health:
            gpu.hook = None  # 19 GB came back, and nothing said why
            gpu.engine_stopped("gpt-oss-20b")
            gpu.engine_started("gpt-oss-20b", gib_to_bytes(5), None)

    gpu.hook = release_something_unseen
    async with rig(settings, runtime, gpu) as r:
        with caplog.at_level(logging.WARNING, logger="switchd.loading"):
            events = await finish(r.scheduler.request_switch("gpt-oss-20b"))
        assert by_stage(events, "ready")["gpu_memory_used_gb"] is None
        assert (
            "footprint of gpt-oss-20b not learned from this load: an implausible sample: "
            "5.00 GB measured, about 24.00 GB expected"
        ) in caplog.text
