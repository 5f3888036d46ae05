"""The demo engine, run as a real subprocess and spoken to over HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = "demo-model"
LOAD_LINES = [
    f"INFO Loading model weights for {MODEL}",
    "INFO Loading safetensors checkpoint shards: 1/4",
    "INFO Loading safetensors checkpoint shards: 4/4",
    "INFO Capturing CUDA graphs",
    f"INFO Model {MODEL} loaded in ",
]
SLEEP_MODE = (
    "--enable-sleep-mode",
    "--load-seconds",
    "0",
    "--sleep-seconds",
    "0.05",
    "--wake-seconds",
    "0.05",
    "--reload-seconds",
    "0.05",
)
ANSWER = f"Hello from {MODEL}. You said: hi"
RELOAD = {"method": "reload_weights"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EngineProcess:
    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "switchd.demo.engine", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*cmd, "--model", MODEL, *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.proc.stdout is not None
        # Non-blocking reads tell exactly what was written so far, with no reader thread.
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.output = b""
        self.client = httpx.Client(base_url=self.base, timeout=5.0)

    def drain(self) -> str:
        assert self.proc.stdout is not None
        while True:
            try:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.output += chunk
        return self.output.decode()

    def lines(self) -> list[str]:
        return self.drain().splitlines()

    def health(self) -> int | None:
        try:
            return self.client.get("/health").status_code
        except httpx.TransportError:
            return None

    def wait_listening(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.health()
            if status is not None:
                return status
            assert self.proc.poll() is None, self.drain()
            time.sleep(0.02)
        pytest.fail(f"engine never listened:\n{self.drain()}")

    def wait_healthy(self, timeout: float = 10.0) -> list[str]:
        """Polls until 200 and returns the stdout lines present at that moment."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.health() == 200:
                return self.lines()
            assert self.proc.poll() is None, self.drain()
            time.sleep(0.02)
        pytest.fail(f"engine never became healthy:\n{self.drain()}")

    def wait_exit(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"engine still running after {timeout}s:\n{self.drain()}")
        self.drain()
        return code

    def close(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def chat(content: str, **extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


@pytest.fixture
def start() -> Iterator[type[EngineProcess]]:
    started: list[EngineProcess] = []

    class Tracked(EngineProcess):
        def __init__(self, *args: str) -> None:
            super().__init__(*args)
            started.append(self)

    yield Tracked
    for engine in started:
        engine.close()


@pytest.fixture(scope="module")
def ready() -> Iterator[EngineProcess]:
    engine = EngineProcess("--load-seconds", "0.2", "--tokens-per-second", "20")
    try:
        engine.wait_healthy()
        yield engine
    finally:
        engine.close()


def test_health_is_503_while_loading_then_200_after_log(start: type[EngineProcess]) -> None:
    engine = start("--load-seconds", "1.5")
    assert engine.wait_listening() == 503
    assert engine.client.get("/health").json() == {"status": "loading"}
    seen = engine.wait_healthy()
    assert engine.client.get("/health").json() == {"status": "ok"}
    positions = []
    for expected in LOAD_LINES:
        matches = [i for i, line in enumerate(seen) if line.startswith(expected)]
        assert matches, f"{expected!r} not printed before health turned 200: {seen}"
        positions.append(matches[0])
    assert positions == sorted(positions)
    assert len(seen) >= 4


def test_requests_while_loading_get_503(start: type[EngineProcess]) -> None:
    engine = start("--load-seconds", "30")
    engine.wait_listening()
    response = engine.client.post("/v1/chat/completions", json=chat("hi"))
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "model_loading"


def test_chat_non_streamed(ready: EngineProcess) -> None:
    response = ready.client.post("/v1/chat/completions", json=chat("how are you"))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": f"Hello from {MODEL}. You said: how are you",
    }
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}

    capped = ready.client.post("/v1/chat/completions", json=chat("x", max_tokens=2)).json()
    assert capped["choices"][0]["message"]["content"] == "Hello from"
    assert capped["usage"]["completion_tokens"] == 2


def test_chat_streamed_spreads_chunks_over_time(ready: EngineProcess) -> None:
    arrivals: list[tuple[float, str]] = []
    payload = chat("tell me a story please", stream=True, max_tokens=6)
    with ready.client.stream("POST", "/v1/chat/completions", json=payload) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["cache-control"] == "no-cache"
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.monotonic(), line.removeprefix("data: ")))
    assert arrivals[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in arrivals[:-1]]
    assert len(chunks) >= 3
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in {"stop", "length"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == f"Hello from {MODEL}. You said: tell"
    assert arrivals[-2][0] - arrivals[0][0] >= 0.15


def test_wrong_model_and_bad_json(ready: EngineProcess) -> None:
    response = ready.client.post("/v1/chat/completions", json={**chat("hi"), "model": "other"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "model_not_found"
    assert "other" in error["message"]

    bad = ready.client.post("/v1/completions", content=b"{not json")
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_json"


def test_models_completions_embeddings(ready: EngineProcess) -> None:
    models = ready.client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == [
        (MODEL, "model", "switchd-demo")
    ]
    assert isinstance(models["data"][0]["created"], int)

    completion = ready.client.post("/v1/completions", json={"model": MODEL, "prompt": "abc"})
    assert completion.json()["object"] == "text_completion"
    assert completion.json()["choices"][0]["text"].endswith("abc")

    one = ready.client.post("/v1/embeddings", json={"model": MODEL, "input": "abc"}).json()
    many = ready.client.post("/v1/embeddings", json={"input": ["abc", "xyz"]}).json()
    assert len(one["data"][0]["embedding"]) == 8
    assert many["data"][0]["embedding"] == one["data"][0]["embedding"]
    assert many["data"][1]["embedding"] != one["data"][0]["embedding"]


# ---- the Responses API --------------------------------------------------------------------

RESPONSE_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 8,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def test_responses_non_streamed(ready: EngineProcess) -> None:
    response = ready.client.post("/v1/responses", json={"model": MODEL, "input": "how are you"})
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("resp_")
    assert body["object"] == "response"
    assert isinstance(body["created_at"], int)
    assert (body["status"], body["model"], body["error"]) == ("completed", MODEL, None)
    assert body["incomplete_details"] is None
    [message] = body["output"]
    assert message["id"].startswith("msg_")
    assert (message["type"], message["role"], message["status"]) == (
        "message",
        "assistant",
        "completed",
    )
    answer = f"Hello from {MODEL}. You said: how are you"
    assert message["content"] == [{"type": "output_text", "text": answer, "annotations": []}]
    assert body["usage"] == {"input_tokens": 3, "output_tokens": 8, "total_tokens": 11}

    # Message items with typed parts; the budget is max_output_tokens.
    items = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "input_text", "text": "x y"}]},
    ]
    capped = ready.client.post(
        "/v1/responses", json={"input": items, "max_output_tokens": 2, "instructions": "terse"}
    ).json()
    assert capped["status"] == "incomplete"
    assert capped["incomplete_details"] == {"reason": "max_output_tokens"}
    assert capped["output"][0]["content"][0]["text"] == "Hello from"
    assert capped["usage"] == {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}

    bad = ready.client.post("/v1/responses", json={"input": "x", "max_output_tokens": 0})
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == "max_output_tokens must be a positive integer."


def test_responses_streamed_as_semantic_events(ready: EngineProcess) -> None:
    payload = {"model": MODEL, "input": "a b c", "stream": True}
    names: list[str] = []
    events: list[dict[str, Any]] = []
    with ready.client.stream("POST", "/v1/responses", json=payload) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                names.append(line.removeprefix("event: "))
            elif line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    assert names == RESPONSE_EVENTS  # no `[DONE]`: response.completed ends it
    assert [event["type"] for event in events] == RESPONSE_EVENTS
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    created, completed = events[0]["response"], events[-1]["response"]
    assert (created["status"], created["output"], created["usage"]) == ("in_progress", [], None)
    assert created["id"] == completed["id"]
    answer = f"Hello from {MODEL}. You said: a b c"
    deltas = [event for event in events if event["type"] == "response.output_text.delta"]
    assert "".join(event["delta"] for event in deltas) == answer
    message_id = events[2]["item"]["id"]
    assert all(
        (event["item_id"], event["output_index"], event["content_index"]) == (message_id, 0, 0)
        for event in deltas
    )
    assert events[-4]["text"] == answer
    assert completed["status"] == "completed"
    assert completed["output"][0]["id"] == message_id
    assert completed["output"][0]["content"][0]["text"] == answer
    assert completed["usage"] == {"input_tokens": 3, "output_tokens": 8, "total_tokens": 11}


def test_responses_read_by_the_openai_sdk(ready: EngineProcess) -> None:
    client = openai.OpenAI(base_url=f"{ready.base}/v1", api_key="unused", max_retries=0)
    try:
        answer = client.responses.create(model=MODEL, input="hi")
        assert answer.output_text == ANSWER
        assert answer.status == "completed"
        with client.responses.stream(model=MODEL, input="hi") as stream:
            kinds = [event.type for event in stream]
            final = stream.get_final_response()
    finally:
        client.close()
    assert kinds == [
        *RESPONSE_EVENTS[:4],
        *["response.output_text.delta"] * 6,
        *RESPONSE_EVENTS[-4:],
    ]
    assert final.output_text == ANSWER


def test_fail_after_exits_1_with_error_lines(start: type[EngineProcess]) -> None:
    engine = start("--load-seconds", "10", "--fail-after", "0.5")
    assert engine.wait_exit(timeout=10) == 1
    lines = engine.lines()
    assert any("CUDA out of memory" in line for line in lines), lines
    assert sum(line.startswith("ERROR") for line in lines) >= 2
    assert not any("loaded in" in line for line in lines)


@pytest.mark.parametrize("load_seconds", ["0.2", "30"])
def test_sigterm_exits_0(start: type[EngineProcess], load_seconds: str) -> None:
    engine = start("--load-seconds", load_seconds)
    if load_seconds == "30":
        engine.wait_listening()
    else:
        engine.wait_healthy()
    engine.proc.send_signal(signal.SIGTERM)
    assert engine.wait_exit(timeout=5) == 0
    assert f"INFO Shutting down {MODEL}" in engine.lines()


def test_sigterm_with_open_stream_exits_promptly(start: type[EngineProcess]) -> None:
    engine = start("--load-seconds", "0.1", "--tokens-per-second", "1")
    engine.wait_healthy()
    payload = chat("a slow answer", stream=True)
    with engine.client.stream("POST", "/v1/chat/completions", json=payload) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        began = time.monotonic()
        engine.proc.send_signal(signal.SIGTERM)
        assert engine.wait_exit(timeout=5) == 0
        assert time.monotonic() - began < 1.5
        assert "data: [DONE]" not in list(lines)


def sleepy(start: type[EngineProcess], *extra: str) -> EngineProcess:
    """An engine with the sleep API and short sleep, wake and reload times, loaded."""
    engine = start(*SLEEP_MODE, *extra)
    engine.wait_healthy()
    return engine


def is_sleeping(engine: EngineProcess) -> bool:
    response = engine.client.get("/is_sleeping")
    assert response.status_code == 200, response.text
    value = response.json()["is_sleeping"]
    assert isinstance(value, bool)
    return value


def code(response: httpx.Response) -> str:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    value: str = error["code"]
    return value


def assert_answers(engine: EngineProcess) -> None:
    response = engine.client.post("/v1/chat/completions", json=chat("hi"))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == ANSWER


def assert_generation_refused(engine: EngineProcess, status: int, error_code: str) -> None:
    requests = [
        ("/v1/chat/completions", chat("hi")),
        ("/v1/completions", {"model": MODEL, "prompt": "hi"}),
        ("/v1/embeddings", {"model": MODEL, "input": "hi"}),
    ]
    for path, payload in requests:
        response = engine.client.post(path, json=payload)
        assert response.status_code == status, (path, response.text)
        assert code(response) == error_code


def assert_in_order(lines: list[str], patterns: list[str]) -> None:
    """Each pattern fully matches some line, each after the line the previous matched."""
    at = 0
    for pattern in patterns:
        found = [i for i in range(at, len(lines)) if re.fullmatch(pattern, lines[i])]
        assert found, f"{pattern!r} not printed after line {at}: {lines}"
        at = found[0] + 1


def test_sleep_api_is_404_without_sleep_mode(ready: EngineProcess) -> None:
    calls = [
        ("POST", "/sleep?level=1"),
        ("POST", "/wake_up"),
        ("GET", "/is_sleeping"),
        ("POST", "/collective_rpc"),
    ]
    for method, path in calls:
        assert ready.client.request(method, path, json=RELOAD).status_code == 404, path
    assert_answers(ready)


def test_level_1_sleep_and_wake_up(start: type[EngineProcess]) -> None:
    engine = sleepy(start)
    assert not is_sleeping(engine)
    response = engine.client.post("/sleep", params={"level": "1"})
    assert response.status_code == 200
    assert response.content == b""
    assert is_sleeping(engine)
    assert engine.client.get("/health").status_code == 200
    models = engine.client.get("/v1/models")
    assert models.status_code == 200
    assert [m["id"] for m in models.json()["data"]] == [MODEL]
    assert_generation_refused(engine, 503, "engine_sleeping")
    # Sleeping again is a no-op.
    assert engine.client.post("/sleep", params={"level": "2"}).status_code == 200
    assert is_sleeping(engine)

    woken = engine.client.post("/wake_up")
    assert woken.status_code == 200
    assert woken.content == b""
    assert not is_sleeping(engine)
    # Level 1 kept the weights: no reload needed.
    assert_answers(engine)
    # Waking an awake engine is a no-op.
    assert engine.client.post("/wake_up").status_code == 200
    assert not is_sleeping(engine)
    assert_answers(engine)
    assert_in_order(
        engine.lines(),
        [
            r"INFO Putting the engine to sleep \(level 1\)",
            r"INFO It took \d+\.\d\d seconds to fall asleep\.",
            r"WARNING Executor is already sleeping\.",
            r"INFO Waking up the engine \(tags: weights, kv_cache\)",
            r"INFO It took \d+\.\d\d seconds to wake up tags \['weights', 'kv_cache'\]\.",
            r"WARNING Executor is not sleeping\.",
        ],
    )
    assert not any(line.startswith("ERROR") for line in engine.lines())


def test_level_2_wake_up_without_reload_answers_weights_not_loaded(
    start: type[EngineProcess],
) -> None:
    engine = sleepy(start)
    assert engine.client.post("/sleep", params={"level": "2"}).status_code == 200
    assert is_sleeping(engine)
    assert_generation_refused(engine, 503, "engine_sleeping")
    assert engine.client.post("/wake_up").status_code == 200
    assert not is_sleeping(engine)
    assert engine.client.get("/health").status_code == 200
    assert_generation_refused(engine, 500, "weights_not_loaded")
    error = engine.client.post("/v1/chat/completions", json=chat("hi")).json()["error"]
    assert error["type"] == "server_error"
    assert "reload_weights" in error["message"]

    reloaded = engine.client.post("/collective_rpc", json=RELOAD)
    assert reloaded.status_code == 200
    assert reloaded.json() == {"results": [None]}
    assert_answers(engine)
    assert_in_order(
        engine.lines(),
        [
            r"INFO Putting the engine to sleep \(level 2\)",
            r"INFO It took \d+\.\d\d seconds to fall asleep\.",
            r"INFO Waking up the engine \(tags: weights, kv_cache\)",
            f"INFO Reloading weights for {MODEL}",
            r"INFO Reloaded weights in \d+\.\d\d s",
        ],
    )


def test_level_2_documented_tag_sequence(start: type[EngineProcess]) -> None:
    engine = sleepy(start)
    assert engine.client.post("/sleep", params={"level": "2"}).status_code == 200
    # The weights must be awake before they can be reloaded.
    early = engine.client.post("/collective_rpc", json=RELOAD)
    assert early.status_code == 503
    assert code(early) == "engine_sleeping"

    assert engine.client.post("/wake_up", params={"tags": "weights"}).status_code == 200
    assert is_sleeping(engine)
    assert_generation_refused(engine, 503, "engine_sleeping")
    assert engine.client.post("/collective_rpc", json=RELOAD).status_code == 200
    assert is_sleeping(engine)
    # Waking a tag that is already awake is a no-op.
    assert engine.client.post("/wake_up", params={"tags": "weights"}).status_code == 200
    assert is_sleeping(engine)
    assert_generation_refused(engine, 503, "engine_sleeping")

    assert engine.client.post("/wake_up", params={"tags": "kv_cache"}).status_code == 200
    assert not is_sleeping(engine)
    assert_answers(engine)
    assert_in_order(
        engine.lines(),
        [
            r"INFO Putting the engine to sleep \(level 2\)",
            r"INFO Waking up the engine \(tags: weights\)",
            r"INFO It took \d+\.\d\d seconds to wake up tags \['weights'\]\.",
            r"INFO Reloaded weights in \d+\.\d\d s",
            r"WARNING Tags \['weights'\] are not in sleeping tags \['kv_cache'\]\.",
            r"INFO Waking up the engine \(tags: kv_cache\)",
            r"INFO It took \d+\.\d\d seconds to wake up tags \['kv_cache'\]\.",
        ],
    )


def test_wake_up_takes_repeated_tags_and_refuses_unknown_ones(
    start: type[EngineProcess],
) -> None:
    engine = sleepy(start)
    assert engine.client.post("/sleep", params={"level": "1"}).status_code == 200
    unknown = engine.client.post("/wake_up", params={"tags": "everything"})
    assert unknown.status_code == 400
    assert code(unknown) == "invalid_value"
    assert is_sleeping(engine)
    both = {"tags": ["kv_cache", "weights"]}
    assert engine.client.post("/wake_up", params=both).status_code == 200
    assert not is_sleeping(engine)
    assert_answers(engine)
    assert "INFO Waking up the engine (tags: weights, kv_cache)" in engine.lines()


def test_fail_sleep_answers_500_and_stays_awake(start: type[EngineProcess]) -> None:
    engine = sleepy(start, "--fail-sleep")
    response = engine.client.post("/sleep", params={"level": "1"})
    assert response.status_code == 500
    assert code(response) == "sleep_failed"
    assert response.json()["error"]["type"] == "server_error"
    assert not is_sleeping(engine)
    assert_answers(engine)
    lines = engine.lines()
    assert "INFO Putting the engine to sleep (level 1)" in lines
    assert any(line.startswith("ERROR Failed to put the engine to sleep") for line in lines)
    assert not any("to fall asleep" in line for line in lines)


def test_fail_wake_answers_500_and_stays_asleep(start: type[EngineProcess]) -> None:
    engine = sleepy(start, "--fail-wake")
    assert engine.client.post("/sleep", params={"level": "1"}).status_code == 200
    response = engine.client.post("/wake_up")
    assert response.status_code == 500
    assert code(response) == "wake_up_failed"
    assert response.json()["error"]["type"] == "server_error"
    assert is_sleeping(engine)
    assert_generation_refused(engine, 503, "engine_sleeping")
    assert engine.client.get("/health").status_code == 200
    lines = engine.lines()
    assert any(line.startswith("ERROR Failed to wake up the engine") for line in lines)
    assert not any("to wake up tags" in line for line in lines)


def test_invalid_sleep_level_is_400(start: type[EngineProcess]) -> None:
    engine = sleepy(start)
    for level in ["0", "3", "-1", "abc", "1.5", ""]:
        response = engine.client.post("/sleep", params={"level": level})
        assert response.status_code == 400, level
        assert code(response) == "invalid_value"
        assert not is_sleeping(engine)
    assert_answers(engine)
    # Without a level, vLLM sleeps at level 1.
    assert engine.client.post("/sleep").status_code == 200
    assert is_sleeping(engine)
    assert "INFO Putting the engine to sleep (level 1)" in engine.lines()


def test_sleep_and_reload_while_loading_are_503(start: type[EngineProcess]) -> None:
    engine = start(*SLEEP_MODE, "--load-seconds", "30")
    assert engine.wait_listening() == 503
    response = engine.client.post("/sleep", params={"level": "1"})
    assert response.status_code == 503
    assert code(response) == "model_loading"
    assert not is_sleeping(engine)
    reload = engine.client.post("/collective_rpc", json=RELOAD)
    assert reload.status_code == 503
    assert code(reload) == "model_loading"
    assert engine.client.post("/wake_up").status_code == 200
    assert engine.client.get("/health").status_code == 503


def test_collective_rpc_refuses_bad_bodies_and_other_methods(
    start: type[EngineProcess],
) -> None:
    engine = sleepy(start)
    bad = engine.client.post("/collective_rpc", content=b"{not json")
    assert bad.status_code == 400
    assert code(bad) == "invalid_json"
    listed = engine.client.post("/collective_rpc", json=["reload_weights"])
    assert listed.status_code == 400
    assert code(listed) == "invalid_json"
    for body in [{}, {"method": "sleep"}, {"method": 1}]:
        response = engine.client.post("/collective_rpc", json=body)
        assert response.status_code == 400, body
        assert code(response) == "invalid_value"
    assert not any("Reloading weights" in line for line in engine.lines())


def test_sleep_ends_open_streams(start: type[EngineProcess]) -> None:
    engine = sleepy(start, "--tokens-per-second", "5")
    payload = chat("a slow answer", stream=True, max_tokens=50)
    with engine.client.stream("POST", "/v1/chat/completions", json=payload) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        began = time.monotonic()
        assert engine.client.post("/sleep", params={"level": "1"}).status_code == 200
        rest = list(lines)
        assert time.monotonic() - began < 1.5
    assert "data: [DONE]" not in rest
    assert is_sleeping(engine)


def test_sleep_calls_are_serialised_and_health_answers_meanwhile(
    start: type[EngineProcess],
) -> None:
    engine = sleepy(start, "--sleep-seconds", "1.0")

    def post(path: str) -> int:
        with httpx.Client(base_url=engine.base, timeout=5.0) as client:
            return client.post(path).status_code

    with ThreadPoolExecutor(max_workers=2) as pool:
        sleeping = pool.submit(post, "/sleep?level=1")
        deadline = time.monotonic() + 5
        while "INFO Putting the engine to sleep (level 1)" not in engine.lines():
            assert time.monotonic() < deadline, engine.drain()
            time.sleep(0.01)
        # Falling asleep: the server still answers, and generation is already refused.
        assert engine.client.get("/health").status_code == 200
        assert not is_sleeping(engine)
        assert_generation_refused(engine, 503, "engine_sleeping")
        assert not sleeping.done()
        # A wake_up sent meanwhile waits for the sleep instead of finding nothing asleep.
        waking = pool.submit(post, "/wake_up")
        assert sleeping.result() == 200
        assert waking.result() == 200
    assert not is_sleeping(engine)
    assert_answers(engine)
    assert_in_order(
        engine.lines(),
        [
            r"INFO It took \d+\.\d\d seconds to fall asleep\.",
            r"INFO Waking up the engine \(tags: weights, kv_cache\)",
        ],
    )
    assert "WARNING Executor is not sleeping." not in engine.lines()


def test_sleep_records_the_mode_asked_and_refuses_an_unknown_one(
    start: type[EngineProcess],
) -> None:
    engine = sleepy(start)
    refused = engine.client.post("/sleep", params={"level": "1", "mode": "later"})
    assert refused.status_code == 400
    assert code(refused) == "invalid_value"
    assert not is_sleeping(engine)
    assert engine.client.post("/sleep", params={"level": "1", "mode": "wait"}).status_code == 200
    assert is_sleeping(engine)
    assert engine.client.post("/wake_up").status_code == 200
    # Without a mode, vLLM aborts what is in flight: the demo says so too.
    assert engine.client.post("/sleep", params={"level": "1"}).status_code == 200
    modes = [line for line in engine.lines() if line.startswith("INFO Sleep mode:")]
    assert modes == ["INFO Sleep mode: wait", "INFO Sleep mode: abort"]


def test_models_lists_max_model_len_and_props_gives_n_ctx(start: type[EngineProcess]) -> None:
    engine = start("--load-seconds", "0", "--max-model-len", "8192")
    engine.wait_healthy()
    models = engine.client.get("/v1/models").json()
    assert models["data"][0]["max_model_len"] == 8192
    props = engine.client.get("/props").json()
    assert props["default_generation_settings"]["n_ctx"] == 8192
