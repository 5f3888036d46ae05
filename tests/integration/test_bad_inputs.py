"""Every bad input gets a clear 4xx, is never forwarded, and changes no state.

One real switchd for the whole table; requests are sent as raw bytes, so that
paths like `/v1/../admin` reach the server exactly as an attacker would send
them (HTTP clients normalise them away).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.server import Server, engine_cmd, write_config

MAX_BODY = 200_000


@dataclass(frozen=True)
class Bad:
    name: str
    method: str
    target: str
    status: int
    code: str  # the error code in the body
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    openai: bool = False  # OpenAI-shaped error (proxy routes) rather than switchd's own


def chat(model: object) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()


JSON = {"content-type": "application/json"}
DEEP = b"[" * 100_000
HUGE_ID = "9" * 5000

CASES = [
    # The control routes.
    Bad("switch without a target", "POST", "/v1/models/switch", 400, "missing_parameter"),
    Bad(
        "switch to an empty name",
        "POST",
        "/v1/models/switch?target_model=",
        400,
        "missing_parameter",
    ),
    Bad(
        "switch to an unknown model",
        "POST",
        "/v1/models/switch?target_model=nope",
        404,
        "model_not_found",
    ),
    Bad(
        "switch with a number as target",
        "POST",
        "/v1/models/switch",
        400,
        "missing_parameter",
        b'{"target_model": 5}',
        JSON,
    ),
    Bad(
        "switch with a JSON body nested 40,000 deep",
        "POST",
        "/v1/models/switch",
        400,
        "invalid_json",
        b"[" * 40_000,
        JSON,
    ),
    Bad(
        "switch with a body that is not JSON",
        "POST",
        "/v1/models/switch",
        400,
        "invalid_json",
        b"{nope",
        JSON,
    ),
    Bad(
        "switch with a body over 64 KiB",
        "POST",
        "/v1/models/switch",
        413,
        "body_too_large",
        b"x" * 70_000,
        {**JSON, "transfer-encoding": "chunked"},
    ),
    Bad(
        "switch that can never fit, streamed",
        "POST",
        "/v1/models/switch?target_model=huge&stream=true",
        409,
        "insufficient_memory",
    ),
    Bad(
        "switch that can never fit",
        "POST",
        "/v1/models/switch?target_model=huge",
        409,
        "insufficient_memory",
    ),
    Bad(
        "streamed switch with a 5,000-digit Last-Event-ID",
        "POST",
        "/v1/models/switch?target_model=small&stream=true",
        400,
        "invalid_last_event_id",
        headers={"last-event-id": HUGE_ID},
    ),
    Bad(
        "streamed switch with a superscript digit id",
        "POST",
        "/v1/models/switch?target_model=small&stream=true&last_event_id=%C2%B9",
        400,
        "invalid_last_event_id",
    ),
    Bad(
        "streamed unload with a negative id",
        "POST",
        "/v1/models/unload?model=small&stream=true",
        400,
        "invalid_last_event_id",
        headers={"last-event-id": "-1"},
    ),
    Bad("switch by GET", "GET", "/v1/models/switch?target_model=small", 405, "method_not_allowed"),
    Bad("unload without a model", "POST", "/v1/models/unload", 400, "missing_parameter"),
    Bad(
        "unload of an unknown model", "POST", "/v1/models/unload?model=nope", 404, "model_not_found"
    ),
    Bad("unload by DELETE", "DELETE", "/v1/models/unload?model=small", 405, "method_not_allowed"),
    Bad("an unknown job", "GET", "/v1/switches/nope", 404, "job_not_found"),
    Bad("an unknown job's events", "GET", "/v1/switches/nope/events", 404, "job_not_found"),
    Bad(
        "events with a 5,000-digit Last-Event-ID",
        "GET",
        "/v1/events",
        400,
        "invalid_last_event_id",
        headers={"last-event-id": HUGE_ID},
    ),
    Bad(
        "events with a \\xb2 byte as id",
        "GET",
        "/v1/events?last_event_id=%B2",
        400,
        "invalid_last_event_id",
    ),
    Bad(
        "events with a word as id",
        "GET",
        "/v1/events?last_event_id=abc",
        400,
        "invalid_last_event_id",
    ),
    Bad(
        "status by POST",
        "POST",
        "/v1/models/status",
        405,
        "method_not_allowed",
        chat("small"),
        JSON,
    ),
    Bad("events by POST", "POST", "/v1/events", 405, "method_not_allowed", chat("small"), JSON),
    Bad("models by POST", "POST", "/v1/models", 405, "method_not_allowed", chat("small"), JSON),
    Bad("one unknown model object", "GET", "/v1/models/nope", 404, "model_not_found", openai=True),
    # The proxy: paths that would leave /v1 on the engine.
    Bad(
        "a path climbing out of /v1",
        "POST",
        "/v1/../admin/shutdown",
        400,
        "invalid_path",
        chat("small"),
        JSON,
        True,
    ),
    Bad(
        "an encoded climb",
        "POST",
        "/v1/%2e%2e/admin/shutdown",
        400,
        "invalid_path",
        chat("small"),
        JSON,
        True,
    ),
    Bad(
        "a half-encoded climb",
        "POST",
        "/v1/..%2fadmin",
        400,
        "invalid_path",
        chat("small"),
        JSON,
        True,
    ),
    Bad(
        "an encoded slash climb",
        "POST",
        "/v1/chat%2f..%2f..%2fadmin",
        400,
        "invalid_path",
        chat("small"),
        JSON,
        True,
    ),
    Bad(
        "an encoded query",
        "POST",
        "/v1/chat/completions%3Fdebug=1",
        400,
        "invalid_path",
        chat("small"),
        JSON,
        True,
    ),
    Bad(
        "an encoded NUL",
        "POST",
        "/v1/chat/completions%00",
        400,
        "invalid_path",
        chat("small"),
        JSON,
        True,
    ),
    Bad(
        "a backslash climb",
        "POST",
        "/v1/..%5cadmin",
        400,
        "invalid_path",
        chat("small"),
        JSON,
        True,
    ),
    # The proxy: bodies.
    Bad(
        "a body nested 100,000 deep",
        "POST",
        "/v1/chat/completions",
        400,
        "invalid_json",
        DEEP,
        JSON,
        True,
    ),
    Bad(
        "a body that is not JSON",
        "POST",
        "/v1/chat/completions",
        400,
        "invalid_json",
        b"hello",
        JSON,
        True,
    ),
    Bad(
        "a body that is not UTF-8",
        "POST",
        "/v1/chat/completions",
        400,
        "invalid_json",
        b'{"model": "\xff"}',
        JSON,
        True,
    ),
    Bad("a JSON array", "POST", "/v1/chat/completions", 400, "invalid_json", b"[1, 2]", JSON, True),
    Bad("an empty body", "POST", "/v1/chat/completions", 400, "invalid_json", b"", JSON, True),
    Bad(
        "no model",
        "POST",
        "/v1/chat/completions",
        400,
        "missing_model",
        b'{"messages": []}',
        JSON,
        True,
    ),
    Bad(
        "a number as model",
        "POST",
        "/v1/chat/completions",
        400,
        "invalid_model",
        chat(7),
        JSON,
        True,
    ),
    Bad("an empty model", "POST", "/v1/embeddings", 400, "invalid_model", chat(""), JSON, True),
    Bad(
        "an unknown model",
        "POST",
        "/v1/chat/completions",
        404,
        "model_not_found",
        chat("gpt-5"),
        JSON,
        True,
    ),
    # Sent whole, so that the 413 is read before the connection closes (a declared
    # length over the limit is refused before the body is read: the test after the table).
    Bad(
        "a body over max_body_bytes",
        "POST",
        "/v1/chat/completions",
        413,
        "request_too_large",
        b"x" * (MAX_BODY + 1),
        {**JSON, "transfer-encoding": "chunked"},
        True,
    ),
    Bad(
        "a key in the query string",
        "POST",
        "/v1/chat/completions?api_key=secret",
        400,
        "credentials_in_query",
        chat("small"),
        JSON,
        True,
    ),
    Bad(
        "a token in the query string",
        "GET",
        "/v1/models/status?access_token=secret",
        400,
        "credentials_in_query",
    ),
]


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def raw(port: int, method: str, target: str, headers: dict[str, str], body: bytes) -> Answer:
    """One HTTP/1.1 request, sent byte for byte as given."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"{method} {target} HTTP/1.1", "host: 127.0.0.1", "connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if headers.get("transfer-encoding") == "chunked":
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    elif body or method == "POST":
        lines.append(f"content-length: {len(body)}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    if parsed.get("transfer-encoding") == "chunked":
        rest = dechunk(rest)
    return Answer(int(status_line.split()[1]), parsed, rest)


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder: Path = tmp_path_factory.mktemp("bad-inputs")
    models = {
        "small": {"cmd": engine_cmd(0.2), "size_gb": 10},
        "base": {"cmd": engine_cmd(0.2), "size_gb": 10, "pinned": True},
        "huge": {"cmd": engine_cmd(0.2), "size_gb": 90},  # never beside the pinned base
    }
    running = write_config(folder, models, max_body_bytes=MAX_BODY)
    running.start()
    loaded = httpx.post(
        f"{running.url}/v1/models/switch",
        params={"target_model": "base", "wait": "ready"},
        timeout=30,
    )
    assert loaded.status_code == 200, loaded.text
    yield running
    running.stop()


def states(server: Server) -> dict[str, Any]:
    status = httpx.get(f"{server.url}/v1/models/status", timeout=10).json()
    return {name: model["status"] for name, model in status["models"].items()}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_a_bad_input_gets_a_clear_error_and_changes_nothing(
    server: Server, case: Bad
) -> None:
    before = states(server)
    logged = len(server.log())
    answer = await raw(server.port, case.method, case.target, case.headers, case.body)
    assert answer.status == case.status, answer.body[:300]
    assert answer.headers["content-type"].startswith("application/json"), answer.headers
    body = json.loads(answer.body)
    if case.openai:
        assert set(body["error"]) >= {"message", "type", "code"}, body
        assert body["error"]["code"] == case.code, body
    else:
        assert body["error"] == case.code, body
        assert body["message"], body
    assert "Traceback" not in answer.body.decode(errors="replace")
    assert states(server) == before
    assert "Traceback" not in server.log()[logged:]


async def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(server: Server) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 30000000\r\n\r\n{"
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 413"), head


async def test_one_model_object_answers_like_openai(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        answer = await http.get("/v1/models/small")
    assert answer.status_code == 200
    assert answer.json() == {
        "id": "small",
        "object": "model",
        "created": 0,
        "owned_by": "switchd",
        "status": {"value": "unloaded", "state": "exited"},
        "aliases": [],
        "context_length": None,
        "max_model_len": None,
        "context_length_source": None,
        "capabilities": ["chat", "completion"],
        "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
    }


async def test_an_unknown_model_gets_the_same_404_on_every_route(server: Server) -> None:
    """Whichever route names it, an unknown model is told in the same words."""
    unknown = "Unknown model 'nope'; known models: base, huge, small"
    asked = [
        ("GET", "/v1/models/nope", {}, b""),
        ("POST", "/v1/models/switch?target_model=nope", {}, b""),
        ("POST", "/v1/models/switch?target_model=nope&stream=true", {}, b""),
        ("POST", "/v1/models/switch", JSON, b'{"target_model": "nope"}'),
        ("POST", "/v1/models/unload?model=nope", {}, b""),
        ("POST", "/v1/models/unload?model=nope&stream=true", {}, b""),
        ("POST", "/v1/chat/completions", JSON, chat("nope")),
        ("POST", "/v1/completions", JSON, json.dumps({"model": "nope"}).encode()),
    ]
    texts = {}
    for method, target, headers, body in asked:
        answer = await raw(server.port, method, target, headers, body)
        assert answer.status == 404, (target, answer.body)
        shaped = json.loads(answer.body)
        # OpenAI's shape where an OpenAI client asks, switchd's (with the list) elsewhere.
        if "/models/switch" in target or "/models/unload" in target:
            assert shaped["error"] == "model_not_found", shaped
            assert shaped["available_models"] == ["base", "huge", "small"], shaped
            texts[target] = shaped["message"]
        else:
            assert shaped["error"]["code"] == "model_not_found", shaped
            assert shaped["error"]["type"] == "invalid_request_error", shaped
            texts[target] = shaped["error"]["message"]
    assert texts == {target: unknown for _, target, _, _ in asked}
