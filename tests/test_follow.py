"""`switchd events`: its SSE parsing, cursor, dedupe, --since and journald fields."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from switchd.follow import (
    Follower,
    _Restart,
    commit_cursor,
    journal_fields,
    parse_since,
    read_cursor,
    sse_events,
)


def test_sse_blocks_become_name_and_data() -> None:
    lines = ["id: 5", "event: ready", "retry: 2000", 'data: {"id":5}', "", ": ping", "", "data: x"]
    assert list(sse_events(iter(lines))) == [("ready", '{"id":5}')]


def test_the_cursor_is_replaced_whole(tmp_path: Path) -> None:
    cursor = tmp_path / "cursor"
    assert read_cursor(cursor) is None
    commit_cursor(cursor, 17)
    commit_cursor(cursor, 18)
    assert cursor.read_text() == "18\n"
    assert read_cursor(cursor) == 18
    assert [p.name for p in tmp_path.iterdir()] == ["cursor"]  # no temporary file left


def test_since_is_an_id_or_a_time() -> None:
    assert parse_since("1733000000000001") == (1733000000000001, None)
    assert parse_since("2026-01-02T00:00:00Z") == (None, 1767312000.0)


def follower(tmp_path: Path, out: io.StringIO, since: str | None = None) -> Follower:
    return Follower(
        "http://x", "k", cursor_file=tmp_path / "cursor", since=since, out=out, err=io.StringIO()
    )


def test_each_line_is_written_then_its_id_committed_and_duplicates_skipped(
    tmp_path: Path,
) -> None:
    out = io.StringIO()
    follow = follower(tmp_path, out)
    assert follow._headers() == {"Accept": "text/event-stream", "Authorization": "Bearer k"}
    follow._take("queued", '{"id":7,"event":"queued","ts":"2026-01-02T00:00:00.000Z"}')
    follow._take("queued", '{"id":7,"event":"queued","ts":"2026-01-02T00:00:00.000Z"}')
    follow._take("snapshot", '{"id":7,"event":"snapshot","reason":"connect"}')  # same id
    assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == [
        "queued",
        "snapshot",
    ]
    assert read_cursor(tmp_path / "cursor") == 7
    # A follower started again with the same file resumes after it.
    again = follower(tmp_path, io.StringIO())
    assert again._headers()["Last-Event-ID"] == "7"


def test_since_a_time_starts_from_the_oldest_held_and_skips_older_lines(tmp_path: Path) -> None:
    out = io.StringIO()
    follow = Follower("http://x", None, cursor_file=None, since="2026-01-02T00:00:00Z", out=out)
    assert follow._headers()["Last-Event-ID"] == "1"  # surely not held: a gap says what is
    with pytest.raises(_Restart):
        follow._take("gap", '{"id":90,"event":"gap","asked":1,"oldest":40}')
    assert follow._headers()["Last-Event-ID"] == "39"
    follow._take("ready", '{"id":41,"event":"ready","ts":"2026-01-01T23:59:59.000Z"}')
    follow._take("ready", '{"id":42,"event":"ready","ts":"2026-01-02T00:00:01.000Z"}')
    assert [json.loads(line)["id"] for line in out.getvalue().splitlines()] == [42]


def test_journal_output_uses_journald_field_names() -> None:
    event = {"id": 3, "event": "error", "ts": "t", "job": "j", "model": "m", "message": "no"}
    fields = journal_fields(event)
    assert fields == {
        "MESSAGE": "no",
        "PRIORITY": "3",
        "SYSLOG_IDENTIFIER": "switchd",
        "SWITCHD_ID": "3",
        "SWITCHD_EVENT": "error",
        "SWITCHD_TS": "t",
        "SWITCHD_JOB": "j",
        "SWITCHD_MODEL": "m",
        "SWITCHD_DATA": json.dumps(event, separators=(",", ":")),
    }
