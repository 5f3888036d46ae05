"""Every call to an engine is bounded: a hung /sleep falls back to a stop within
engine_call_timeout_seconds, and nothing that fits without the hung engine waits
for it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
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


class HungSleep:
    """A card with `v` (60 GB, sleep mode) running, whose engine never answers /sleep."""

    def __init__(
        self,
        tmp_path: Path,
        models: dict[str, Any],
        call_timeout: float,
        load_seconds: dict[str, float] | None = None,
    ) -> None:
        self.runtime = FakeRuntime(adopted=adopted("v"), load_seconds=load_seconds or {})
        self.health = self.runtime.transport()
        self.hung = asyncio.Event()
        self.never = asyncio.Event()
        self.log: list[str] = []
        self.settings = make_settings(tmp_path, models, engine_call_timeout_seconds=call_timeout)
        self.gpu = SimulatedGpu(self.settings.simulated_gpu)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/sleep":
            self.log.append("sleep called")
            self.hung.set()
            await self.never.wait()  # an engine whose /sleep never answers
        return await self.health.handle_async_request(request)

    @contextlib.asynccontextmanager
    async def scheduler(self) -> AsyncIterator[Scheduler]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(self.handle)) as http:
            scheduler = Scheduler(
                self.settings,
                runtime=self.runtime,
                gpu=self.gpu,
                ledger=self.gpu,
                bus=EventBus(),
                stats=LearnedStats(self.settings.state_dir),
                http=http,
            )
            await scheduler.start()
            try:
                yield scheduler
            finally:
                self.never.set()
                await scheduler.close()
                await self.runtime.close()


async def test_a_hung_sleep_falls_back_to_a_stop_within_the_call_timeout(tmp_path: Path) -> None:
    card = HungSleep(tmp_path, MODELS, call_timeout=0.5)
    async with card.scheduler() as scheduler:
        switch = scheduler.request_switch("t")
        await asyncio.wait_for(card.hung.wait(), 5)
        started = time.monotonic()
        async with asyncio.timeout(10):  # was: the sleep call's 120 s
            await switch.done.wait()
        assert time.monotonic() - started < 5
        assert switch.error is None
        assert card.runtime.calls == ["stop v", "start t"]  # the fallback: v stopped
        assert scheduler.records["v"].state is ModelState.EXITED
        unload = next(e for e in switch.events if e.name == "unload")
        assert "its sleep failed" in unload.data["message"]
        assert "timed out after 0.5 s" in unload.data["message"]


async def test_what_fits_without_the_hung_engine_loads_while_the_sleep_hangs(
    tmp_path: Path,
) -> None:
    # 95.59 GB: v holds 60 and hangs in its sleep; t (90) takes its place. u (5) fits
    # beside v and t both; w (40) only once v is gone; x (30) fits beside v now, but
    # not beside t (95.59 - 90 < 30): both must wait for the switch.
    models = {
        **MODELS,
        "t": {"cmd": "engine", "size_gb": 90, "load_time_seconds": 1},
        "w": {"cmd": "engine", "size_gb": 40, "load_time_seconds": 1},
        "x": {"cmd": "engine", "size_gb": 30, "load_time_seconds": 1},
    }
    card = HungSleep(tmp_path, models, call_timeout=30)
    async with card.scheduler() as scheduler:
        switch = scheduler.request_switch("t")
        await asyncio.wait_for(card.hung.wait(), 5)
        stuck = [asyncio.create_task(scheduler.ensure(m)) for m in ("w", "x")]
        async with asyncio.timeout(5):  # the sleep hangs for 30 s
            async with scheduler.serving("u") as engine:
                card.log.append(f"{engine.model} served")
                status = await scheduler.status()
        assert card.log == ["sleep called", "u served"]
        assert switch.finished is None
        assert not card.never.is_set()
        assert status["switch"]["target"] == "t"
        assert status["beside"] == []
        assert status["models"]["u"]["status"] == "running"
        # Neither w nor x was started: each needs memory that t counts on.
        assert card.runtime.calls == ["start u"]
        assert not any(task.done() for task in stuck)
        assert status["gpu"]["used_gb"] == 65.0
        card.never.set()  # the sleep answers at last: the switch goes on
        async with asyncio.timeout(10):
            await switch.done.wait()
        assert switch.error is None
        assert scheduler.records["t"].state is ModelState.RUNNING
        for task in stuck:
            task.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)


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
