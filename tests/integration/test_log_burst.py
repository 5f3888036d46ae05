"""An engine that prints 1,500 lines while loading loses no reader its stages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator

import httpx

from switchd.client import ServerEvent, SseParser
from tests.integration.conftest import ServerFactory
from tests.integration.server import seed_models

SSE = {"Accept": "text/event-stream"}
LINES = 1500
CHATTY_CMD = (
    "sh -c 'for i in $(seq "
    f"{LINES}"
    "); do echo line $i; done; "
    "exec ${PYTHON} -m switchd.demo.engine --port ${PORT} --model ${MODEL} --load-seconds 0.5'"
)
WITHIN = 30.0


async def events_of(response: httpx.Response) -> AsyncGenerator[ServerEvent, None]:
    """Every event of one stream, until the server ends it."""
    parser = SseParser()
    async for line in response.aiter_lines():
        if (event := parser.feed(line)) is not None:
            yield event


async def until(events: AsyncIterator[ServerEvent], name: str) -> list[ServerEvent]:
    """Events up to and including the first named `name`; [] plus what came if it ended."""
    got: list[ServerEvent] = []
    async for event in events:
        got.append(event)
        if event.name == name:
            break
    return got


def of_job(events: list[ServerEvent], job: str) -> list[str]:
    return [e.name for e in events if e.data.get("job") == job and e.name != "log"]


async def test_a_chatty_engine_loses_no_follower_its_stages(make_server: ServerFactory) -> None:
    models = seed_models()
    models["chatty"] = {"cmd": CHATTY_CMD, "size_gb": 10, "load_time_seconds": 1}
    server = make_server(models)
    timeout = httpx.Timeout(WITHIN)
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=timeout) as fast_http,
        httpx.AsyncClient(base_url=server.url, timeout=timeout) as slow_http,
        httpx.AsyncClient(base_url=server.url, timeout=timeout) as switch_http,
        fast_http.stream("GET", "/v1/events") as fast_response,
        slow_http.stream("GET", "/v1/events") as slow_response,
    ):
        fast_events = events_of(fast_response)
        slow_events = events_of(slow_response)
        # Both followers are subscribed once their snapshot came.
        fast_opening = await asyncio.wait_for(until(fast_events, "snapshot"), WITHIN)
        slow_opening = await asyncio.wait_for(until(slow_events, "snapshot"), WITHIN)
        assert fast_opening[-1].name == slow_opening[-1].name == "snapshot"

        async def switch() -> list[ServerEvent]:
            params = {"target_model": "chatty", "stream": "true"}
            async with switch_http.stream(
                "POST", "/v1/models/switch", params=params, headers=SSE
            ) as response:
                assert response.status_code == 200
                return await until(events_of(response), "result")

        # One follower reads as fast as it can while the switch runs ...
        fast_task = asyncio.create_task(asyncio.wait_for(until(fast_events, "result"), WITHIN))
        switched = await asyncio.wait_for(switch(), WITHIN)
        fast = await fast_task
        # ... the other reads nothing until the switch is over, then catches up.
        slow = await asyncio.wait_for(until(slow_events, "result"), WITHIN)

        await fast_events.aclose()
        await slow_events.aclose()
        status = (await switch_http.get("/v1/models/status")).json()

    assert switched[-1].name == "result", [e.name for e in switched]
    job = switched[-1].data["job"]
    switch_stages = of_job(switched, job)
    assert switch_stages[0] == "memory_check"
    assert switch_stages[-2:] == ["ready", "result"]
    for name, seen in (("switch", switched), ("fast", fast), ("slow", slow)):
        # The stream did not end early: it went on to the job's last event.
        assert seen, name
        assert seen[-1].name == "result", (name, [e.name for e in seen][-5:])
        stages = of_job(seen, job)
        assert "start" in stages, (name, stages)
        assert stages[-2:] == ["ready", "result"], (name, stages)
        assert stages == switch_stages, name
        ids = [int(e.id or 0) for e in seen]
        assert ids == sorted(ids), name
        # Some of the engine's lines came, in order, and never more than it printed.
        lines = [e.data["line"] for e in seen if e.name == "log"]
        printed = [line for line in lines if line.startswith("line ")]
        assert printed, name
        assert printed[0] == "line 1", name
        numbers = [int(line.removeprefix("line ")) for line in printed]
        assert numbers == sorted(numbers), name
        assert len(numbers) <= LINES, name
    assert status["models"]["chatty"]["status"] == "running"
