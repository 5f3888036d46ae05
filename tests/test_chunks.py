"""OpenAI stream pieces: event boundaries, error and reasoning chunks, ids rewritten."""

from __future__ import annotations

import json

import pytest

from switchd.chunks import (
    WholeEvents,
    cut_short_event,
    error_event,
    event_boundary,
    reasoning_chunk,
    with_id,
    with_response_id,
)


@pytest.mark.parametrize(
    ("buffer", "end"),
    [
        (b"", 0),
        (b"data: {}", 0),
        (b"data: {}\n\n", 10),
        (b"data: 1\n\ndata: 2", 9),
        (b"data: 1\r\n\r\ndata: 2\r\n\r\n", 22),
    ],
)
def test_event_boundary_is_the_end_of_the_last_whole_event(buffer: bytes, end: int) -> None:
    assert event_boundary(buffer) == end


def test_whole_events_come_out_whatever_the_pieces() -> None:
    whole = WholeEvents()
    assert whole.feed(b"data: 1\n\n") == b"data: 1\n\n"  # a whole one, as it is
    assert whole.feed(b"data: 2\n") == b""
    assert whole.feed(b"\ndata: 3") == b"data: 2\n\n"
    assert whole.feed(b"\r\n\r\ndata: 4\n\n") == b"data: 3\r\n\r\ndata: 4\n\n"
    assert whole.feed(b"data: 5") == b""  # what an engine dying now would leave: held


def test_errors_are_one_openai_shaped_event() -> None:
    assert error_event("no", "load_failed") == (
        b'data: {"error": {"message": "no", "type": "server_error", "code": "load_failed"}}\n\n'
    )
    assert json.loads(cut_short_event("m")[6:]) == {
        "error": {
            "message": "m stopped in the middle of this answer; it is incomplete",
            "type": "server_error",
            "code": "engine_died",
        }
    }


def test_a_reasoning_chunk_never_has_content_and_only_the_first_has_the_role() -> None:
    first = json.loads(reasoning_chunk("chatcmpl-1", 7, "m", "loading\n", first=True)[6:])
    later = json.loads(reasoning_chunk("chatcmpl-1", 7, "m", "ready\n")[6:])
    assert first == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "reasoning_content": "loading\n"},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
    }
    assert later["choices"][0]["delta"] == {"reasoning_content": "ready\n"}


def test_with_id_rewrites_the_id_of_json_chunks_only() -> None:
    events = (
        b": a comment\n"
        b'data: {"id": "engine-1", "choices": []}\n\n'
        b'data: {"choices": []}\n\n'
        b"data: not json {\n\n"
        b'data: {"id": "engine-1"\r\n\r\n'
        b"data: [DONE]\n\n"
    )
    assert with_id(events, "ours") == (
        b": a comment\n"
        b'data: {"id": "ours", "choices": []}\n\n'
        b'data: {"choices": []}\n\n'
        b"data: not json {\n\n"
        b'data: {"id": "engine-1"\r\n\r\n'
        b"data: [DONE]\n\n"
    )
    crlf = b'data: {"id": "x"}\r\n\r\n'
    assert with_id(crlf, "ours") == b'data: {"id": "ours"}\r\n\r\n'


def test_with_response_id_sets_the_id_of_each_events_response_only() -> None:
    events = (
        b'event: response.created\ndata: {"type": "response.created", '
        b'"response": {"id": "resp_engine", "status": "in_progress"}}\n\n'
        b'event: response.output_text.delta\ndata: {"type": "response.output_text.delta", '
        b'"item_id": "msg_1", "delta": "hi"}\n\n: a comment\n\n'
    )
    rewritten = with_response_id(events, "resp_own")
    lines = rewritten.split(b"\n")
    assert json.loads(lines[1][6:])["response"] == {"id": "resp_own", "status": "in_progress"}
    assert lines[3:] == events.split(b"\n")[3:]  # no response in it: untouched
