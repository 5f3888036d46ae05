"""The catalog's figures: what a model holds, what is free, what could be unloaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from switchd.catalog import Catalog, overlaps
from switchd.events import EventBus
from switchd.gpu import DeviceMemory, GpuSnapshot, SimulatedGpu
from switchd.states import ModelState
from switchd.stats import LearnedStats
from switchd.units import gib_to_bytes
from tests.fakes import make_settings

TWO_DEVICES = {"total_gb": 80, "devices": 2}
MODELS = {
    "a": {"cmd": "e", "size_gb": 40, "load_time_seconds": 12, "gpus": [0]},
    "b": {"cmd": "e", "size_gb": 20, "gpus": [1]},
    "c": {"cmd": "e", "size_gb": 10, "pinned": True},
}


def snapshot(used_gb: tuple[float, float]) -> GpuSnapshot:
    total = gib_to_bytes(80)
    return GpuSnapshot(
        "simulated",
        tuple(DeviceMemory(i, "GPU", total, gib_to_bytes(gb)) for i, gb in enumerate(used_gb)),
    )


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    settings = make_settings(tmp_path, MODELS, simulated_gpu=TWO_DEVICES)
    return Catalog(
        settings, LearnedStats(settings.state_dir), SimulatedGpu(settings.simulated_gpu), EventBus()
    )


async def test_learned_figures_win_over_configured_ones(tmp_path: Path, catalog: Catalog) -> None:
    a = catalog.records["a"]
    assert catalog.estimated_load_seconds(a.spec) == 12.0
    assert catalog.held_gb(a) == 40.0
    stats = LearnedStats(make_settings(tmp_path, MODELS, simulated_gpu=TWO_DEVICES).state_dir)
    await stats.record("a", 7.25, 36.5)
    settings = make_settings(tmp_path, MODELS, simulated_gpu=TWO_DEVICES)
    learned = Catalog(settings, stats, SimulatedGpu(settings.simulated_gpu), EventBus())
    assert learned.estimated_load_seconds(a.spec) == 7.25
    assert learned.held_gb(learned.records["a"]) == 36.5
    learned.records["a"].measured_gb = 35.0
    assert learned.held_gb(learned.records["a"]) == 35.0


def test_loading_models_not_yet_measured_are_reserved_on_their_devices(
    catalog: Catalog,
) -> None:
    spec_a = catalog.records["a"].spec
    assert catalog.available_gb(snapshot((0, 0)), spec_a) == 80.0
    catalog.records["a"].state = ModelState.LOADING  # the driver does not show it yet
    assert catalog.available_gb(snapshot((0, 0)), spec_a) == 40.0
    assert catalog.available_gb(snapshot((0, 0)), catalog.records["b"].spec) == 80.0
    catalog.records["a"].measured_gb = 38.0  # measured: the driver's figure is right
    assert catalog.available_gb(snapshot((38, 0)), spec_a) == 42.0


def test_candidates_are_the_active_models_sharing_a_device(catalog: Catalog) -> None:
    for name in ("a", "b", "c"):
        catalog.records[name].state = ModelState.RUNNING
    target = catalog.records["a"].spec
    assert [(c.name, c.held_gb, c.pinned) for c in catalog.candidates(target)] == [
        ("c", 10.0, True)
    ]
    assert overlaps(catalog.records["b"].spec, catalog.records["c"].spec)
    assert not overlaps(catalog.records["a"].spec, catalog.records["b"].spec)


def test_model_json_reports_measured_memory_only_while_active(catalog: Catalog) -> None:
    a = catalog.records["a"]
    a.measured_gb = 38.0
    assert catalog.model_json(a)["gpu_memory_used_gb"] is None  # exited
    a.state = ModelState.RUNNING
    body = catalog.model_json(a)
    assert (body["status"], body["gpu_memory_used_gb"], body["health"]) == (
        "running",
        38.0,
        "healthy",
    )
    assert body["gpus"] == [0]
    assert catalog.model_json(catalog.records["c"])["gpus"] == "all"
