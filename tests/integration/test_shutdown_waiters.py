"""At SIGTERM, requests waiting for a load are answered: JSON 503 `shutting_down`
with Retry-After, or an OpenAI error event on a progress stream that has begun;
no traceback per waiter in the log."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.integration.conftest import ServerFactory
from tests.integration.server import engine_cmd
from tests.integration.test_proxy import CHAT, chat


async def test_waiting_requests_hear_shutting_down_at_sigterm(make_server: ServerFactory) -> None:
    models = {"slow": {"cmd": engine_cmd(30), "size_gb": 10, "load_time_seconds": 30}}
    server = make_server(models)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        plain = [asyncio.create_task(http.post(CHAT, json=chat("slow"))) for _ in range(3)]
        streamed: list[bytes] = []

        async def progress_stream() -> int:
            body = {**chat("slow"), "stream": True}
            headers = {"X-Switchd-Progress": "on"}
            async with http.stream("POST", CHAT, json=body, headers=headers) as response:
                async for chunk in response.aiter_bytes():
                    streamed.append(chunk)
                return response.status_code

        stream = asyncio.create_task(progress_stream())
        async with asyncio.timeout(10):
            while b"".join(streamed).count(b"data:") < 1 or await waiting(http) < 4:  # noqa: ASYNC110 - polls another process
                await asyncio.sleep(0.05)
        assert await asyncio.to_thread(server.stop) == 0
        answers = await asyncio.gather(*plain)
        assert await stream == 200
    for answer in answers:
        assert answer.status_code == 503
        assert answer.headers["content-type"] == "application/json"
        assert int(answer.headers["retry-after"]) >= 1
        assert answer.json()["error"]["code"] == "shutting_down"
    events = [
        line.removeprefix(b"data: ")
        for line in b"".join(streamed).split(b"\n\n")
        if line.startswith(b"data: ")
    ]
    last = json.loads(events[-1]) if events[-1] != b"[DONE]" else json.loads(events[-2])
    assert last["error"]["code"] == "shutting_down"
    assert "Traceback" not in server.log()


async def waiting(http: httpx.AsyncClient) -> int:
    """How many requests wait for a load, from status."""
    return int((await http.get("/v1/models/status")).json()["waiting"])
