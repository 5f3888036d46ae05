"""Runtime reports are applied only by the task that owns their model: a job acting on
a model never finds its state changed by another job's wait."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from switchd.catalog import Catalog
from switchd.emitter import Emitter
from switchd.events import EventBus
from switchd.inbox import Inbox
from switchd.runtime.base import EngineExited, EngineInfo
from switchd.states import ModelState
from switchd.stats import LearnedStats
from tests.fakes import make_settings

MODELS = {
    "a": {"cmd": "engine", "size_gb": 10},
    "b": {"cmd": "engine", "size_gb": 10},
}


def died(model: str) -> EngineExited:
    return EngineExited(model, f"{model}#1", 137, "was killed (SIGKILL)", ())


async def test_a_report_waits_for_the_task_that_owns_its_model(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, MODELS)
    bus = EventBus()
    catalog = Catalog(settings, LearnedStats(settings.state_dir), None, bus)
    inbox = Inbox(catalog, Emitter(bus))
    for name in MODELS:
        engine = EngineInfo(name, f"{name}#1", f"http://{name}.engine", time.time())
        catalog.transition(catalog.records[name], ModelState.EXITED, ModelState.LOADING)
        catalog.transition(
            catalog.records[name], ModelState.LOADING, ModelState.RUNNING, engine=engine
        )
    turn = asyncio.Event()

    async def owner() -> None:  # a job acting on `a`, busy until its turn
        await turn.wait()
        inbox.apply()

    async def ended() -> None:  # a job that acted on `b` and is over
        pass

    job, gone = asyncio.create_task(owner()), asyncio.create_task(ended())
    await gone
    owners = {"a": job, "b": gone}
    inbox.owner_of = owners.get
    inbox.deliver(died("a"))
    inbox.deliver(died("b"))
    inbox.apply()  # another task: a is the job's; b's job has ended, so anyone's
    assert [catalog.records[m].state for m in ("a", "b")] == [
        ModelState.RUNNING,
        ModelState.FAILED,
    ]
    turn.set()
    await job  # the job applies its own
    assert [catalog.records[m].state for m in ("a", "b")] == [ModelState.FAILED] * 2
