"""The Responses API (`POST /v1/responses`) through switchd, to a real demo engine."""

from __future__ import annotations

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
