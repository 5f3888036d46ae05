"""llama.cpp's model-management API on a real switchd, driven by a client written from
llama.cpp's documentation (tests/llamacpp_client.py): status values through a load
and an unload, the /models/sse events, the error codes and the key roles."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.integration.conftest import ServerFactory
from tests.integration.server import engine_cmd
from tests.llamacpp_client import Refused, RouterClient

ADMIN, READER = "admin-key-1", "reader-key-1"


def models() -> dict[str, Any]:
    return {
        # Long enough a load for the progress events that tick each second.
        "small": {
            "cmd": engine_cmd(2.5, "--max-model-len", "8192"),
            "size_gb": 10,
            "load_time_seconds": 3,
            "aliases": ["tiny"],
        },
        "coder": {
            "cmd": engine_cmd(0.3),
            "size_gb": 10,
            "context_length": 32768,
            "capabilities": ["chat", "tools", "vision"],
        },
    }


async def collect(events: AsyncIterator[dict[str, Any]], into: list[dict[str, Any]]) -> None:
    async for event in events:
        into.append(event)


async def wait_for(router: RouterClient, model: str, value: str, within: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while await router.status(model) != value:
        assert asyncio.get_running_loop().time() < deadline, f"{model} never {value}"
        await asyncio.sleep(0.05)


async def test_status_values_events_and_errors_through_a_load_and_an_unload(
    make_server: ServerFactory,
) -> None:
    server = make_server(models())
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        router = RouterClient(http)
        seen: list[dict[str, Any]] = []
        follower = asyncio.create_task(collect(router.events(), seen))
        await asyncio.sleep(0.3)  # the stream is open before the load
        listed = await router.models()
        assert {name: entry["status"]["value"] for name, entry in listed.items()} == {
            "small": "unloaded",
            "coder": "unloaded",
        }
        assert listed["small"]["object"] == "model"
        assert listed["small"]["aliases"] == ["tiny"]

        await router.load("tiny")  # an alias, answered at once
        assert await router.status("small") == "loading"
        with pytest.raises(Refused) as refused:
            await router.load("small")
        assert refused.value.status == 400
        assert refused.value.error["code"] == 400
        assert refused.value.error["message"] == "model is already running"
        await wait_for(router, "small", "loaded")
        with pytest.raises(Refused) as refused:
            await router.load("small")
        assert (refused.value.status, refused.value.error["type"]) == (
            400,
            "invalid_request_error",
        )

        await router.unload("small")
        await wait_for(router, "small", "unloaded")
        with pytest.raises(Refused) as refused:
            await router.unload("small")
        assert refused.value.status == 400
        assert refused.value.error["message"] == "model is not running"

        with pytest.raises(Refused) as refused:
            await router.load("nope")
        assert refused.value.status == 404
        assert refused.value.error == {
            "code": 404,
            "message": "model is not found",
            "type": "not_found_error",
        }
        with pytest.raises(Refused) as refused:
            await router.unload("nope")
        assert refused.value.status == 400
        assert refused.value.error["message"] == "model is not found"

        await asyncio.sleep(0.3)  # the last event reaches the stream
        follower.cancel()
        # The loads and unloads were switchd jobs, caused by the API.
        jobs = (await http.get("/v1/switches")).json()["switches"]
        assert [(job["kind"], job["cause"], job["target"]) for job in jobs] == [
            ("unload", "api", "small"),
            ("switch", "api", "small"),
        ]

    assert all(event["event"] == "model_status" and event["model"] == "small" for event in seen)
    statuses = [event["data"]["status"] for event in seen]
    # loading (with progress while it loads), loaded, then unloaded.
    assert statuses[0] == "loading"
    assert statuses[-2:] == ["loaded", "unloaded"]
    assert set(statuses[:-2]) == {"loading"}
    progress = [event["data"]["progress"] for event in seen if "progress" in event["data"]]
    assert progress, seen
    values = [p["value"] for p in progress]
    assert values == sorted(values)
    assert all(0 < v < 1 for v in values)
    assert all(p["stages"] == ["text_model"] and p["current"] == "text_model" for p in progress)
    assert seen[-1]["data"] == {"status": "unloaded", "exit_code": 0}


async def test_metadata_is_listed_for_unloaded_models_from_config_and_from_the_engine(
    make_server: ServerFactory,
) -> None:
    server = make_server(models())
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        router = RouterClient(http)
        listed = {m["id"]: m for m in (await http.get("/v1/models")).json()["data"]}
        # Set in the config: listed before it ever ran.
        assert listed["coder"]["context_length"] == 32768
        assert listed["coder"]["max_model_len"] == 32768
        assert listed["coder"]["context_length_source"] == "config"
        assert listed["coder"]["capabilities"] == ["chat", "tools", "vision"]
        assert listed["coder"]["architecture"] == {
            "input_modalities": ["text", "image"],
            "output_modalities": ["text"],
        }
        assert listed["small"]["context_length"] is None
        # Learned from the engine once it ran (its /v1/models max_model_len), then kept.
        await router.load("small")
        await wait_for(router, "small", "loaded")
        await router.unload("small")
        await wait_for(router, "small", "unloaded")
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            small = (await http.get("/v1/models/small")).json()
            if small["context_length"] is not None or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        assert small["status"]["value"] == "unloaded"
        assert (small["context_length"], small["context_length_source"]) == (8192, "engine")
    learned = (server.state_dir / "learned.json").read_text()
    assert '"context_length": 8192' in learned


async def test_key_roles_read_lists_and_follows_admin_loads(make_server: ServerFactory) -> None:
    server = make_server(models(), api_keys=[ADMIN], read_keys=[READER])

    def client(key: str | None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=server.url, timeout=30, headers=headers)

    async with client(None) as anonymous, client(READER) as reader, client(ADMIN) as admin:
        with pytest.raises(Refused) as refused:
            await RouterClient(anonymous).models()
        assert refused.value.status == 401
        assert (await RouterClient(reader).models())["coder"]["status"]["value"] == "unloaded"
        async with reader.stream("GET", "/models/sse") as stream:
            assert stream.status_code == 200
        for call in (RouterClient(reader).load, RouterClient(reader).unload):
            with pytest.raises(Refused) as refused:
                await call("coder")
            assert refused.value.status == 403
        await RouterClient(admin).load("coder")
        await wait_for(RouterClient(reader), "coder", "loaded")
        await RouterClient(admin).unload("coder")
        await wait_for(RouterClient(reader), "coder", "unloaded")
