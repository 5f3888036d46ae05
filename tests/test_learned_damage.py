"""A damaged learned.json costs only the figures it damages: every figure read back
is checked (finite, positive, within the card and the model's size) and a bad one
dropped with one warning; start-up, planning and status never break."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from switchd.app import create_app
from switchd.gpu import SimulatedGpu
from switchd.stats import FILE_NAME, Learned, LearnedStats
from tests.fakes import FakeRuntime, make_settings
from tests.test_scheduler import rig

MODELS: dict[str, Any] = {
    "big": {"cmd": "engine", "size_gb": 80, "load_time_seconds": 2},
    "small": {"cmd": "engine", "size_gb": 24, "load_time_seconds": 2},
}


def damage(tmp_path: Path, raw: str) -> None:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    (state / FILE_NAME).write_text(raw, encoding="utf-8")


@pytest.mark.parametrize(
    ("raw", "dropped"),
    [
        ('{"big": {"loads": 1e999, "load_seconds": 3}}', "loads"),
        ('{"big": {"load_seconds": NaN, "loads": 2}}', "load_seconds"),
        ('{"big": {"load_seconds": Infinity, "loads": 2}}', "load_seconds"),
        ('{"big": {"load_seconds": -4, "loads": 2}}', "load_seconds"),
        ('{"big": {"footprint_gb": -70, "samples": [-70], "loads": 2}}', "footprint_gb"),
        ('{"big": {"footprint_gb": NaN, "samples": [NaN], "loads": 2}}', "footprint_gb"),
        ('{"big": {"wake_seconds": {"sleep1": Infinity}, "loads": 2}}', "wake_seconds"),
        ('{"big": {"residue_samples": [-1, NaN], "loads": 2}}', "residue_samples"),
        ('{"big": {"device_samples": [0, -3], "loads": 2}}', "device_samples"),
    ],
)
async def test_a_bad_figure_is_dropped_with_one_warning(
    tmp_path: Path, raw: str, dropped: str, caplog: pytest.LogCaptureFixture
) -> None:
    damage(tmp_path, raw)
    stats = LearnedStats(tmp_path / "state")
    with caplog.at_level(logging.WARNING, logger="switchd.stats"):
        await stats.load()  # was: OverflowError for 1e999, and switchd did not start
    learned = stats.get("big")
    assert learned.footprint_gb is None
    assert learned.samples == ()
    assert learned.device_samples == ()
    assert learned.residue_samples == ()
    assert learned.wake_seconds == {}
    assert learned.loads in (0, 2)
    assert learned.load_seconds in (None, 3.0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"big.{dropped}" in warnings[0]


async def test_a_file_nested_too_deep_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    damage(tmp_path, '{"big": ' + "[" * 100_000 + "]" * 100_000 + "}")
    stats = LearnedStats(tmp_path / "state")
    with caplog.at_level(logging.WARNING, logger="switchd.stats"):
        await stats.load()  # was: RecursionError, and switchd did not start
    assert stats.get("big") == Learned()
    assert "ignoring unreadable" in caplog.text


@pytest.mark.parametrize(
    "raw",
    [
        '{"big": {"footprint_gb": 1e308, "samples": [1e308], "loads": 1}}',
        '{"big": {"footprint_gb": 200, "samples": [200], "device_samples": [200], "loads": 1}}',
        '{"big": {"footprint_gb": 3, "samples": [3], "loads": 1}}',
        '{"big": {"residue_samples": [500], "loads": 1}}',
    ],
)
async def test_a_figure_beyond_the_card_or_the_models_size_is_dropped(
    tmp_path: Path, raw: str, caplog: pytest.LogCaptureFixture
) -> None:
    damage(tmp_path, raw)
    with caplog.at_level(logging.WARNING, logger="switchd.stats"):
        async with rig(make_settings(tmp_path, MODELS)) as r:
            learned = r.scheduler.catalog._stats.get("big")
            assert learned.samples == ()
            assert learned.footprint_gb is None
            assert learned.residue_samples == ()
            job = r.scheduler.request_switch("big")  # was: 409 for ever with 1e308
            await job.done.wait()
            assert job.error is None
    assert "learned.json" in caplog.text


async def test_a_negative_footprint_never_lets_two_models_overcommit_the_card(
    tmp_path: Path,
) -> None:
    damage(tmp_path, '{"big": {"footprint_gb": -70, "samples": [-70], "loads": 1}}')
    async with rig(make_settings(tmp_path, MODELS)) as r:
        for model in ("small", "big"):
            job = r.scheduler.request_switch(model)
            await job.done.wait()
            assert job.error is None
        running = [n for n, rec in r.scheduler.records.items() if rec.state.value == "running"]
        assert running == ["big"]  # 80 + 24 do not fit 95.59 together


@pytest.mark.parametrize("raw", ['{"big": {"load_seconds": Infinity, "footprint_gb": NaN}}'])
async def test_status_and_switches_answer_with_a_damaged_file(tmp_path: Path, raw: str) -> None:
    damage(tmp_path, raw)
    settings = make_settings(tmp_path, MODELS)
    runtime = FakeRuntime()
    gpu = SimulatedGpu(settings.simulated_gpu)
    app = create_app(settings, runtime=runtime, gpu=gpu, http_transport=runtime.transport())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://switchd") as http:
            status = await http.get("/v1/models/status")
            assert status.status_code == 200  # was: 500 with Infinity
            assert status.json()["models"]["big"]["estimated_load_time_seconds"] == 2
            switched = await http.post("/v1/models/switch", params={"target_model": "big"})
            assert switched.status_code == 200, switched.text  # was: 500 with NaN
