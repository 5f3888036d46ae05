"""Loads beside the running job: a waited-for model that needs no room loads at once,
in a job of its own, and takes nothing the running job's target counts on, nor
what another load beside has reserved; memory moves one way at a time on a
device; release figures stay the victim's own."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from switchd.gpu import DeviceMemory, GpuSnapshot, ProcessMemory
from switchd.states import ModelState
from switchd.steps import taken_meanwhile
from switchd.units import gib_to_bytes
from tests.fakes import FakeRuntime, make_settings
from tests.test_engine_calls import HungSleep
from tests.test_releasing import outcome, until
from tests.test_scheduler import adopted, rig

MODELS: dict[str, Any] = {
    "big": {"cmd": "engine", "size_gb": 60, "load_time_seconds": 5},
    "v": {"cmd": "engine", "size_gb": 60, "load_time_seconds": 1},
    "t": {"cmd": "engine", "size_gb": 40, "load_time_seconds": 1},
    "a": {"cmd": "engine", "size_gb": 30, "load_time_seconds": 1},
    "b": {"cmd": "engine", "size_gb": 30, "load_time_seconds": 1},
    "u": {"cmd": "engine", "size_gb": 5, "load_time_seconds": 1},
}


def slow_big() -> FakeRuntime:
    return FakeRuntime(load_seconds={"big": 1.5, "a": 0.1, "b": 0.1, "u": 0.1})


# v can sleep (level 2): a switch away from it asks it to.
SLEEPY = {**MODELS, "v": {**MODELS["v"], "standby": ["sleep2"]}}


def hung(tmp_path: Path, call_timeout: float, **load_seconds: float) -> HungSleep:
    """v (60 GB) runs and hangs in /sleep when a switch to t (40 GB) asks it to."""
    return HungSleep(tmp_path, SLEEPY, call_timeout, load_seconds)


async def test_a_small_model_waits_for_an_engine_starting_on_its_device(tmp_path: Path) -> None:
    # u (5) fits beside big (60), but does not start while big's engine starts: an
    # engine sizes its cache from free memory as it starts.
    runtime = slow_big()
    async with rig(make_settings(tmp_path, MODELS), runtime) as r:
        switch = r.scheduler.request_switch("big")
        await until(lambda: r.scheduler.records["big"].state is ModelState.LOADING)
        async with r.scheduler.serving("u") as engine:
            assert engine.model == "u"
        assert await outcome(switch) is None
        ready = next(e for e in switch.events if e.name == "ready")
        small = next(j for j in r.scheduler.recent_jobs(5) if j.target == "u")
        assert small.events[0].id > ready.id
        assert runtime.calls == ["start big", "start u"]
        assert (await r.scheduler.status())["gpu"]["used_gb"] == 65.0


async def test_loads_beside_reserve_their_memory_from_one_another(tmp_path: Path) -> None:
    # v (60) hangs in its sleep for t (40). a and b (30 each) are both wanted: 35.59
    # GB are free now, room for one of them; the other waits for the switch.
    card = hung(tmp_path, call_timeout=30, a=0.1, b=0.1)
    async with card.scheduler() as scheduler:
        switch = scheduler.request_switch("t")
        await asyncio.wait_for(card.hung.wait(), 5)
        wanted = {m: asyncio.create_task(scheduler.ensure(m)) for m in ("a", "b")}
        await asyncio.wait_for(asyncio.wait(wanted.values(), return_when="FIRST_COMPLETED"), 5)
        first = "a" if wanted["a"].done() else "b"
        other = "b" if first == "a" else "a"
        status = await scheduler.status()
        assert card.runtime.calls == [f"start {first}"]
        assert status["models"][other]["status"] == "exited"
        assert not wanted[other].done()
        assert switch.finished is None
        assert status["gpu"]["used_gb"] == 90.0
        wanted[other].cancel()
        await asyncio.gather(wanted[other], return_exceptions=True)


async def test_two_loads_beside_on_one_device_start_one_after_the_other(
    tmp_path: Path,
) -> None:
    # v (60) hangs in its sleep for t (40); u and w (5 each) both fit beside: w starts
    # once u's engine is up, not with it.
    models = {**SLEEPY, "w": {"cmd": "engine", "size_gb": 5, "load_time_seconds": 1}}
    card = HungSleep(tmp_path, models, 30, {"u": 0.5, "w": 0.1})
    async with card.scheduler() as scheduler:
        switch = scheduler.request_switch("t")
        await asyncio.wait_for(card.hung.wait(), 5)
        both = [asyncio.create_task(scheduler.ensure(m)) for m in ("u", "w")]
        await asyncio.wait_for(asyncio.gather(*both), 5)
        assert switch.finished is None  # both while the sleep hangs
        jobs = {j.target: j for j in scheduler.recent_jobs(5)}
        ready = next(e for e in jobs["u"].events if e.name == "ready")
        assert jobs["w"].events[0].id > ready.id
        assert card.runtime.calls == ["start u", "start w"]


async def test_engines_dying_beside_and_in_the_hung_sleep_fail_only_their_own_requests(
    tmp_path: Path,
) -> None:
    # v (60) hangs in its sleep for t (40); u (5) loads beside, and several clients
    # want it. u's engine dies mid-load, then v's dies in its hung sleep: u's waiters
    # get a load failure, the switch ends with t loaded, and nothing is left running.
    card = hung(tmp_path, call_timeout=30, u=5.0)
    async with card.scheduler() as scheduler:
        switch = scheduler.request_switch("t")
        await asyncio.wait_for(card.hung.wait(), 5)
        waiters = [asyncio.create_task(scheduler.ensure("u")) for _ in range(3)]
        await until(lambda: scheduler.records["u"].state is ModelState.LOADING)
        card.runtime.crash("u")
        outcomes = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 5)
        assert [getattr(o, "code", o) for o in outcomes] == ["load_failed"] * 3
        assert switch.finished is None  # the switch still waits on v's sleep
        card.runtime.crash("v")
        card.never.set()  # the hung call ends as its engine does
        assert await outcome(switch) is None
        assert scheduler.records["t"].state is ModelState.RUNNING
        assert {m: scheduler.records[m].state for m in ("u", "v")} == {
            "u": ModelState.FAILED,
            "v": ModelState.FAILED,
        }
        status = await scheduler.status()
        assert status["beside"] == []
        assert status["gpu"]["used_gb"] == 40.0


async def test_status_lists_a_load_beside_and_an_operator_switch_joins_it(
    tmp_path: Path,
) -> None:
    card = hung(tmp_path, call_timeout=2, u=1.0)
    async with card.scheduler() as scheduler:
        switch = scheduler.request_switch("t")
        await asyncio.wait_for(card.hung.wait(), 5)
        waiting = asyncio.create_task(scheduler.ensure("u"))
        await until(lambda: scheduler.records["u"].state is ModelState.LOADING)
        beside = scheduler.request_switch("u")
        status = await scheduler.status()
        assert status["beside"] == [
            {
                "id": beside.id,
                "target": "u",
                "stage": "loading",
                "progress": round(beside.progress, 3),
            }
        ]
        assert status["switch"]["target"] == "t"
        # An unload of a model loading beside waits for its load, then stops it.
        unload = scheduler.request_unload("u")
        assert await outcome(beside) is None
        await waiting
        assert await outcome(switch) is None
        assert await outcome(unload) is None
        assert unload.result is not None
        assert unload.result["unloaded_models"] == ["u"]
        assert card.runtime.calls == ["start u", "stop v", "start t", "stop u"]


async def test_a_release_measured_while_a_load_starts_beside_is_the_victim_s_own(
    tmp_path: Path,
) -> None:
    # t (40) replaces v (60), which falls asleep in 1 s; u (5) starts meanwhile,
    # beside. v gives back 58.5 GB (it keeps a 1.5 GB residue), not 53.5.
    card = hung(tmp_path, call_timeout=30, u=0.1)
    async with card.scheduler() as scheduler:
        switch = scheduler.request_switch("t")
        await asyncio.wait_for(card.hung.wait(), 5)
        asyncio.get_running_loop().call_later(1.0, card.never.set)  # the sleep answers
        await asyncio.wait_for(scheduler.ensure("u"), 5)
        assert switch.finished is None  # v is still falling asleep
        assert await outcome(switch) is None
        slept = next(e for e in switch.events if e.name == "slept")
        assert (slept.data["freed_gb"], slept.data["verified"]) == (58.5, True)
        assert card.runtime.calls == ["start u", "start t"]


async def test_a_load_beside_waits_while_memory_is_on_its_way_back(tmp_path: Path) -> None:
    # v (60) is stopped for t (40), and its memory takes 1 s to come back: u (5) would
    # fit, but an engine starting as free memory grows may abort (vLLM's profiling).
    settings = make_settings(
        tmp_path,
        MODELS,
        simulated_gpu={"total_gb": 95.59, "release_delay_seconds": 1.0},
        memory_release_timeout_seconds=5,
    )
    runtime = FakeRuntime(adopted=adopted("v"), load_seconds={"u": 0.1})
    async with rig(settings, runtime) as r:
        switch = r.scheduler.request_switch("t")
        await until(lambda: r.scheduler.records["v"].state is ModelState.EXITED)
        await asyncio.wait_for(r.scheduler.ensure("u"), 5)
        assert await outcome(switch) is None
        beside = next(j for j in r.scheduler.recent_jobs(5) if j.target == "u")
        unloaded = next(e for e in switch.events if e.name == "unloaded")
        assert beside.events[0].id > unloaded.id  # u started once v's memory was back
        assert unloaded.data["freed_gb"] == 60.0
        assert runtime.calls[0] == "stop v"
        assert sorted(runtime.calls[1:]) == ["start t", "start u"]


async def test_a_switch_puts_no_victim_away_while_an_engine_starts_beside(
    tmp_path: Path,
) -> None:
    # v's /sleep hangs and is given up after 0.3 s; u (5) is loading beside (1 s):
    # v is stopped only once u has started, not while it sizes itself.
    card = hung(tmp_path, call_timeout=0.3, u=1.0)
    async with card.scheduler() as scheduler:
        switch = scheduler.request_switch("t")
        await asyncio.wait_for(card.hung.wait(), 5)
        await asyncio.wait_for(scheduler.ensure("u"), 5)
        assert await outcome(switch) is None
        beside = next(j for j in scheduler.recent_jobs(5) if j.target == "u")
        ready = next(e for e in beside.events if e.name == "ready")
        unloaded = next(e for e in switch.events if e.name == "unloaded")
        assert ready.id < unloaded.id
        assert card.runtime.calls == ["start u", "stop v", "start t"]


def card(used_gb: float, processes: tuple[ProcessMemory, ...] = ()) -> GpuSnapshot:
    total = gib_to_bytes(80)
    return GpuSnapshot("nvml", (DeviceMemory(0, "GPU", total, gib_to_bytes(used_gb)),), processes)


def test_what_others_took_in_a_release_window_is_read_per_process_where_named() -> None:
    victim_before, other_before = ProcessMemory(1, 0, gib_to_bytes(40)), ProcessMemory(2, 0, 0)
    before = card(40, (victim_before, other_before))
    # The victim's process shrank to nothing; a new engine (pid 3) and pid 2 grew.
    now = card(12, (ProcessMemory(2, 0, gib_to_bytes(4)), ProcessMemory(3, 0, gib_to_bytes(8))))
    assert taken_meanwhile(before, now, {0: 30.0}) == {0: gib_to_bytes(12)}


def test_without_process_figures_engines_started_count_at_their_expected_share() -> None:
    assert taken_meanwhile(card(40), card(10), {0: 5.0, 1: 2.5}) == {
        0: gib_to_bytes(5.0),
        1: gib_to_bytes(2.5),
    }


async def test_a_switch_that_needs_a_model_loading_beside_waits_for_its_load(
    tmp_path: Path,
) -> None:
    # v (60) hangs in its sleep for t (40); a (30) loads beside. whole (95) fits the
    # 95.59 GB card only once t and a are gone too: an operator's switch to it is not
    # told "never fits" (409) while a loads; it waits for the loads and is served.
    models = {**SLEEPY, "whole": {"cmd": "engine", "size_gb": 95, "load_time_seconds": 1}}
    card = HungSleep(tmp_path, models, 0.5, {"a": 1.0, "whole": 0.1})
    async with card.scheduler() as scheduler:
        switch = scheduler.request_switch("t")
        await asyncio.wait_for(card.hung.wait(), 5)
        beside = asyncio.create_task(scheduler.ensure("a"))
        await until(lambda: scheduler.records["a"].state is ModelState.LOADING)
        await scheduler.check_fits("whole")  # was: 409, a counted as pinned
        operator = scheduler.request_switch("whole")
        await beside
        assert await outcome(switch) is None
        assert await outcome(operator) is None
        calls = card.runtime.calls
        assert calls[:3] == ["start a", "stop v", "start t"]
        assert sorted(calls[3:5]) == ["stop a", "stop t"]
        assert calls[5:] == ["start whole"]


async def test_on_two_gpus_a_load_beside_keeps_off_what_the_switch_placed(
    tmp_path: Path,
) -> None:
    # Two 47.79 GB GPUs. p (30, GPU 0) and q (40, GPU 1) run; the switch to s (40,
    # GPU 0) stops p. Meanwhile r0 (10, GPU 0) fits GPU 0 now (17.79 GB free) but not
    # beside s (7.79 GB left): it waits. r1 (5, GPU 1) loads beside at once.
    models = {
        "p": {"cmd": "engine", "size_gb": 30, "gpus": [0]},
        "q": {"cmd": "engine", "size_gb": 40, "gpus": [1]},
        "s": {"cmd": "engine", "size_gb": 40, "gpus": [0]},
        "r0": {"cmd": "engine", "size_gb": 10, "gpus": [0]},
        "r1": {"cmd": "engine", "size_gb": 5, "gpus": [1]},
    }
    settings = make_settings(
        tmp_path,
        models,
        simulated_gpu={"total_gb": 47.79, "devices": 2, "release_delay_seconds": 1.0},
        memory_release_timeout_seconds=5,
    )
    runtime = FakeRuntime(adopted=adopted("p", "q"), load_seconds={"s": 0.5, "r1": 0.1})
    async with rig(settings, runtime) as r:
        switch = r.scheduler.request_switch("s")
        await until(lambda: r.scheduler.records["p"].state is ModelState.EXITED)
        on_zero = asyncio.create_task(r.scheduler.ensure("r0"))
        await asyncio.wait_for(r.scheduler.ensure("r1"), 5)
        assert switch.finished is None  # p's memory is still coming back
        assert not on_zero.done()
        assert r.scheduler.records["r0"].state is ModelState.EXITED
        assert await outcome(switch) is None
        assert runtime.calls == ["stop p", "start r1", "start s"]
        devices = (await r.scheduler.status())["gpu"]["devices"]
        assert [d["models"] for d in devices] == [{"s": 40.0}, {"q": 40.0, "r1": 5.0}]
        on_zero.cancel()
        await asyncio.gather(on_zero, return_exceptions=True)
