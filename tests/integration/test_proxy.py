"""The OpenAI-compatible proxy against a real switchd with real demo engines."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from switchd.units import gib_to_bytes
from tests.integration.conftest import ServerFactory
from tests.integration.server import Server, engine_cmd, read_events, seed_models, write_config

CHAT = "/v1/chat/completions"
SSE = {"Accept": "text/event-stream"}
KNOWN = "deepseek-coder-33b-instruct, gpt-oss-120b, gpt-oss-20b, mistral-7b-v0.1"
TCP_ESTABLISHED = "01"


def chat(model: str, text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def openai_error(message: str, kind: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": code}}


async def model_status(http: httpx.AsyncClient, model: str) -> dict[str, Any]:
    response = await http.get("/v1/models/status")
    assert response.status_code == 200
    return dict(response.json()["models"][model])


async def wait_for_status(
    http: httpx.AsyncClient, model: str, key: str, value: object, within: float
) -> dict[str, Any]:
    """Poll the model's status until `key` is `value`; fails past `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        status = await model_status(http, model)
        if status[key] == value:
            return status
        assert time.monotonic() < deadline, f"{model}: {key} still {status[key]!r}"
        await asyncio.sleep(0.05)


async def switch_and_wait(http: httpx.AsyncClient, model: str) -> None:
    response = await http.post("/v1/models/switch", params={"target_model": model, "wait": "ready"})
    assert response.status_code == 200, response.text


def answer_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    content: str = response.json()["choices"][0]["message"]["content"]
    return content


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text, or None when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def established_to(port: int) -> int:
    """Established TCP connections whose far end is `port` on this machine."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if state == TCP_ESTABLISHED and int(remote.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


async def first_data_line(lines: AsyncIterator[str]) -> str:
    """Read up to the first `data:` line, leaving the stream open.

    The caller keeps `lines` referenced: a line iterator that is closed or
    collected closes the response with it.
    """
    async for line in lines:
        if line.startswith("data:"):
            return line
    raise AssertionError("the stream ended before its first data line")


async def timed_data_lines(response: httpx.Response) -> list[tuple[float, str]]:
    """(arrival time, payload) of each `data:` line, until `[DONE]` or the end."""
    received: list[tuple[float, str]] = []
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            payload = line.removeprefix("data:").strip()
            received.append((time.monotonic(), payload))
            if payload == "[DONE]":
                break
    return received


# ---- load on demand, streaming, aliases ---------------------------------------


async def test_on_demand_load_serves_the_first_request(make_server: ServerFactory) -> None:
    server = make_server(seed_models(0.3))
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        before = await model_status(http, "gpt-oss-20b")
        assert before["status"] == "exited"
        assert before["last_used"] is None
        sent = time.time()
        response = await http.post(CHAT, json=chat("gpt-oss-20b", "ping"))
        answered = time.time()
        assert answer_of(response) == "Hello from gpt-oss-20b. You said: ping"
        assert response.json()["model"] == "gpt-oss-20b"
        after = await model_status(http, "gpt-oss-20b")
        assert after["status"] == "running"
        assert after["in_flight"] == 0
        used = datetime.fromisoformat(after["last_used"]).timestamp()
        assert sent - 0.01 <= used <= answered + 0.01
        # Only the requested model was loaded.
        assert (await model_status(http, "gpt-oss-120b"))["status"] == "exited"


async def test_streamed_chunks_arrive_one_by_one(make_server: ServerFactory) -> None:
    models = seed_models(0.3)
    models["gpt-oss-20b"]["cmd"] = engine_cmd(0.3, "--tokens-per-second 10")
    server = make_server(models)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        await switch_and_wait(http, "gpt-oss-20b")
        body = chat("gpt-oss-20b", "hi", stream=True, max_tokens=6)
        async with http.stream("POST", CHAT, json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["x-accel-buffering"] == "no"
            received = await asyncio.wait_for(timed_data_lines(response), 10)
    payloads = [payload for _, payload in received]
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert text == "Hello from gpt-oss-20b. You said: hi"
    assert len(chunks) == 7  # six tokens, then the one carrying finish_reason
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    times = [at for at, _ in received]
    assert times[-1] - times[0] >= 0.4
    # Buffering would deliver the tokens together; one by one they are ~0.1 s apart.
    token_times = times[:6]
    gaps = [later - earlier for earlier, later in itertools.pairwise(token_times)]
    assert sum(gap >= 0.05 for gap in gaps) >= 4, gaps


async def test_an_alias_is_answered_by_its_model(make_server: ServerFactory) -> None:
    server = make_server(seed_models(0.3))
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        # The engine 404s a model name it does not know: a 200 proves the rewrite.
        response = await http.post(CHAT, json=chat("20b", "alias"))
        assert answer_of(response) == "Hello from gpt-oss-20b. You said: alias"
        assert response.json()["model"] == "gpt-oss-20b"
        assert (await model_status(http, "gpt-oss-20b"))["status"] == "running"
        # Non-chat routes are rewritten too.
        response = await http.post("/v1/embeddings", json={"model": "20b", "input": "x"})
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "gpt-oss-20b"


# ---- errors, with their status and exact body -------------------------------


@pytest.fixture(scope="module")
def error_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = write_config(tmp_path_factory.mktemp("errors"), seed_models(0.3), max_body_bytes=2000)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def error_client(error_server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=error_server.url, timeout=30) as http:
        yield http


ERROR_CASES: list[Any] = [
    pytest.param(
        json.dumps(chat("gpt-5")).encode(),
        404,
        openai_error(
            f"Unknown model 'gpt-5'; known models: {KNOWN}",
            "invalid_request_error",
            "model_not_found",
        ),
        id="unknown-model",
    ),
    pytest.param(
        b'{"model": "gpt-oss-20b", ',
        400,
        openai_error("The request body is not valid JSON", "invalid_request_error", "invalid_json"),
        id="not-json",
    ),
    pytest.param(
        b"\xff\xfe not utf-8",
        400,
        openai_error("The request body is not valid JSON", "invalid_request_error", "invalid_json"),
        id="not-utf8",
    ),
    pytest.param(
        b'[{"model": "gpt-oss-20b"}]',
        400,
        openai_error(
            "The request body must be a JSON object", "invalid_request_error", "invalid_json"
        ),
        id="json-array",
    ),
    pytest.param(
        b'{"messages": []}',
        400,
        openai_error(
            "The request body has no `model` field", "invalid_request_error", "missing_model"
        ),
        id="model-missing",
    ),
    pytest.param(
        b'{"model": 20}',
        400,
        openai_error(
            "`model` must be a non-empty string", "invalid_request_error", "invalid_model"
        ),
        id="model-not-a-string",
    ),
    pytest.param(
        b'{"model": ""}',
        400,
        openai_error(
            "`model` must be a non-empty string", "invalid_request_error", "invalid_model"
        ),
        id="model-empty",
    ),
    pytest.param(
        json.dumps(chat("gpt-oss-20b", "x" * 2000)).encode(),
        413,
        openai_error("Request body over 2000 bytes", "invalid_request_error", "request_too_large"),
        id="too-large",
    ),
]


@pytest.mark.parametrize(("body", "status", "expected"), ERROR_CASES)
async def test_errors_are_openai_shaped(
    error_client: httpx.AsyncClient, body: bytes, status: int, expected: dict[str, Any]
) -> None:
    headers = {"Content-Type": "application/json"}
    response = await error_client.post(CHAT, content=body, headers=headers)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json() == expected
    # A refused request loads nothing.
    assert (await model_status(error_client, "gpt-oss-20b"))["status"] == "exited"


async def test_a_chunked_body_over_the_cap_is_413(error_client: httpx.AsyncClient) -> None:
    async def pieces() -> AsyncIterator[bytes]:
        yield b'{"model": "gpt-oss-20b", "pad": "'
        for _ in range(10):
            yield b"x" * 500  # no Content-Length: the cap must count as it reads
        yield b'"}'

    response = await error_client.post(CHAT, content=pieces())
    assert response.status_code == 413
    assert response.json() == openai_error(
        "Request body over 2000 bytes", "invalid_request_error", "request_too_large"
    )


# ---- waiting for a load ----------------------------------------------------------


async def test_queue_timeout_is_503_with_retry_after(make_server: ServerFactory) -> None:
    models = {"slow": {"cmd": engine_cmd(3), "size_gb": 10, "load_time_seconds": 3}}
    server = make_server(models, request_timeout_seconds=0.5)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        started = time.monotonic()
        response = await http.post(CHAT, json=chat("slow"))
        waited = time.monotonic() - started
        assert response.status_code == 503
        assert response.json() == openai_error(
            "slow was not ready within 0.5 s", "server_error", "load_timeout"
        )
        retry_after = int(response.headers["retry-after"])
        assert retry_after >= 1
        assert retry_after == 3  # the model's estimated load time, rounded up
        assert 0.45 <= waited < 2.5
        # The load itself goes on for the next request.
        assert (await model_status(http, "slow"))["status"] == "loading"


async def test_bounded_queue_refuses_at_once_past_its_size(make_server: ServerFactory) -> None:
    models = {"slow": {"cmd": engine_cmd(2), "size_gb": 10, "load_time_seconds": 2}}
    server = make_server(models, max_waiting_requests=1)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        first = asyncio.create_task(http.post(CHAT, json=chat("slow", "first")))
        deadline = time.monotonic() + 5
        while (
            metric((await http.get("/metrics")).text, "switchd_waiting_requests", model="slow")
            != 1.0
        ):
            assert time.monotonic() < deadline, "the first request never waited"
            await asyncio.sleep(0.05)
        started = time.monotonic()
        second = await http.post(CHAT, json=chat("slow", "second"))
        refused_in = time.monotonic() - started
        assert second.status_code == 503
        assert second.json() == openai_error(
            "1 requests already wait for models to load; try again later",
            "server_error",
            "too_many_waiting",
        )
        assert int(second.headers["retry-after"]) == 2
        assert refused_in < 0.5
        assert not first.done()  # the load (~2 s) is still under way
        response = await asyncio.wait_for(first, 15)
        assert answer_of(response) == "Hello from slow. You said: first"


async def test_auto_switch_off_is_503_model_not_loaded(make_server: ServerFactory) -> None:
    server = make_server(seed_models(0.3), auto_switch=False)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        response = await http.post(CHAT, json=chat("20b"))
        assert response.status_code == 503
        assert response.json() == openai_error(
            "gpt-oss-20b is not loaded and auto_switch is off: switch to it first",
            "server_error",
            "model_not_loaded",
        )
        assert int(response.headers["retry-after"]) == 1
        assert (await model_status(http, "gpt-oss-20b"))["status"] == "exited"
        # Switched explicitly, the model serves.
        await switch_and_wait(http, "gpt-oss-20b")
        response = await http.post(CHAT, json=chat("20b", "now"))
        assert answer_of(response) == "Hello from gpt-oss-20b. You said: now"


# ---- in-flight requests: drain and disconnects ----------------------------------


async def test_drain_lets_a_long_stream_finish_before_its_model_stops(
    make_server: ServerFactory,
) -> None:
    models = seed_models(0.3)
    models["gpt-oss-120b"]["cmd"] = engine_cmd(0.3, "--tokens-per-second 10")
    server = make_server(models)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        await switch_and_wait(http, "gpt-oss-120b")
        streaming = asyncio.Event()
        received: list[tuple[float, str]] = []

        async def stream() -> None:
            body = chat("gpt-oss-120b", "long", stream=True, max_tokens=20, ignore_eos=True)
            async with http.stream("POST", CHAT, json=body) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        received.append((time.monotonic(), line.removeprefix("data:").strip()))
                        streaming.set()

        streamer = asyncio.create_task(stream())
        await asyncio.wait_for(streaming.wait(), 10)
        params = {"target_model": "gpt-oss-20b"}
        async with http.stream("POST", "/v1/models/switch", params=params, headers=SSE) as switch:
            assert switch.status_code == 200
            events = await read_events(switch, within=20)
        await asyncio.wait_for(streamer, 10)

    payloads = [payload for _, payload in received]
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    tokens = [c for c in chunks if c["choices"][0]["delta"].get("content") is not None]
    assert len(tokens) == 20
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    stream_ended = received[-1][0]

    names = [event.name for _, event in events]
    assert names[-1] == "result"
    assert events[-1][1].data["unloaded_models"] == ["gpt-oss-120b"]
    assert "drain" in names
    assert names.index("drain") < names.index("unload") < names.index("unloaded")
    drain_at, drain = next((at, e) for at, e in events if e.name == "drain")
    assert drain.data["victim"] == "gpt-oss-120b"
    assert drain.data["in_flight"] == 1
    unloaded_at = next(at for at, e in events if e.name == "unloaded")
    assert drain_at < stream_ended < unloaded_at


async def test_disconnects_free_their_slots_and_connections(make_server: ServerFactory) -> None:
    models = seed_models(0.3)
    models["gpt-oss-20b"]["cmd"] = engine_cmd(0.3, "--tokens-per-second 5")
    server = make_server(models)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        await switch_and_wait(http, "gpt-oss-20b")
        url = (await model_status(http, "gpt-oss-20b"))["engine"]["url"]
        engine_port = httpx.URL(url).port
        assert engine_port is not None
        body = chat("gpt-oss-20b", "long", stream=True, max_tokens=1000, ignore_eos=True)

        async with httpx.AsyncClient(base_url=server.url, timeout=30) as streams:

            async def open_stream() -> tuple[httpx.Response, AsyncIterator[str]]:
                response = await streams.send(
                    streams.build_request("POST", CHAT, json=body), stream=True
                )
                assert response.status_code == 200
                lines = response.aiter_lines()
                assert (await first_data_line(lines)).startswith("data: {")
                return response, lines

            opened = await asyncio.wait_for(asyncio.gather(*(open_stream() for _ in range(20))), 20)
            assert (await model_status(http, "gpt-oss-20b"))["in_flight"] == 20
            assert established_to(engine_port) >= 20  # the count sees the streams
            for response, _ in opened:
                await response.aclose()

        await wait_for_status(http, "gpt-oss-20b", "in_flight", 0, within=2)
        deadline = time.monotonic() + 2
        while (open_connections := established_to(engine_port)) > 3:
            assert time.monotonic() < deadline, f"{open_connections} connections still open"
            await asyncio.sleep(0.05)
        response = await http.post(CHAT, json=chat("gpt-oss-20b", "after"))
        assert answer_of(response) == "Hello from gpt-oss-20b. You said: after"
        assert (await model_status(http, "gpt-oss-20b"))["in_flight"] == 0


# ---- idle models -------------------------------------------------------------------


async def test_ttl_unloads_an_idle_model_and_a_racing_request_reloads_it(
    make_server: ServerFactory,
) -> None:
    models = {
        "gpt-oss-20b": {
            "cmd": engine_cmd(0.3),
            "size_gb": 24,
            "load_time_seconds": 1,
            "ttl_seconds": 1,
        }
    }
    server = make_server(models)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        response = await http.post(CHAT, json=chat("gpt-oss-20b", "one"))
        assert answer_of(response) == "Hello from gpt-oss-20b. You said: one"
        first_pid = (await model_status(http, "gpt-oss-20b"))["engine"]["pid"]

        # A request that arrives while the TTL unload is under way waits for a clean reload.
        async with http.stream("GET", "/v1/events") as events:
            seen = await read_events(events, stop=frozenset({"unload"}), within=5)
            unload = seen[-1][1]
            assert unload.data["victim"] == "gpt-oss-20b"
            racing = await asyncio.wait_for(http.post(CHAT, json=chat("gpt-oss-20b", "race")), 10)
            finished = time.monotonic()
        assert answer_of(racing) == "Hello from gpt-oss-20b. You said: race"
        status = await model_status(http, "gpt-oss-20b")
        assert status["status"] == "running"
        assert status["engine"]["pid"] != first_pid  # stopped by the TTL, then started again

        # Idle again: unloaded within about TTL + check interval + stop.
        await wait_for_status(http, "gpt-oss-20b", "status", "exited", within=4)
        assert time.monotonic() - finished >= 0.8  # not before the TTL ran out
        response = await http.post(CHAT, json=chat("gpt-oss-20b", "again"))
        assert answer_of(response) == "Hello from gpt-oss-20b. You said: again"
        assert (await model_status(http, "gpt-oss-20b"))["status"] == "running"


# ---- metrics -------------------------------------------------------------------------


async def test_metrics_count_what_the_test_did(make_server: ServerFactory) -> None:
    server = make_server(seed_models(0.3))
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        for text in ("one", "two"):
            assert answer_of(await http.post(CHAT, json=chat("gpt-oss-20b", text)))
        assert (await http.post(CHAT, json=chat("gpt-5"))).status_code == 404
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'switchd_requests_total{code="200",model="gpt-oss-20b"} 2.0' in text
    assert 'switchd_requests_total{code="404",model="unknown"} 1.0' in text
    assert 'switchd_model_state{model="gpt-oss-20b",state="running"} 1.0' in text
    assert metric(text, "switchd_model_state", model="gpt-oss-20b", state="exited") == 0.0
    assert metric(text, "switchd_model_state", model="gpt-oss-120b", state="exited") == 1.0
    assert metric(text, "switchd_request_duration_seconds_count", model="gpt-oss-20b") == 2.0
    assert metric(text, "switchd_in_flight_requests", model="gpt-oss-20b") == 0.0
    assert metric(text, "switchd_waiting_requests", model="gpt-oss-20b") == 0.0
    total = metric(text, "switchd_gpu_memory_bytes", device="0", kind="total")
    assert total == round(95.59 * 2**30)
    used = metric(text, "switchd_gpu_memory_bytes", device="0", kind="used")
    assert used == gib_to_bytes(24)
    assert metric(text, "switchd_gpu_memory_bytes", device="0", kind="free") == total - used
    switches = metric(text, "switchd_switch_duration_seconds_count", result="success")
    assert switches is not None
    assert switches >= 1
    for stage in ("memory_check", "start", "ready"):
        count = metric(text, "switchd_stage_duration_seconds_count", stage=stage)
        assert count is not None
        assert count >= 1, stage
