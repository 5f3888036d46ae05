"""The host-RAM budget of level-1 sleeps, while a level-1 sleeper wakes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from switchd.states import ModelState
from tests.fakes import FakeRuntime, make_settings
from tests.test_scheduler import rig


async def test_a_waking_targets_own_level_1_charge_leaves_the_budget(tmp_path: Path) -> None:
    # 50 GB of host RAM for level-1 sleeps; each model keeps 40 GB of weights there.
    level1: dict[str, Any] = {"cmd": "engine", "size_gb": 60, "load_time_seconds": 30}
    level1 |= {"standby": ["sleep1"], "weights_gb": 40}
    settings = make_settings(tmp_path, {"a": level1, "b": level1}, standby_host_ram_gb=50)
    async with rig(settings, FakeRuntime()) as r:
        for model in ("a", "b", "a"):
            job = r.scheduler.request_switch(model)
            await asyncio.wait_for(job.done.wait(), 10)
            assert job.error is None
        b = r.scheduler.records["b"]
        # was: stopped, "40.00 GB of host RAM ... 10.00 GB of the standby budget is left"
        assert b.state is ModelState.SLEEPING
        assert b.host_ram_gb == 40
        assert r.scheduler.catalog.host_ram_in_use_gb() == 40
