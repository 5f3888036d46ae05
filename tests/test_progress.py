"""Who gets load progress in their stream (the header, the model, the default), and
what they are told of where their request stands."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from switchd.config import ModelSpec
from switchd.jobs import JobKind
from switchd.progress import CHAT_PATH, BadProgressHeader, asked, describe, wanted
from switchd.scheduler import Standing, UnderWay
from switchd.states import ModelState, Stage


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


def standing(**changed: Any) -> Standing:
    """Where a request for `m` stands; by default nothing runs and nothing waits."""
    return dataclasses.replace(
        Standing("m", ModelState.EXITED, None, (), False, 0, None, (), (), 12.0), **changed
    )


@pytest.mark.parametrize(
    ("where", "said"),
    [
        (standing(), "m is exited; next in line; loading it takes about 12 s"),
        (
            standing(serving=("a", "b"), fits_beside=True),
            "m is exited; it fits beside a, b: it loads now; next in line; "
            "loading it takes about 12 s",
        ),
        (
            standing(serving=("a", "b")),
            "m is exited; a, b serves other requests first; next in line; "
            "loading it takes about 12 s",
        ),
        (
            standing(state=ModelState.SLEEPING, ready_seconds=0.5, waiting=2, waited_seconds=3.4),
            "m is sleeping; 2 request(s) wait for it, the first for 3 s; next in line; "
            "waking it takes about 0.5 s",
        ),
        (
            standing(under_way=UnderWay(JobKind.UNLOAD, "a", Stage.DRAIN, 0.054), line=("b", "m")),
            "m is exited; switchd is unloading a (drain, 5%); in line behind b, wanted "
            "earlier; loading it takes about 12 s",
        ),
        (
            standing(
                under_way=UnderWay(JobKind.SWITCH, "t", Stage.SLEEP, 0.2),
                line=("w", "m"),
                fits_beside=True,
            ),
            "m is exited; switchd is switching to t (sleep, 20%); it needs no room: it loads "
            "beside that now; loading it takes about 12 s",
        ),
        (
            standing(under_way=UnderWay(JobKind.SWITCH, "m", Stage.LOADING, 0.5)),
            "m is exited; switchd is switching to m (loading, 50%); loading it takes about 12 s",
        ),
        (
            standing(queued=("a", "m")),
            "m is exited; its switch is queued behind a; loading it takes about 12 s",
        ),
        (
            standing(queued=("m",)),
            "m is exited; its switch is next in the queue; loading it takes about 12 s",
        ),
        (
            standing(queued=("a",), line=("m",)),
            "m is exited; queued switches first: a; loading it takes about 12 s",
        ),
    ],
)
def test_where_a_request_stands_is_told_in_one_line(where: Standing, said: str) -> None:
    assert describe(where) == said
