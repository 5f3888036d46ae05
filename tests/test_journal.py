"""The event journal: written by its thread, read back, bounded, and resumed from."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from switchd import wire
from switchd.events import EventBus, opening
from switchd.journal import (
    MIN_SEGMENT_BYTES,
    Found,
    Journal,
    first_id,
    missed_since,
    parse_line,
    segment_after,
    segment_name,
)


@pytest.fixture
def journals(tmp_path: Path) -> Iterator[list[Journal]]:
    opened: list[Journal] = []
    yield opened
    for journal in opened:
        journal.close()


def open_bus(state: Path, journals: list[Journal], max_bytes: int = 1 << 20) -> EventBus:
    """What the app does at start: read the journal, count on past it, listen."""
    journal = Journal(state, max_bytes)
    found = journal.open()
    bus = EventBus(ring_size=4, first_id=first_id(found, 1000))
    journal.start(bus.last_id)
    bus.add_listener(journal.append)
    journals.append(journal)
    return bus


def lines(state: Path) -> list[dict[str, object]]:
    found = []
    for path in sorted((state / "journal").iterdir()):
        found += [json.loads(line) for line in path.read_text().splitlines()]
    return found


def test_segment_names_sort_as_ids_and_read_back() -> None:
    assert segment_name(42) == "events-00000000000000000042.jsonl"
    assert segment_after(Path(segment_name(42))) == 42
    assert segment_after(Path("events-x.jsonl")) is None
    assert segment_after(Path("other.txt")) is None
    assert sorted([segment_name(10**9), segment_name(9)]) == [segment_name(9), segment_name(10**9)]


def test_a_line_cut_short_by_a_crash_is_skipped() -> None:
    event = parse_line('{"id":5,"event":"ready","ts":"t","model":"m"}')
    assert event is not None
    assert (event.id, event.name, dict(event.data)) == (5, "ready", {"ts": "t", "model": "m"})
    assert parse_line('{"id":6,"event":"rea') is None
    assert parse_line('{"event":"ready"}') is None


def test_every_event_but_engine_lines_is_written_as_it_is_sent(
    tmp_path: Path, journals: list[Journal]
) -> None:
    bus = open_bus(tmp_path, journals)
    queued = bus.publish("queued", {"job": "a", "ts": "t0"})
    bus.publish(wire.LOG, {"job": "a", "line": "loading weights"})
    state = bus.publish(wire.MODEL_STATE, {"model": "m", "from": "exited", "to": "loading"})
    journals[0].close()
    assert lines(tmp_path) == [
        {"id": queued.id, "event": "queued", "job": "a", "ts": "t0"},
        json.loads(state.json()),
    ]
    assert queued.id == 1001  # no journal yet: ids start at boot time


def test_ids_go_on_past_the_journal_across_restarts(
    tmp_path: Path, journals: list[Journal]
) -> None:
    bus = open_bus(tmp_path, journals)
    for _ in range(3):
        bus.publish("queued", {"job": "a"})
    journals[0].close()
    # A clock set back (boot id 1000 again): the ids still go on past the journal's.
    again = open_bus(tmp_path, journals)
    assert again.last_id == 1003
    assert again.publish("queued", {"job": "b"}).id == 1004
    assert first_id(Found(1003, 1000), boot_id=5000) == 5000
    assert first_id(Found(1003, 1000), boot_id=10) == 1003


async def test_a_resume_older_than_the_ring_is_served_from_the_journal(
    tmp_path: Path, journals: list[Journal]
) -> None:
    bus = open_bus(tmp_path, journals)
    journal = journals[0]
    published = [bus.publish("loading", {"n": n}) for n in range(10)]
    bus.publish(wire.LOG, {"line": "only in memory"})
    assert bus.missed_since(published[2].id) is None  # the ring holds 4
    missed = await missed_since(bus, journal, published[2].id)
    assert missed is not None
    assert [e.id for e in missed] == [e.id for e in published[3:]] + [bus.last_id]
    assert [e.json() for e in missed[:-1]] == [e.json() for e in published[3:]]


async def test_a_resume_across_a_restart_is_served_from_the_journal(
    tmp_path: Path, journals: list[Journal]
) -> None:
    bus = open_bus(tmp_path, journals)
    before = [bus.publish("loading", {"n": n}) for n in range(3)]
    journals[0].close()
    again = open_bus(tmp_path, journals)
    after = again.publish("ready", {})
    missed = await missed_since(again, journals[1], before[0].id)
    assert missed is not None
    assert [e.id for e in missed] == [before[1].id, before[2].id, after.id]


async def test_what_no_segment_holds_any_more_is_a_gap(
    tmp_path: Path, journals: list[Journal]
) -> None:
    bus = open_bus(tmp_path, journals, max_bytes=2 * MIN_SEGMENT_BYTES)
    journal = journals[0]
    padding = "x" * 1000
    events = [bus.publish("loading", {"pad": padding}) for _ in range(400)]  # ~420 KB
    journal.close()
    segments = sorted((tmp_path / "journal").iterdir())
    total = sum(path.stat().st_size for path in segments)
    # Bounded: the oldest segments went as a whole.
    assert total <= 2 * MIN_SEGMENT_BYTES + MIN_SEGMENT_BYTES
    assert journal.covered_after is not None
    assert journal.covered_after == segment_after(segments[0])
    kept = [json.loads(line)["id"] for path in segments for line in path.read_text().splitlines()]
    assert kept == list(range(journal.covered_after + 1, events[-1].id + 1))
    assert not journal.covers(events[0].id)
    assert await missed_since(bus, journal, events[0].id) is None
    assert journal.covers(kept[0])


def test_a_refused_resume_opens_with_a_gap_then_a_snapshot_that_says_so() -> None:
    blocks = opening(77, {"models": {}}, asked=12, oldest=40).decode().split("\n\n")
    gap, snapshot = (json.loads(block.split("data: ", 1)[1]) for block in blocks[:2])
    assert blocks[0].startswith("id: 77\nevent: gap\n")
    assert {k: v for k, v in gap.items() if k != "ts"} == {
        "id": 77,
        "event": "gap",
        "asked": 12,
        "oldest": 40,
        "message": "events after 12 are no longer held: a fresh snapshot follows",
    }
    assert snapshot["reason"] == "gap"
    assert snapshot["event"] == "snapshot"
    assert snapshot["ts"] == gap["ts"]
    assert snapshot["models"] == {}
    first = opening(77, {"models": {}}, asked=None, oldest=None).decode()
    assert first.startswith("id: 77\nevent: snapshot\n")
    assert json.loads(first.split("data: ", 1)[1])["reason"] == "connect"
