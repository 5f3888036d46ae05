"""The demo engine, run as a real subprocess and spoken to over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
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
