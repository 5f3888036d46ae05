"""The merged event stream: the gateway's ids, its ring, gaps (switchd/cluster/merged.py)."""

from __future__ import annotations

import json
from typing import Any

from switchd.cluster.merged import RING, MergedEvents


def blocks(raw: bytes) -> list[tuple[str | None, str, dict[str, Any]]]:
    out = []
    for block in raw.decode().split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if ": " in line and line[0] != ":"
        )
        if "data" in fields:
            out.append((fields.get("id"), fields["event"], json.loads(fields["data"])))
    return out


def status() -> dict[str, Any]:
    return {"models": {}, "hosts": {}}


async def first(events: MergedEvents, after: int | None) -> bytes:
    stream = events.stream(after, status)
    try:
        return await anext(stream)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


def test_each_event_carries_its_id_name_host_and_the_hosts_ts() -> None:
    events = MergedEvents()
    first_id = events.publish("ready", {"host": "a", "host_id": 7, "ts": "T", "model": "m"})
    assert first_id == events.last_id
    [(event_id, name, data)] = blocks(b"".join(events.replay(first_id - 1) or []))
    assert (event_id, name) == (str(first_id), "ready")
    assert data == {
        "host": "a",
        "host_id": 7,
        "ts": "T",
        "model": "m",
        "id": first_id,
        "event": "ready",
    }


async def test_a_resume_replays_exactly_what_was_missed() -> None:
    events = MergedEvents()
    ids = [events.publish("model_state", {"host": h, "n": n}) for n, h in enumerate("abcab")]
    got = blocks(await first(events, ids[1]))
    assert [int(event_id or 0) for event_id, _, _ in got] == ids[2:]
    assert [data["host"] for _, _, data in got] == ["c", "a", "b"]


async def test_no_id_opens_with_a_snapshot_at_the_latest_id() -> None:
    events = MergedEvents()
    last = events.publish("ready", {"host": "a"})
    [(event_id, name, data)] = blocks(await first(events, None))
    assert (event_id, name, data["id"]) == (str(last), "snapshot", last)
    assert data["models"] == {}


async def test_an_id_older_than_the_ring_or_from_another_run_gets_a_gap_then_a_snapshot() -> None:
    events = MergedEvents()
    oldest = events.publish("x", {"host": "a"})
    for _ in range(RING):
        events.publish("x", {"host": "a"})
    for stale in (oldest - 1, events.last_id + 10):
        got = blocks(await first(events, stale))
        assert [name for _, name, _ in got] == ["gap", "snapshot"]
        assert got[0][2]["from"] == stale
        assert got[0][2]["oldest"] == oldest + 1
