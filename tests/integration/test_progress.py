"""Load progress inside OpenAI chat streams, read with the official openai SDK, from a
real switchd and real engine processes."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import ServerFactory
from tests.integration.server import Server, engine_cmd

ANSWER = "Hello from {model}. You said: {said}"


def models(load_seconds: float = 1.2, **extra: Any) -> dict[str, Any]:
    """Two models that do not fit together on the 95.59 GB card."""
    return {
        "big": {"cmd": engine_cmd(load_seconds), "size_gb": 80, "load_time_seconds": 1, **extra},
        "small": {"cmd": engine_cmd(load_seconds), "size_gb": 24, "load_time_seconds": 1},
    }


@dataclass
class Streamed:
    """What one streamed chat answer was made of, chunk by chunk."""

    ids: set[str] = field(default_factory=set)
    models: set[str] = field(default_factory=set)
    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    # Whether any reasoning came after the first content: progress must come first.
    reasoning_after_content: bool = False

    @property
    def text(self) -> str:
        return "".join(self.content)


def sdk(server: Server, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="unused", default_headers=headers, max_retries=0
    )


async def stream_chat(client: openai.AsyncOpenAI, model: str, said: str = "hi") -> Streamed:
    found = Streamed()
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": said}], stream=True
    )
    async for chunk in stream:
        found.ids.add(chunk.id)
        found.models.add(chunk.model)
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        reasoning = (delta.model_extra or {}).get("reasoning_content")
        if reasoning:
            found.reasoning.append(reasoning)
            found.reasoning_after_content |= bool(found.content)
        if delta.content:
            found.content.append(delta.content)
    return found


async def test_a_stream_that_waits_for_a_load_tells_its_progress_then_the_answer(
    make_server: ServerFactory,
) -> None:
    server = make_server(models(), load_progress_in_stream=True)
    async with sdk(server) as client:
        waited = await stream_chat(client, "big", "tell me")
        again = await stream_chat(client, "big", "tell me")  # loaded now: no progress
    assert waited.text == ANSWER.format(model="big", said="tell me")
    assert waited.text == again.text
    assert len(waited.ids) == 1  # the progress chunks and the engine's share one id
    assert waited.models == {"big"}
    assert not waited.reasoning_after_content
    progress = "".join(waited.reasoning)
    assert progress.startswith("[ 0.0 s] big is exited;")
    for said in ("; next in line;", "big needs 80.00 GB", "Started big", "big is ready after"):
        assert said in progress, progress
    assert again.reasoning == []


async def test_several_clients_waiting_at_once_each_get_one_clean_stream(
    make_server: ServerFactory,
) -> None:
    """Four streams wait for `big`, two for `small`, which does not fit beside it."""
    server = make_server(
        models(), load_progress_in_stream=True, max_hold_seconds=1, min_residency_seconds=0.5
    )
    async with sdk(server) as client:
        wanted = [("big", f"b{i}") for i in range(4)] + [("small", f"s{i}") for i in range(2)]
        results = await asyncio.gather(*(stream_chat(client, m, said) for m, said in wanted))
    for (model, said), found in zip(wanted, results, strict=True):
        assert found.text == ANSWER.format(model=model, said=said)
        assert len(found.ids) == 1
        assert found.models == {model}
        assert found.reasoning, f"{model} {said}: no progress"
        assert not found.reasoning_after_content
        # Where it stands, from its first line: its switch under way, or its place.
        first = found.reasoning[0]
        places = (f"switching to {model} (", "; next in line;", "; in line behind ")
        assert any(place in first for place in places), first
    assert len({next(iter(found.ids)) for found in results}) == len(results)


async def test_progress_is_off_by_default_and_the_header_or_model_decides(
    make_server: ServerFactory,
) -> None:
    server = make_server(models(0.5), min_residency_seconds=0.2)
    async with sdk(server) as client:
        quiet = await stream_chat(client, "big")
    assert quiet.reasoning == []
    assert quiet.text == ANSWER.format(model="big", said="hi")
    async with sdk(server, **{"X-Switchd-Progress": "on"}) as client:
        asked = await stream_chat(client, "small")  # must unload big: waits
    assert asked.reasoning
    assert asked.text == ANSWER.format(model="small", said="hi")

    opted_out = make_server(
        models(0.5, load_progress_in_stream=False),
        load_progress_in_stream=True,
        min_residency_seconds=0.2,
    )
    async with sdk(opted_out) as client:
        by_model = await stream_chat(client, "big")
        by_default = await stream_chat(client, "small")
    assert by_model.reasoning == []
    assert by_default.reasoning
    async with sdk(opted_out, **{"X-Switchd-Progress": "off"}) as client:
        by_header = await stream_chat(client, "big")
    assert by_header.reasoning == []


async def test_a_bad_progress_header_is_refused_and_plain_answers_are_untouched(
    make_server: ServerFactory,
) -> None:
    server = make_server(models(0.5), load_progress_in_stream=True)
    body = {"model": "big", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        refused = await http.post(
            "/v1/chat/completions", json=body, headers={"X-Switchd-Progress": "maybe"}
        )
        assert refused.status_code == 400
        assert refused.json() == {
            "error": {
                "message": "X-Switchd-Progress must be on or off, got 'maybe'",
                "type": "invalid_request_error",
                "code": "invalid_header",
            }
        }
        plain = await http.post("/v1/chat/completions", json={**body, "stream": False})
        assert plain.status_code == 200
        assert plain.json()["choices"][0]["message"] == {
            "role": "assistant",
            "content": ANSWER.format(model="big", said="hi"),
        }
        assert "reasoning_content" not in plain.text


async def test_every_line_of_a_progress_stream_is_valid_sse_with_json_chunks(
    make_server: ServerFactory,
) -> None:
    server = make_server(models(), load_progress_in_stream=True)
    body = {"model": "big", "messages": [{"role": "user", "content": "raw"}], "stream": True}
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = (await response.aread()).decode()
    blocks = [block for block in raw.split("\n\n") if block]
    assert blocks[-1] == "data: [DONE]"
    chunks = [json.loads(block.removeprefix("data: ")) for block in blocks[:-1]]
    assert all(block.startswith("data: ") and "\n" not in block for block in blocks)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    progress = [c for c in chunks if "reasoning_content" in c["choices"][0]["delta"]]
    assert progress[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("content" not in c["choices"][0]["delta"] for c in progress)


async def test_a_load_that_fails_ends_the_stream_with_an_error_the_sdk_raises(
    make_server: ServerFactory,
) -> None:
    broken = {"cmd": engine_cmd(5, "--fail-after", "0.3"), "size_gb": 10}
    server = make_server({"broken": broken}, load_progress_in_stream=True)
    async with sdk(server) as client:
        stream = await client.chat.completions.create(
            model="broken", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        reasoning: list[str] = []

        async def read_all() -> None:
            async for chunk in stream:
                delta = chunk.choices[0].delta
                assert not delta.content
                reasoning.append((delta.model_extra or {}).get("reasoning_content", ""))

        with pytest.raises(openai.APIError) as raised:
            await read_all()
    assert "broken failed to load" in raised.value.message
    assert raised.value.body == {
        "message": raised.value.message,
        "type": "server_error",
        "code": "load_failed",
    }
    assert any("Started broken" in line for line in reasoning)
