"""Learned load times and footprints: persisted, reloaded, and robust to damage."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from switchd.stats import FILE_NAME, Learned, LearnedStats


async def loaded(state_dir: Path) -> LearnedStats:
    stats = LearnedStats(state_dir)
    await stats.load()
    return stats


async def test_nothing_learned_yet(tmp_path: Path) -> None:
    stats = await loaded(tmp_path / "missing")
    assert stats.path == tmp_path / "missing" / FILE_NAME
    assert stats.get("m") == Learned(load_seconds=None, footprint_gb=None, loads=0)
    assert not (tmp_path / "missing").exists()  # loading creates nothing


async def test_record_then_reload_gives_the_same_figures(tmp_path: Path) -> None:
    state_dir = tmp_path / "state" / "nested"  # created on the first write
    stats = LearnedStats(state_dir)
    await stats.record("gpt-oss-20b", 14.567, 38.25)
    await stats.record("mistral", 3.0, 17.5)

    assert stats.get("gpt-oss-20b") == Learned(14.57, 38.25, 1, (38.25,))
    reloaded = await loaded(state_dir)
    assert reloaded.get("gpt-oss-20b") == Learned(14.57, 38.25, 1, (38.25,))
    assert reloaded.get("mistral") == Learned(3.0, 17.5, 1, (17.5,))
    assert reloaded.get("other") == Learned()

    on_disk = json.loads((state_dir / FILE_NAME).read_text(encoding="utf-8"))
    assert on_disk == {
        "gpt-oss-20b": {
            "footprint_gb": 38.25,
            "load_seconds": 14.57,
            "loads": 1,
            "samples": [38.25],
            "device_samples": [],
            "wake_seconds": {},
            "residue_samples": [],
            "context_length": None,
        },
        "mistral": {
            "footprint_gb": 17.5,
            "load_seconds": 3.0,
            "loads": 1,
            "samples": [17.5],
            "device_samples": [],
            "wake_seconds": {},
            "residue_samples": [],
            "context_length": None,
        },
    }


async def test_loads_count_the_latest_time_wins_and_the_footprint_moves_smoothly(
    tmp_path: Path,
) -> None:
    stats = LearnedStats(tmp_path)
    await stats.record("m", 10.0, 20.0)
    await stats.record("m", 12.0, 22.0)  # halfway: 21.0
    await stats.record("m", 8.0, 19.0)  # halfway: 20.0
    expected = Learned(load_seconds=8.0, footprint_gb=20.0, loads=3, samples=(20.0, 22.0, 19.0))
    assert stats.get("m") == expected
    assert stats.get("m").planned_gb == 22.0, "planned with the largest recent sample"
    assert (await loaded(tmp_path)).get("m") == expected


async def test_only_the_latest_samples_are_kept(tmp_path: Path) -> None:
    stats = LearnedStats(tmp_path)
    for sample in (80.0, 30.0, 31.0, 32.0, 33.0, 34.0):
        await stats.record("m", 1.0, sample)
    assert stats.get("m").samples == (30.0, 31.0, 32.0, 33.0, 34.0)
    assert stats.get("m").planned_gb == 34.0


async def test_counting_continues_after_a_reload(tmp_path: Path) -> None:
    first = LearnedStats(tmp_path)
    await first.record("m", 10.0, 20.0)
    second = await loaded(tmp_path)
    await second.record("m", 11.0, 20.5)
    assert (await loaded(tmp_path)).get("m").loads == 2


@pytest.mark.parametrize("footprint", [None, 0.0, -3.5])
async def test_unmeasurable_footprint_keeps_the_previous_one(
    tmp_path: Path, footprint: float | None
) -> None:
    stats = LearnedStats(tmp_path)
    await stats.record("m", 10.0, 20.0)
    await stats.record("m", 9.0, footprint)
    assert stats.get("m") == Learned(load_seconds=9.0, footprint_gb=20.0, loads=2, samples=(20.0,))
    assert (await loaded(tmp_path)).get("m").footprint_gb == 20.0


async def test_unmeasurable_footprint_on_the_first_load_stays_unknown(tmp_path: Path) -> None:
    stats = LearnedStats(tmp_path)
    await stats.record("m", 5.0, None)
    assert stats.get("m") == Learned(load_seconds=5.0, footprint_gb=None, loads=1)
    assert (await loaded(tmp_path)).get("m") == Learned(5.0, None, 1)


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "",
        "[1, 2]",
        '{"m": 5}',
        '{"m": {"loads": "many"}}',
    ],
)
async def test_a_damaged_file_is_ignored(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / FILE_NAME).write_text(content, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="switchd.stats"):
        stats = await loaded(tmp_path)
    assert stats.get("m") == Learned()
    assert f"ignoring unreadable {tmp_path / FILE_NAME}" in caplog.text


async def test_a_binary_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_bytes(b"\xff\xfe\x00garbage")
    stats = await loaded(tmp_path)
    assert stats.get("m") == Learned()


async def test_wrongly_typed_figures_are_dropped(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_text(
        json.dumps(
            {
                "m": {"load_seconds": "fast", "footprint_gb": True, "loads": 4},
                "n": {"load_seconds": 7, "footprint_gb": 12.5},
            }
        ),
        encoding="utf-8",
    )
    stats = await loaded(tmp_path)
    assert stats.get("m") == Learned(load_seconds=None, footprint_gb=None, loads=4)
    assert stats.get("n") == Learned(load_seconds=7.0, footprint_gb=12.5, loads=0)


async def test_recording_after_a_damaged_file_replaces_it(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_text("{broken", encoding="utf-8")
    stats = await loaded(tmp_path)
    await stats.record("m", 1.0, 2.0)
    assert json.loads((tmp_path / FILE_NAME).read_text(encoding="utf-8")) == {
        "m": {
            "footprint_gb": 2.0,
            "load_seconds": 1.0,
            "loads": 1,
            "samples": [2.0],
            "device_samples": [],
            "wake_seconds": {},
            "residue_samples": [],
            "context_length": None,
        }
    }


async def test_written_atomically_without_a_temporary_left(tmp_path: Path) -> None:
    stats = LearnedStats(tmp_path)
    await stats.record("a", 1.0, 2.0)
    await stats.record("b", 3.0, 4.0)
    assert sorted(os.listdir(tmp_path)) == [FILE_NAME]


async def test_write_goes_through_a_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    renames: list[tuple[str, str]] = []
    real_replace = os.replace

    def recording_replace(source: str | Path, target: str | Path) -> None:
        renames.append((Path(source).name, Path(target).name))
        assert Path(target).exists() is (len(renames) > 1)
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", recording_replace)
    stats = LearnedStats(tmp_path)
    await stats.record("a", 1.0, 2.0)
    await stats.record("a", 1.5, 2.0)
    assert renames == [("learned.tmp", FILE_NAME), ("learned.tmp", FILE_NAME)]


async def test_a_failed_write_keeps_the_figures_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be", encoding="utf-8")
    stats = LearnedStats(blocker)
    with caplog.at_level(logging.WARNING, logger="switchd.stats"):
        await stats.record("m", 2.0, 3.0)  # does not raise
    assert stats.get("m") == Learned(load_seconds=2.0, footprint_gb=3.0, loads=1, samples=(3.0,))
    assert "cannot save learned figures" in caplog.text


async def test_what_the_fullest_device_held_is_learned_beside_the_total(tmp_path: Path) -> None:
    stats = LearnedStats(tmp_path)
    await stats.record("m", 5.0, 80.0, 42.0)  # 38 + 42 over two cards: not an even split
    await stats.record("m", 5.0, 80.0, 41.0)
    await stats.record("m", 5.0, None, None)  # not attributable: nothing learned
    learned = (await loaded(tmp_path)).get("m")
    assert (learned.device_samples, learned.planned_per_device_gb) == ((42.0, 41.0), 42.0)
    assert LearnedStats(tmp_path).get("x").planned_per_device_gb is None


# --- standby: wake times and sleep residues ------------------------------------------------


async def test_the_first_wake_is_learned_as_is_then_moves_halfway(tmp_path: Path) -> None:
    stats = LearnedStats(tmp_path)
    await stats.record_wake("m", "sleep1", 2.0)
    assert stats.get("m").wake_seconds == {"sleep1": 2.0}
    await stats.record_wake("m", "sleep1", 1.0)  # halfway: 1.5
    await stats.record_wake("m", "sleep1", 0.5)  # halfway: 1.0
    assert stats.get("m").wake_seconds == {"sleep1": 1.0}


async def test_each_tier_learns_its_own_wake(tmp_path: Path) -> None:
    stats = LearnedStats(tmp_path)
    await stats.record_wake("m", "sleep1", 0.4)
    await stats.record_wake("m", "sleep2", 3.0)
    await stats.record_wake("m", "sleep2", 2.0)  # halfway: 2.5
    await stats.record_wake("n", "release", 1.25)
    assert stats.get("m").wake_seconds == {"sleep1": 0.4, "sleep2": 2.5}
    assert stats.get("n").wake_seconds == {"release": 1.25}


async def test_wake_times_are_kept_to_the_millisecond(tmp_path: Path) -> None:
    stats = LearnedStats(tmp_path)
    await stats.record_wake("m", "sleep1", 0.12345)
    assert stats.get("m").wake_seconds == {"sleep1": 0.123}
    await stats.record_wake("m", "sleep1", 0.201)  # 0.123 + (0.201 - 0.123) / 2 = 0.162
    assert stats.get("m").wake_seconds["sleep1"] == pytest.approx(0.162, abs=1e-9)


async def test_a_wake_leaves_the_load_figures_and_a_load_leaves_the_wakes(tmp_path: Path) -> None:
    stats = LearnedStats(tmp_path)
    await stats.record("m", 10.0, 20.0)
    await stats.record_wake("m", "sleep2", 2.0)
    await stats.record_residue("m", 1.5)
    assert stats.get("m") == Learned(
        load_seconds=10.0,
        footprint_gb=20.0,
        loads=1,
        samples=(20.0,),
        wake_seconds={"sleep2": 2.0},
        residue_samples=(1.5,),
    )
    await stats.record("m", 12.0, 22.0)
    learned = stats.get("m")
    assert (learned.loads, learned.footprint_gb) == (2, 21.0)
    assert (learned.wake_seconds, learned.residue_samples) == ({"sleep2": 2.0}, (1.5,))


async def test_the_residue_is_the_largest_of_the_latest_five(tmp_path: Path) -> None:
    stats = LearnedStats(tmp_path)
    assert stats.get("m").residue_gb is None  # never measured
    await stats.record_residue("m", 9.0)
    assert stats.get("m").residue_gb == 9.0
    for sample in (1.0, 2.5, 1.25, 0.5):
        await stats.record_residue("m", sample)
    assert stats.get("m").residue_gb == 9.0
    await stats.record_residue("m", 0.75)  # pushes the 9.0 out
    assert stats.get("m").residue_samples == (1.0, 2.5, 1.25, 0.5, 0.75)
    assert stats.get("m").residue_gb == 2.5


async def test_a_residue_is_rounded_and_never_negative(tmp_path: Path) -> None:
    stats = LearnedStats(tmp_path)
    await stats.record_residue("m", 1.23456)
    await stats.record_residue("m", -0.4)
    assert stats.get("m").residue_samples == (1.23, 0.0)
    assert stats.get("m").residue_gb == 1.23


async def test_wakes_and_residues_persist_and_reload(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    stats = LearnedStats(state_dir)
    await stats.record_wake("m", "sleep1", 0.8)
    await stats.record_wake("m", "sleep2", 3.0)
    await stats.record_wake("m", "sleep2", 2.0)
    for sample in (1.5, 1.75, 1.5, 1.6, 1.4, 1.45):
        await stats.record_residue("m", sample)

    expected = Learned(
        wake_seconds={"sleep1": 0.8, "sleep2": 2.5},
        residue_samples=(1.75, 1.5, 1.6, 1.4, 1.45),
    )
    assert stats.get("m") == expected
    reloaded = await loaded(state_dir)
    assert reloaded.get("m") == expected
    assert reloaded.get("m").residue_gb == 1.75
    assert json.loads((state_dir / FILE_NAME).read_text(encoding="utf-8")) == {
        "m": {
            "footprint_gb": None,
            "load_seconds": None,
            "loads": 0,
            "samples": [],
            "device_samples": [],
            "wake_seconds": {"sleep1": 0.8, "sleep2": 2.5},
            "residue_samples": [1.75, 1.5, 1.6, 1.4, 1.45],
            "context_length": None,
        }
    }
    # Learning goes on from the reloaded figures.
    await reloaded.record_wake("m", "sleep1", 0.4)  # halfway: 0.6
    await reloaded.record_residue("m", 1.0)
    again = await loaded(state_dir)
    assert again.get("m").wake_seconds == {"sleep1": 0.6, "sleep2": 2.5}
    assert again.get("m").residue_samples == (1.5, 1.6, 1.4, 1.45, 1.0)
    assert again.get("m").residue_gb == 1.6


async def test_wrongly_typed_wakes_and_residues_are_dropped(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_text(
        json.dumps(
            {
                "m": {
                    "wake_seconds": {"sleep1": "fast", "sleep2": 2, "release": True},
                    "residue_samples": [1.5, "a lot", None, 2],
                },
                "n": {"wake_seconds": None, "residue_samples": "1.5"},
            }
        ),
        encoding="utf-8",
    )
    stats = await loaded(tmp_path)
    assert stats.get("m") == Learned(wake_seconds={"sleep2": 2.0}, residue_samples=(1.5, 2.0))
    assert stats.get("n") == Learned()


async def test_the_context_length_an_engine_reported_persists(tmp_path: Path) -> None:
    stats = LearnedStats(tmp_path)
    await stats.record_context_length("m", 8192)
    await stats.record("m", 2.0, 4.0)  # a later load keeps it
    assert (await loaded(tmp_path)).get("m").context_length == 8192
    await stats.record_context_length("m", 32768)  # the engine runs with another now
    assert (await loaded(tmp_path)).get("m").context_length == 32768


async def test_a_context_length_that_is_no_count_is_dropped(tmp_path: Path) -> None:
    for bad in (0, -5, 1.5, True, "8192"):
        (tmp_path / FILE_NAME).write_text(json.dumps({"m": {"context_length": bad}}))
        assert (await loaded(tmp_path)).get("m").context_length is None, bad
