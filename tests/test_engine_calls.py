"""Every call to an engine is bounded: a hung /sleep falls back to a stop within
engine_call_timeout_seconds, and the scheduler moves on."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from switchd.config import ModelSpec, Tier
from switchd.events import EventBus
from switchd.gpu import SimulatedGpu
from switchd.scheduler import Scheduler
from switchd.standby import EngineStandby
from switchd.states import ModelState
from switchd.stats import LearnedStats
from tests.fakes import FakeRuntime, make_settings
from tests.test_scheduler import adopted

MODELS: dict[str, Any] = {
    "v": {"cmd": "engine", "size_gb": 60, "load_time_seconds": 30, "standby": ["sleep2"]},
    "t": {"cmd": "engine", "size_gb": 40, "load_time_seconds": 1},
    "u": {"cmd": "engine", "size_gb": 5, "load_time_seconds": 1},
}


async def test_a_hung_sleep_falls_back_to_a_stop_and_the_scheduler_moves_on(
    tmp_path: Path,
) -> None:
    runtime = FakeRuntime(adopted=adopted("v"))
    health = runtime.transport()
    hung = asyncio.Event()
    never = asyncio.Event()
    log: list[str] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/sleep":
            log.append("sleep called")
            hung.set()
            await never.wait()  # an engine whose /sleep never answers
        return await health.handle_async_request(request)

    settings = make_settings(tmp_path, MODELS, engine_call_timeout_seconds=0.5)
    gpu = SimulatedGpu(settings.simulated_gpu)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as http:
        scheduler = Scheduler(
            settings,
            runtime=runtime,
            gpu=gpu,
            ledger=gpu,
            bus=EventBus(),
            stats=LearnedStats(settings.state_dir),
            http=http,
        )
        await scheduler.start()
        try:
            switch = scheduler.request_switch("t")
            await asyncio.wait_for(hung.wait(), 5)
            started = time.monotonic()
            async with asyncio.timeout(10):  # was: the sleep call's 120 s
                async with scheduler.serving("u"):
                    log.append("u served")
                await switch.done.wait()
            assert time.monotonic() - started < 5
            assert switch.error is None
            assert log == ["sleep called", "u served"]
            assert runtime.calls[:2] == ["stop v", "start t"]  # the fallback: v stopped
            assert scheduler.records["v"].state is ModelState.EXITED
            unload = next(e for e in switch.events if e.name == "unload")
            assert "its sleep failed" in unload.data["message"]
            assert "timed out after 0.5 s" in unload.data["message"]
        finally:
            never.set()
            await scheduler.close()
            await runtime.close()


async def test_is_sleeping_on_a_hung_engine_is_bounded_by_the_call_timeout() -> None:
    never = asyncio.Event()

    async def handle(request: httpx.Request) -> httpx.Response:
        await never.wait()
        raise AssertionError("unreachable")

    spec = ModelSpec(name="m", size_gb=10.0, standby=(Tier.SLEEP2,))
    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as http:
        standby = EngineStandby(http, 0.2)
        async with asyncio.timeout(3):  # was: httpx's per-read 5 s, unbounded as a whole
            assert await standby.is_sleeping(spec, "http://m.engine") is None
    never.set()
