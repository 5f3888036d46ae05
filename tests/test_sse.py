"""The bytes of an event stream (switchd/sse.py): `\n` line endings, the hint's place."""

from __future__ import annotations

from switchd.events import Event
from switchd.sse import PING, block, comment, with_retry


def test_an_event_block_ends_its_lines_with_a_bare_newline() -> None:
    assert block(17, "ready", '{"model":"m"}') == b'id: 17\nevent: ready\ndata: {"model":"m"}\n\n'
    assert block(None, "error", "{}") == b"event: error\ndata: {}\n\n"
    assert PING == b": ping\n\n"


def test_an_event_is_encoded_by_the_one_writer() -> None:
    event = Event(5, "loading", {"progress": 0.5})
    data = b'{"id":5,"event":"loading","progress":0.5}'
    assert event.sse() == b"id: 5\nevent: loading\ndata: " + data + b"\n\n"
    assert event.sse() is event.sse()  # once, for every reader


def test_the_retry_hint_is_the_last_field_of_the_first_block_only() -> None:
    two = block(1, "a", "{}") + block(2, "b", "{}")
    assert with_retry(two, 3000) == (
        b"id: 1\nevent: a\ndata: {}\nretry: 3000\n\nid: 2\nevent: b\ndata: {}\n\n"
    )


def test_a_comment_is_one_line_every_parser_skips() -> None:
    assert comment("loading 42%\n[1.0 s]  Loading m") == b": loading 42% [1.0 s] Loading m\n\n"
