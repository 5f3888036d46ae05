"""A real inference engine behind a real switchd: llama.cpp's OpenAI-compatible
server (llama-cpp-python's `python -m llama_cpp.server`) on a tiny random GGUF
that the tests write themselves (tests/gguf_model.py), on the simulated card.

What switchd promises is checked against an engine it did not write: load on
demand, answers and streams, a switch that unloads, a kill mid-answer, a stop
whose memory is verified. llama-cpp-python has no /health: its /v1/models
answers only once the model is loaded (the model loads before its server
listens), so that is the health path.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import httpx
import pytest

from switchd.client import ServerEvent
from tests.integration.conftest import ServerFactory
from tests.integration.server import read_events
from tests.integration.test_proxy import CHAT, SSE, answer_of, chat, model_status, wait_for_status
from tests.processes import wait_gone

pytestmark = pytest.mark.skipif(
    find_spec("llama_cpp") is None or find_spec("gguf") is None,
    reason=f"llama-cpp-python or gguf is not installed for {sys.executable} "
    "(the test extra installs them: pip install -e '.[test]')",
)

CARD_GB = 95.59  # the simulated card of tests/integration/server.py
SIZE_GB = 60.0  # two such models never fit together on it
SEED = 7  # llama.cpp's sampling seed: the same request, the same answer
LETTERS = set("abcdefghijklmnopqrstuvwxyz ")  # all the tiny model can say


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny models with different weights, written once for the module."""
    from tests.gguf_model import make_tiny_gguf  # noqa: PLC0415  (needs gguf: skipped above)

    folder = tmp_path_factory.mktemp("gguf")
    return {
        name: make_tiny_gguf(folder / f"{name}.gguf", seed) for name, seed in [("a", 1), ("b", 2)]
    }


def test_the_tiny_model_is_written_the_same_in_well_under_a_second(tmp_path: Path) -> None:
    from tests.gguf_model import make_tiny_gguf  # noqa: PLC0415

    started = time.perf_counter()
    first = make_tiny_gguf(tmp_path / "first.gguf", 1).read_bytes()
    took = time.perf_counter() - started
    assert took < 0.5, took
    assert first[:4] == b"GGUF"
    assert make_tiny_gguf(tmp_path / "again.gguf", 1).read_bytes() == first
    assert make_tiny_gguf(tmp_path / "other.gguf", 2).read_bytes() != first


def llama_engine(model: Path, size_gb: float = SIZE_GB) -> dict[str, Any]:
    # One thread: the test machines have two cores, shared with switchd and the test.
    cmd = (
        f"${{PYTHON}} -m llama_cpp.server --model {model} --host 127.0.0.1 --port ${{PORT}} "
        "--n_ctx 8192 --n_threads 1 --n_threads_batch 1"
    )
    return {"cmd": cmd, "size_gb": size_gb, "load_time_seconds": 2, "health_path": "/v1/models"}


def data_payloads(body: str) -> list[str]:
    return [
        line.removeprefix("data:").strip() for line in body.splitlines() if line.startswith("data:")
    ]


def content_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)


async def test_a_request_loads_the_model_and_llama_cpp_answers(
    make_server: ServerFactory, weights: dict[str, Path]
) -> None:
    server = make_server({"tiny-a": llama_engine(weights["a"])})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        assert (await model_status(http, "tiny-a"))["status"] == "exited"
        response = await http.post(CHAT, json=chat("tiny-a", max_tokens=8, seed=SEED))
        text = answer_of(response)
        body = response.json()
        assert body["object"] == "chat.completion"
        assert body["model"] == "tiny-a"
        assert body["id"].startswith("chatcmpl-")
        assert body["choices"][0]["finish_reason"] == "length"  # the model never says "end"
        assert body["usage"]["completion_tokens"] == 8
        assert len(text) >= 8  # a letter, a space or a word a token
        assert set(text) <= LETTERS
        status = await model_status(http, "tiny-a")
        assert status["status"] == "running"
        assert status["engine"]["pid"] > 0
        # A real model: the same seeded request, the same answer; another seed, another.
        again = await http.post(CHAT, json=chat("tiny-a", max_tokens=8, seed=SEED))
        assert answer_of(again) == text
        other = await http.post(CHAT, json=chat("tiny-a", max_tokens=8, seed=SEED + 1))
        assert answer_of(other) != text


async def test_a_streamed_answer_is_llama_cpp_chunks_ending_with_done(
    make_server: ServerFactory, weights: dict[str, Path]
) -> None:
    server = make_server({"tiny-a": llama_engine(weights["a"])})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        whole = answer_of(await http.post(CHAT, json=chat("tiny-a", max_tokens=6, seed=SEED)))
        body = chat("tiny-a", max_tokens=6, seed=SEED, stream=True)
        async with http.stream("POST", CHAT, json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            raw = (await response.aread()).decode()
    payloads = data_payloads(raw)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    # llama.cpp's shape: the role first, one chunk per token, then the finish reason.
    assert len(chunks) == 8
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert all(chunk["model"] == "tiny-a" for chunk in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 7 + ["length"]
    assert content_of(chunks) == whole  # the same seed streamed: the same text


def stages(events: list[ServerEvent]) -> list[str]:
    return [event.name for event in events if event.name not in ("log", "model_state", "queued")]


async def test_a_switch_unloads_one_real_engine_for_the_other(
    make_server: ServerFactory, weights: dict[str, Path]
) -> None:
    models = {"tiny-a": llama_engine(weights["a"]), "tiny-b": llama_engine(weights["b"])}
    server = make_server(models)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        first = answer_of(await http.post(CHAT, json=chat("tiny-a", max_tokens=8, seed=SEED)))
        pid_a = (await model_status(http, "tiny-a"))["engine"]["pid"]
        params = {"target_model": "tiny-b"}
        async with http.stream("POST", "/v1/models/switch", params=params, headers=SSE) as switch:
            assert switch.status_code == 200
            events = [event for _, event in await read_events(switch, within=30)]
        names = stages(events)
        assert names[-1] == "result", names
        for before, after in [("unload", "unloaded"), ("unloaded", "start"), ("start", "ready")]:
            assert names.index(before) < names.index(after), names
        check = next(e for e in events if e.name == "memory_check")
        assert check.data["to_unload"] == ["tiny-a"]
        unloaded = next(e for e in events if e.name == "unloaded")
        assert (unloaded.data["victim"], unloaded.data["freed_gb"]) == ("tiny-a", SIZE_GB)
        assert unloaded.data["verified"] is True
        assert events[-1].data["unloaded_models"] == ["tiny-a"]
        assert await wait_gone(pid_a, 5)
        assert (await model_status(http, "tiny-a"))["status"] == "exited"
        second = answer_of(await http.post(CHAT, json=chat("tiny-b", max_tokens=8, seed=SEED)))
        assert set(second) <= LETTERS
        assert second != first  # other weights: another answer to the same seeded request
        status = (await http.get("/v1/models/status")).json()
        assert status["gpu"]["devices"][0]["models"] == {"tiny-b": SIZE_GB}


async def test_killing_the_engine_mid_answer_cuts_it_short_and_the_next_request_reloads(
    make_server: ServerFactory, weights: dict[str, Path]
) -> None:
    server = make_server({"tiny-a": llama_engine(weights["a"])}, load_failure_cooldown_seconds=0.5)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        # At ~1,000 tokens a second, 4,000 tokens take seconds: time to kill it mid-answer.
        body = chat("tiny-a", max_tokens=4000, seed=SEED, stream=True)
        payloads: list[str] = []
        killed: int | None = None
        async with asyncio.timeout(20), http.stream("POST", CHAT, json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payloads.append(line.removeprefix("data:").strip())
                if len(payloads) == 20:
                    killed = (await model_status(http, "tiny-a"))["engine"]["pid"]
                    os.kill(killed, signal.SIGKILL)
        assert killed is not None
        # Whole chunks, then one OpenAI-shaped error instead of the rest: no [DONE].
        assert "[DONE]" not in payloads
        *tokens, last = [json.loads(payload) for payload in payloads]
        assert last == {
            "error": {
                "message": "tiny-a stopped in the middle of this answer; it is incomplete",
                "type": "server_error",
                "code": "engine_died",
            }
        }
        assert 20 <= len(tokens) < 4000
        assert all(t["choices"][0]["finish_reason"] is None for t in tokens)
        failed = await wait_for_status(http, "tiny-a", "status", "failed", within=5)
        assert failed["last_exit"]["reason"] == "killed by SIGKILL"
        await asyncio.sleep(0.6)  # past the load-failure cooldown
        response = await http.post(CHAT, json=chat("tiny-a", max_tokens=8, seed=SEED))
        assert set(answer_of(response)) <= LETTERS
        status = await model_status(http, "tiny-a")
        assert status["status"] == "running"
        assert status["engine"]["pid"] != killed


async def test_a_stop_frees_the_simulated_memory_and_verifies_it(
    make_server: ServerFactory, weights: dict[str, Path]
) -> None:
    server = make_server({"tiny-a": llama_engine(weights["a"], size_gb=24.0)})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        answer_of(await http.post(CHAT, json=chat("tiny-a", max_tokens=2, seed=SEED)))
        pid = (await model_status(http, "tiny-a"))["engine"]["pid"]
        params = {"model": "tiny-a"}
        async with http.stream("POST", "/v1/models/unload", params=params, headers=SSE) as stop:
            assert stop.status_code == 200
            events = [event for _, event in await read_events(stop, within=30)]
        assert events[-1].name == "result", stages(events)
        unloaded = next(e for e in events if e.name == "unloaded")
        assert (unloaded.data["victim"], unloaded.data["freed_gb"]) == ("tiny-a", 24.0)
        assert unloaded.data["verified"] is True
        assert await wait_gone(pid, 5)
        status = (await http.get("/v1/models/status")).json()
        assert status["models"]["tiny-a"]["status"] == "exited"
        assert status["gpu"]["devices"][0]["used_gb"] == 0.0
        assert status["gpu"]["devices"][0]["available_gb"] == CARD_GB
