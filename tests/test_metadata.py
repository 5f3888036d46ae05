"""How models are described to clients: llama.cpp's status values for switchd's states,
metadata from the config or the engine (config first), and the llama.cpp SSE events."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from switchd import wire
from switchd.catalog import ModelRecord
from switchd.config import Capability, ModelSpec
from switchd.events import Event
from switchd.llamacpp_api import translate
from switchd.metadata import describe, engine_context_length, llama_status, requested_value
from switchd.states import ModelState
from switchd.stats import Learned


@pytest.mark.parametrize(
    ("model", "status"),
    [
        ({"status": "running"}, {"value": "loaded", "state": "running"}),
        ({"status": "loading"}, {"value": "loading", "state": "loading"}),
        ({"status": "sleeping"}, {"value": "sleeping", "state": "sleeping"}),
        ({"status": "stopping"}, {"value": "unloaded", "state": "stopping"}),
        ({"status": "exited"}, {"value": "unloaded", "state": "exited"}),
        (
            {"status": "exited", "last_exit": {"exit_code": 137}},
            {"value": "unloaded", "state": "exited", "failed": True, "exit_code": 137},
        ),
        (
            {"status": "failed", "error": "no health", "last_exit": None},
            {
                "value": "unloaded",
                "state": "failed",
                "failed": True,
                "exit_code": 1,
                "error": "no health",
            },
        ),
        (
            {"status": "failed", "error": "died", "last_exit": {"exit_code": 3}},
            {
                "value": "unloaded",
                "state": "failed",
                "failed": True,
                "exit_code": 3,
                "error": "died",
            },
        ),
    ],
)
def test_llama_status(model: dict[str, Any], status: dict[str, Any]) -> None:
    assert llama_status(model) == status


def spec(**extra: Any) -> ModelSpec:
    return ModelSpec(name="m", size_gb=10.0, cmd=("x",), **extra)


def test_the_config_wins_over_what_the_engine_said() -> None:
    assert (
        describe(spec(context_length=4096), Learned(context_length=8192))["context_length"] == 4096
    )
    learned = describe(spec(), Learned(context_length=8192))
    assert (learned["context_length"], learned["max_model_len"]) == (8192, 8192)
    assert learned["context_length_source"] == "engine"
    assert describe(spec(), Learned())["context_length"] is None


def test_capabilities_and_modalities() -> None:
    plain = describe(spec(), Learned())
    assert plain["capabilities"] == ["chat", "completion"]
    assert plain["architecture"] == {"input_modalities": ["text"], "output_modalities": ["text"]}
    embedder = describe(spec(capabilities=(Capability.EMBEDDINGS,)), Learned())
    assert embedder["architecture"]["output_modalities"] == ["embedding"]


def engine(routes: dict[str, httpx.Response]) -> httpx.AsyncClient:
    def handle(request: httpx.Request) -> httpx.Response:
        return routes.get(request.url.path, httpx.Response(404))

    return httpx.AsyncClient(transport=httpx.MockTransport(handle))


async def test_vllm_max_model_len_is_read_from_its_models() -> None:
    listed = {"data": [{"id": "m", "max_model_len": 131072}]}
    async with engine({"/v1/models": httpx.Response(200, json=listed)}) as http:
        assert await engine_context_length(http, spec(), "http://e") == 131072


async def test_llama_cpp_n_ctx_is_read_from_its_props() -> None:
    props = {"default_generation_settings": {"n_ctx": 16384}}
    routes = {
        "/v1/models": httpx.Response(200, json={"data": [{"id": "m"}]}),
        "/props": httpx.Response(200, json=props),
    }
    async with engine(routes) as http:
        assert await engine_context_length(http, spec(), "http://e") == 16384


async def test_an_engine_that_says_nothing_teaches_nothing() -> None:
    routes = {"/v1/models": httpx.Response(200, json={"data": [{"max_model_len": True}]})}
    async with engine(routes) as http:
        assert await engine_context_length(http, spec(), "http://e") is None


def state_change(old: str, new: str, **extra: Any) -> Event:
    return Event(7, wire.MODEL_STATE, {"model": "m", "from": old, "to": new, **extra})


def test_state_changes_become_llama_cpp_status_events() -> None:
    records = {"m": ModelRecord(spec())}
    loaded = translate(state_change("loading", "running"), records)
    assert loaded is not None
    assert loaded.sse() == (
        b'data: {"model":"m","event":"model_status","data":{"status":"loaded"}}\n\n'
    )
    # stopping is unloaded already: exited changes nothing a llama.cpp client sees.
    assert translate(state_change("stopping", "exited"), records) is None
    records["m"].state = ModelState.EXITED
    records["m"].last_exit = {"exit_code": 139}
    died = translate(state_change("running", "exited"), records)
    assert died is not None
    assert died.data["data"] == {"status": "unloaded", "exit_code": 139, "failed": True}


def test_load_ticks_become_progress_and_other_stages_nothing() -> None:
    tick = Event(
        8,
        "loading",
        {"model": "m", "elapsed_seconds": 3.0, "estimated_load_time_seconds": 12.0},
    )
    event = translate(tick, {})
    assert event is not None
    assert event.data["data"] == {
        "status": "loading",
        "progress": {"stages": ["text_model"], "current": "text_model", "value": 0.25},
    }
    assert translate(Event(9, "memory_check", {"model": "m"}), {}) is None
    assert translate(Event(10, wire.LOG, {"line": "x", "source": "m"}), {}) is None


def test_a_model_asked_for_reads_loading_before_its_engine_starts() -> None:
    # llama.cpp's router says `loading` from the load request on: so does switchd,
    # while the switch is queued or its first steps run.
    assert requested_value("exited", load_requested=True) == "loading"
    assert requested_value("failed", load_requested=True) == "loading"
    assert requested_value("exited", load_requested=False) == "unloaded"
    assert requested_value("running", load_requested=True) == "loaded"
    status = llama_status({"status": "exited", "load_requested": True})
    assert (status["value"], status["state"]) == ("loading", "exited")
