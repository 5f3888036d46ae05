"""Status never shows more on a device than it holds: a sleeping model being stopped
shows at its residue, not its full size (/metrics reads the same figures)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from switchd.states import ModelState
from tests.fakes import FakeRuntime, make_settings
from tests.test_scheduler import rig


def sleeper(size_gb: float) -> dict[str, Any]:
    return {"cmd": "engine", "size_gb": size_gb, "load_time_seconds": 30, "standby": ["sleep2"]}


@pytest.mark.parametrize(
    ("devices", "total_gb", "big", "other"),
    [(1, 95.59, 80.0, 60.0), (2, 48.0, 80.0, 60.0)],
)
async def test_a_sleeper_being_stopped_shows_at_its_residue(
    tmp_path: Path, devices: int, total_gb: float, big: float, other: float
) -> None:
    models = {"big": sleeper(big), "other": sleeper(other)}
    settings = make_settings(
        tmp_path,
        models,
        simulated_gpu={"total_gb": total_gb, "devices": devices, "sleep_residue_gb": 1.5},
    )
    runtime = FakeRuntime(stop_seconds=0.3)
    async with rig(settings, runtime) as r:
        for model in ("big", "other"):
            job = r.scheduler.request_switch(model)
            await asyncio.wait_for(job.done.wait(), 10)
            assert job.error is None
        assert r.scheduler.records["big"].state is ModelState.SLEEPING
        unload = r.scheduler.request_unload("big")
        seen: list[dict[str, Any]] = []
        while not unload.done.is_set():
            status = await r.scheduler.status()
            if status["models"]["big"]["status"] == "stopping":
                seen.append(status)
            await asyncio.sleep(0.02)
        assert unload.error is None
    assert seen, "never saw big stopping"
    for status in seen:
        for device in status["gpu"]["devices"]:
            shown = sum(device["models"].values())
            assert shown <= device["total_gb"] + 0.01, device  # was: 140 GB of 95.59
            assert device["models"]["big"] == round(1.5 / devices, 2)
