"""The Responses API (`POST /v1/responses`) through switchd, to a real demo engine."""

from __future__ import annotations

import json
import re

import httpx
import openai

from tests.integration.conftest import ServerFactory
from tests.integration.server import seed_models

ANSWER = "Hello from gpt-oss-20b. You said: ping"


async def test_responses_load_their_model_and_stream_through_switchd(
    make_server: ServerFactory,
) -> None:
    server = make_server(seed_models(0.3))
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    try:
        # The alias is resolved, the model loaded on demand, then answered.
        answer = await client.responses.create(model="20b", input="ping")
        assert (answer.model, answer.status, answer.output_text) == (
            "gpt-oss-20b",
            "completed",
            ANSWER,
        )
        async with client.responses.stream(model="20b", input="ping") as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_response()
    finally:
        await client.close()
    # Relayed as the engine sends them: no switchd progress in a Responses stream.
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds.count("response.output_text.delta") == len(ANSWER.split())
    assert kinds[-1] == "response.completed"
    assert final.output_text == ANSWER
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        status = (await http.get("/v1/models/status")).json()["models"]["gpt-oss-20b"]
    assert (status["status"], status["in_flight"]) == ("running", 0)


async def test_a_responses_stream_waiting_for_its_load_is_queued_then_kept_alive(
    make_server: ServerFactory,
) -> None:
    models = seed_models(2.5)  # loading ticks each second: comment lines while it waits
    server = make_server(models)
    body = {"model": "20b", "input": "ping", "stream": True}
    headers = {"X-Switchd-Progress": "on"}
    lines: list[str] = []
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
        http.stream("POST", "/v1/responses", json=body, headers=headers) as answer,
    ):
        assert answer.status_code == 200
        lines = [line async for line in answer.aiter_lines()]
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    assert events[:2] == ["response.created", "response.queued"]
    assert events[2:4] == ["response.created", "response.in_progress"]  # the engine's
    assert events[-1] == "response.completed"
    queued = json.loads(lines[lines.index("event: response.queued") + 1].removeprefix("data: "))
    assert queued["type"] == "response.queued"
    assert (queued["response"]["status"], queued["response"]["model"]) == ("queued", "gpt-oss-20b")
    # One response throughout: the engine's events carry the queued one's id.
    ids = {
        json.loads(line.removeprefix("data: "))["response"]["id"]
        for line in lines
        if line.startswith("data: ") and '"response"' in line
    }
    assert ids == {queued["response"]["id"]}
    created = [i for i, line in enumerate(lines) if line == "event: response.created"][1]
    comments = [line for line in lines[:created] if line.startswith(":")]
    assert any(re.match(r"^: loading \d+% \[\d+\.\d s\] ", line) for line in comments), comments
    assert not any(line.startswith(":") for line in lines[created:])  # the engine's, untouched

    # The SDK reads it all: the queued event, then the engine's answer.
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        await http.post("/v1/models/unload", params={"model": "gpt-oss-20b"})
    try:
        async with client.responses.stream(
            model="20b", input="ping", extra_headers=headers
        ) as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_response()
    finally:
        await client.close()
    assert kinds[:3] == ["response.created", "response.queued", "response.created"]
    assert final.output_text == ANSWER
