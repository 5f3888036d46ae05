"""Memory on its way back (an engine stopping, or just dead) is memory that is coming:
a model that fits the card once it is back waits for it, never a 409 "never fits"."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from switchd.jobs import Job, SwitchError
from switchd.states import ModelState
from tests.fakes import FakeRuntime, make_settings
from tests.test_scheduler import adopted, rig

MODELS: dict[str, Any] = {
    "a": {"cmd": "engine", "size_gb": 50, "load_time_seconds": 1},
    "b": {"cmd": "engine", "size_gb": 60, "load_time_seconds": 1},
    "c": {"cmd": "engine", "size_gb": 50, "load_time_seconds": 1},
}


def settings(tmp_path: Path, delay: float) -> Any:
    return make_settings(
        tmp_path,
        MODELS,
        simulated_gpu={"total_gb": 95.59, "release_delay_seconds": delay},
        memory_release_timeout_seconds=delay + 2,
    )


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 - model states have no event to await
            await asyncio.sleep(0.005)


async def outcome(job: Job) -> str | None:
    await asyncio.wait_for(job.done.wait(), 15)
    return None if job.error is None else job.error.code


async def test_an_operator_switch_during_a_slow_release_is_not_refused(tmp_path: Path) -> None:
    # b (60 GB) replaces a (50 GB), whose memory takes a while to come back; a switch
    # to c (50 GB) arrives meanwhile: c fits the 95.59 GB card once b goes.
    runtime = FakeRuntime(adopted=adopted("a"))
    async with rig(settings(tmp_path, 0.6), runtime) as r:
        first = r.scheduler.request_switch("b")
        await until(lambda: r.scheduler.records["a"].state is ModelState.EXITED)
        await r.scheduler.check_fits("c")  # was: 409 "only 45.59 GB would be free"
        second = r.scheduler.request_switch("c")
        assert await outcome(first) is None
        assert await outcome(second) is None
        assert r.scheduler.records["c"].state is ModelState.RUNNING


async def test_a_request_just_after_an_engine_died_waits_for_its_memory(tmp_path: Path) -> None:
    runtime = FakeRuntime(adopted=adopted("a"))
    async with rig(settings(tmp_path, 0.6), runtime) as r:
        runtime.crash("a")
        await until(lambda: r.scheduler.records["a"].state is ModelState.FAILED)
        await asyncio.sleep(0.1)
        await r.scheduler.check_fits("b")
        async with r.scheduler.serving("b") as engine:  # was: 409 at once
            assert engine.model == "b"
        free = (await r.gpu.snapshot()).free_by_device()[0]
        assert round(free / 2**30, 2) == 35.59  # a's memory came back; b holds its 60


async def test_switches_back_and_forth_are_never_refused(tmp_path: Path) -> None:
    async with rig(settings(tmp_path, 0.2), FakeRuntime(default_load_seconds=0.02)) as r:
        jobs = []
        for i in range(24):
            name = "a" if i % 2 else "b"
            await r.scheduler.check_fits(name)  # was: 409 while the other one stops
            jobs.append(r.scheduler.request_switch(name))
            await asyncio.sleep(0.05)
        codes = await asyncio.gather(*(outcome(job) for job in jobs))
        assert [code for code in codes if code is not None] == []


async def test_concurrent_switch_checks_all_pass_while_memory_comes_back(tmp_path: Path) -> None:
    runtime = FakeRuntime(adopted=adopted("a"))
    async with rig(settings(tmp_path, 0.5), runtime) as r:
        first = r.scheduler.request_switch("b")
        await until(lambda: r.scheduler.records["a"].state is ModelState.EXITED)
        checks = await asyncio.gather(
            *(r.scheduler.check_fits(n) for n in ["a", "b", "c"] * 100), return_exceptions=True
        )
        assert [c for c in checks if c is not None] == []
        assert await outcome(first) is None


async def test_a_model_that_cannot_fit_beside_a_pinned_one_is_still_refused_at_once(
    tmp_path: Path,
) -> None:
    # p (40 GB) is pinned; b (60 GB) cannot fit beside it even once a's memory is back.
    models = {**MODELS, "p": {"cmd": "engine", "size_gb": 40, "pinned": True}}
    runtime = FakeRuntime(adopted=adopted("p", "a"))
    tight = make_settings(
        tmp_path, models, simulated_gpu={"total_gb": 95.59, "release_delay_seconds": 0.5}
    )
    async with rig(tight, runtime) as r:
        runtime.crash("a")
        await until(lambda: r.scheduler.records["a"].state is ModelState.FAILED)
        with pytest.raises(SwitchError) as refused:
            await r.scheduler.check_fits("b")
        assert refused.value.code == "insufficient_memory"
        assert refused.value.fields["total_available_gb"] == 55.59


async def test_a_switch_during_a_slow_sleep_release_is_not_refused(tmp_path: Path) -> None:
    # a (60 GB) is put to sleep (it keeps 1.5 GB, learned) to make room for b; while
    # its memory comes back, a switch to c (50 GB) is checked: c fits once b goes.
    models = {**MODELS, "a": {**MODELS["a"], "size_gb": 60, "standby": ["sleep2"]}}
    models["a"]["load_time_seconds"] = 30
    state = tmp_path / "state"
    state.mkdir()
    (state / "learned.json").write_text('{"a": {"residue_samples": [1.5]}}', encoding="utf-8")
    runtime = FakeRuntime(adopted=adopted("a"))
    slow = make_settings(
        tmp_path,
        models,
        simulated_gpu={"total_gb": 95.59, "release_delay_seconds": 0.6, "sleep_residue_gb": 1.5},
        memory_release_timeout_seconds=3,
    )
    async with rig(slow, runtime) as r:
        first = r.scheduler.request_switch("b")
        await until(lambda: r.scheduler.records["a"].state is ModelState.SLEEPING)
        await r.scheduler.check_fits("c")  # was: 409, 37.09 GB would be free
        second = r.scheduler.request_switch("c")
        assert await outcome(first) is None
        assert await outcome(second) is None
