"""Who gets load progress in their stream: the header, the model, the default."""

from __future__ import annotations

from typing import Any

import pytest

from switchd.config import ModelSpec
from switchd.progress import CHAT_PATH, BadProgressHeader, asked, wanted


def scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"type": "http", "headers": list(headers)}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        *[(value, True) for value in (b"on", b"ON", b"1", b" true ", b"yes")],
        *[(value, False) for value in (b"off", b"0", b"False", b"no")],
    ],
)
def test_the_header_says_on_or_off(value: bytes, expected: bool) -> None:
    assert asked(scope((b"x-switchd-progress", value))) is expected


def test_no_header_leaves_it_to_the_config() -> None:
    assert asked(scope((b"accept", b"text/event-stream"))) is None


def test_any_other_value_is_refused_by_name() -> None:
    with pytest.raises(
        BadProgressHeader, match=r"^X-Switchd-Progress must be on or off, got 'maybe'$"
    ):
        asked(scope((b"x-switchd-progress", b"maybe")))


def spec(setting: bool | None = None) -> ModelSpec:
    return ModelSpec("m", 10.0, cmd=("engine",), load_progress_in_stream=setting)


@pytest.mark.parametrize(
    ("path", "streamed", "said", "expected"),
    [
        # said: (header, the model's setting, the default)
        (CHAT_PATH, True, (None, None, False), False),  # off by default
        (CHAT_PATH, True, (None, None, True), True),
        (CHAT_PATH, True, (None, False, True), False),  # the model opts out
        (CHAT_PATH, True, (None, True, False), True),  # the model opts in
        (CHAT_PATH, True, (True, False, False), True),  # the request decides last
        (CHAT_PATH, True, (False, True, True), False),
        (CHAT_PATH, False, (True, True, True), False),  # a JSON answer has no stream
        ("/v1/completions", True, (True, True, True), False),  # chat only
        ("/v1/embeddings", True, (True, True, True), False),
    ],
)
def test_only_streamed_chat_gets_progress_as_asked(
    path: str, streamed: bool, said: tuple[bool | None, bool | None, bool], expected: bool
) -> None:
    header, model, default = said
    assert wanted(path, streamed, header, spec(model), default) is expected
