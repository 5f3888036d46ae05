"""The catalog's figures: what a model holds, what is free, what could be unloaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from switchd.catalog import Catalog, ModelRecord
from switchd.config import Tier
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
    assert catalog.available_by_device(snapshot((0, 0))) == {0: 80.0, 1: 80.0}
    catalog.records["a"].state = ModelState.LOADING  # the driver does not show it yet
    assert catalog.available_by_device(snapshot((0, 0))) == {0: 40.0, 1: 80.0}
    catalog.records["c"].state = ModelState.LOADING  # on every device: 5 GB each
    assert catalog.available_by_device(snapshot((0, 0))) == {0: 35.0, 1: 75.0}
    catalog.records["a"].measured_gb = 38.0  # measured: the driver's figure is right
    # The smaller of the driver's free figure (42) and total minus reservations (75).
    assert catalog.available_by_device(snapshot((38, 0))) == {0: 42.0, 1: 75.0}
    assert catalog.available_gb(snapshot((38, 0)), (0, 1)) == 117.0


def test_what_a_model_holds_is_split_over_its_devices_unless_measured_there(
    catalog: Catalog,
) -> None:
    c = catalog.records["c"]
    assert catalog.held_by_device(c, (0, 1)) == {0: 5.0, 1: 5.0}
    c.devices = (1,)  # placed on one device
    assert catalog.held_by_device(c, (0, 1)) == {1: 10.0}
    c.measured_by_device = {1: 9.5}
    assert catalog.held_by_device(c, (0, 1)) == {1: 9.5}


async def test_a_per_device_need_learned_or_configured_beats_an_even_split(
    tmp_path: Path,
) -> None:
    models = {**MODELS, "d": {"cmd": "e", "size_gb": 40, "gb_per_device": 24}}
    settings = make_settings(tmp_path, models, simulated_gpu=TWO_DEVICES)
    stats = LearnedStats(settings.state_dir)
    catalog = Catalog(settings, stats, SimulatedGpu(settings.simulated_gpu), EventBus())
    d = catalog.records["d"].spec
    assert catalog.need(d, (0, 1)).per_device_gb == 24.0  # configured
    await stats.record("d", 1.0, 41.0, 25.5)  # measured: the fullest device held 25.5
    assert catalog.need(d, (0, 1)).per_device_gb == 25.5
    assert catalog.need(catalog.records["c"].spec, (0, 1)).per_device_gb == 5.0  # split


def test_a_models_need_is_per_device(catalog: Catalog) -> None:
    need = catalog.need(catalog.records["a"].spec, (0, 1))
    assert (need.per_device_gb, need.fixed, need.count) == (40.0, (0,), 1)
    spanning = catalog.need(catalog.records["c"].spec, (0, 1))
    assert (spanning.per_device_gb, spanning.fixed, spanning.count) == (5.0, None, 2)


def test_candidates_are_the_active_models_with_what_they_hold_where(catalog: Catalog) -> None:
    for name in ("a", "b", "c"):
        catalog.records[name].state = ModelState.RUNNING
    target = catalog.records["a"].spec
    assert [(c.name, dict(c.held_gb), c.pinned) for c in catalog.candidates(target, (0, 1))] == [
        ("b", {1: 20.0}, False),
        ("c", {0: 5.0, 1: 5.0}, True),
    ]


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


# ---- sleeping models ------------------------------------------------------------------

SLEEPERS = {
    "tp": {"cmd": "e", "size_gb": 40, "load_time_seconds": 30, "standby": ["sleep1", "sleep2"]},
    "solo": {"cmd": "e", "size_gb": 20, "load_time_seconds": 5, "gpus": [0]},
}


@pytest.fixture
def sleepers(tmp_path: Path) -> Catalog:
    settings = make_settings(tmp_path, SLEEPERS, simulated_gpu=TWO_DEVICES)
    return Catalog(
        settings, LearnedStats(settings.state_dir), SimulatedGpu(settings.simulated_gpu), EventBus()
    )


def put_to_sleep(record: ModelRecord, residue: dict[int, float] | None) -> None:
    record.state, record.asleep, record.devices = ModelState.SLEEPING, Tier.SLEEP1, (0, 1)
    record.residue_by_device = residue


async def test_an_unmeasured_wake_is_guessed_cheap_and_level_2_never_below_level_1(
    sleepers: Catalog,
) -> None:
    spec = sleepers.records["tp"].spec
    # The documented figures, capped at a tenth of the 30 s cold load.
    assert sleepers.estimated_wake_seconds(spec, Tier.SLEEP1) == 1.0
    assert sleepers.estimated_wake_seconds(spec, Tier.SLEEP2) == 3.0
    solo = sleepers.records["solo"].spec
    assert sleepers.estimated_wake_seconds(solo, Tier.SLEEP1) == 0.5
    stats = sleepers._stats
    await stats.record_wake("tp", "sleep1", 4.0)
    assert sleepers.estimated_wake_seconds(spec, Tier.SLEEP1) == 4.0
    # Level 2 reloads what level 1 kept: unmeasured, it is not guessed faster.
    assert sleepers.estimated_wake_seconds(spec, Tier.SLEEP2) == 4.0
    await stats.record_wake("tp", "sleep2", 2.5)
    assert sleepers.estimated_wake_seconds(spec, Tier.SLEEP2) == 2.5


def test_a_sleeper_holds_its_measured_residue_and_wakes_for_the_rest(sleepers: Catalog) -> None:
    record = sleepers.records["tp"]
    put_to_sleep(record, {0: 1.0, 1: 2.5})
    assert sleepers.held_by_device(record, (0, 1)) == {0: 1.0, 1: 2.5}
    assert sleepers.estimated_ready_seconds(record) == 1.0  # a wake, not the 30 s load
    # It wakes where it sleeps and needs its share less the residue, the smallest one:
    # no device is promised more than it has.
    need = sleepers.need(record.spec, (0, 1))
    assert (need.per_device_gb, need.fixed, need.count) == (19.0, (0, 1), 2)
    body = sleepers.model_json(record)
    assert body["status"] == "sleeping"
    assert body["gpu_memory_used_gb"] == 3.5
    assert body["devices"] == [0, 1]
    assert {k: body["sleep"][k] for k in ("tier", "level", "residue_gb")} == {
        "tier": "sleep1",
        "level": "level 1",
        "residue_gb": 3.5,
    }


async def test_an_unmeasured_sleeper_counts_its_learned_residue_else_all_it_held(
    sleepers: Catalog,
) -> None:
    record = sleepers.records["tp"]
    put_to_sleep(record, None)  # adopted asleep: nothing measured
    assert sleepers.held_by_device(record, (0, 1)) == {0: 20.0, 1: 20.0}
    await sleepers._stats.record_residue("tp", 3.0)
    assert sleepers.held_by_device(record, (0, 1)) == {0: 1.5, 1: 1.5}


def test_sleepers_are_candidates_and_charge_host_ram(sleepers: Catalog) -> None:
    record = sleepers.records["tp"]
    put_to_sleep(record, {0: 1.0, 1: 1.0})
    record.host_ram_gb = 12.5
    solo = sleepers.records["solo"]
    assert [c.name for c in sleepers.candidates(solo.spec, (0, 1))] == ["tp"]
    assert sleepers.host_ram_in_use_gb() == 12.5
    victim = sleepers.standby_victim(record, {0: 1.0, 1: 1.0})
    assert victim.tiers == ()  # asleep already: only a stop frees more


def test_a_wake_is_taken_as_what_it_adds_to_the_residue(sleepers: Catalog) -> None:
    # A release window beside a wake adds back what the wake took: its full share on
    # each device less what it kept asleep there, not nothing.
    record = sleepers.records["tp"]
    put_to_sleep(record, {0: 1.0, 1: 2.5})
    moves = sleepers.memory_moves
    sleepers.transition(record, ModelState.SLEEPING, ModelState.LOADING)
    assert sleepers.taken_since(moves) == {0: 19.0, 1: 17.5}
