"""Several GPUs are not one big one: placement, per-device planning and release, on a
real switchd with a simulated 2- and 4-device card and real engine processes."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.integration.conftest import ServerFactory
from tests.integration.server import read_events

CARD_GB = 47.79  # each of two 48 GB cards


def placed_engine(size_gb: float, **extra: Any) -> dict[str, Any]:
    """The demo engine, saying first which devices it was given (CUDA_VISIBLE_DEVICES)."""
    cmd = [
        "sh",
        "-c",
        'echo "placed on ${GPUS} cuda=$CUDA_VISIBLE_DEVICES"; exec "$0" -m switchd.demo.engine '
        '--port "$1" --model "$2" --load-seconds 0.3',
        "${PYTHON}",
        "${PORT}",
        "${MODEL}",
    ]
    return {"cmd": cmd, "size_gb": size_gb, **extra}


async def switch(http: httpx.AsyncClient, model: str) -> list[Any]:
    params = {"target_model": model, "stream": "true"}
    async with http.stream("POST", "/v1/models/switch", params=params) as response:
        assert response.status_code == 200
        return [event for _, event in await read_events(response)]


def placed(events: list[Any]) -> str:
    lines = [e.data["line"] for e in events if e.name == "log" and "placed on" in e.data["line"]]
    assert len(lines) == 1, lines
    line: str = lines[0]
    return line


async def test_a_counted_model_is_placed_where_it_fits_and_the_engine_is_told(
    make_server: ServerFactory,
) -> None:
    models = {name: placed_engine(40, gpu_count=1) for name in ("a", "b", "c")}
    server = make_server(models, simulated_gpu={"total_gb": CARD_GB, "devices": 2})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        first = await switch(http, "a")
        assert placed(first) == "placed on 0 cuda=0"
        second = await switch(http, "b")
        check = next(e for e in second if e.name == "memory_check")
        assert (check.data["devices"], check.data["to_unload"]) == ([1], [])
        assert placed(second) == "placed on 1 cuda=1"
        # Each card holds one 40 GB model: the third must unload one, on one card only.
        third = await switch(http, "c")
        check = next(e for e in third if e.name == "memory_check")
        assert (check.data["devices"], check.data["to_unload"]) == ([0], ["a"])
        unloaded = next(e for e in third if e.name == "unloaded")
        assert (unloaded.data["victim"], unloaded.data["freed_gb"]) == ("a", 40.0)
        assert unloaded.data["verified"] is True
        assert placed(third) == "placed on 0 cuda=0"
        status = (await http.get("/v1/models/status")).json()
    devices = status["gpu"]["devices"]
    assert [d["models"] for d in devices] == [{"c": 40.0}, {"b": 40.0}]
    assert [d["used_gb"] for d in devices] == [40.0, 40.0]
    assert status["models"]["b"]["devices"] == [1]
    assert status["models"]["a"]["devices"] is None


async def test_free_memory_spread_over_two_cards_is_not_one_place(
    make_server: ServerFactory,
) -> None:
    models = {
        "left": placed_engine(18, gpus=[0], pinned=True),
        "right": placed_engine(18, gpus=[1], pinned=True),
        "big": placed_engine(40, gpu_count=1),  # 29.79 GB free on each card: nowhere
    }
    server = make_server(models, simulated_gpu={"total_gb": CARD_GB, "devices": 2})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        await switch(http, "left")
        await switch(http, "right")
        refused = await http.post("/v1/models/switch", params={"target_model": "big"})
        status = (await http.get("/v1/models/status")).json()
    assert refused.status_code == 409
    body = refused.json()
    assert body["error"] == "insufficient_memory"
    assert body["device"] == 0
    assert "GPU 0 would have only 29.79 GB of the 40.00 GB it needs there" in body["message"]
    assert status["models"]["left"]["status"] == "running"
    assert status["models"]["right"]["status"] == "running"


async def test_four_cards_fixed_and_counted_models_share_them(make_server: ServerFactory) -> None:
    models = {
        "pair": placed_engine(60, gpus=[2, 3]),  # 30 GB on each of 2 and 3
        "two": placed_engine(60, gpu_count=2),  # any two: 0 and 1 are free
        "every": placed_engine(40),  # no `gpus`: spans all four, 10 GB each
    }
    server = make_server(models, simulated_gpu={"total_gb": CARD_GB, "devices": 4})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        assert placed(await switch(http, "pair")) == "placed on 2,3 cuda=2,3"
        assert placed(await switch(http, "two")) == "placed on 0,1 cuda=0,1"
        # 10 GB on each card fits beside both (30 + 10 <= 47.79): nothing unloaded.
        spanning = await switch(http, "every")
        check = next(e for e in spanning if e.name == "memory_check")
        assert (check.data["devices"], check.data["to_unload"]) == ([0, 1, 2, 3], [])
        status = (await http.get("/v1/models/status")).json()
    assert [d["models"] for d in status["gpu"]["devices"]] == [
        {"two": 30.0, "every": 10.0},
        {"two": 30.0, "every": 10.0},
        {"pair": 30.0, "every": 10.0},
        {"pair": 30.0, "every": 10.0},
    ]


async def test_users_wanting_three_models_on_two_cards_are_all_served(
    make_server: ServerFactory,
) -> None:
    """Six users at once want three 40 GB models that fit one per 47.79 GB card: every
    request is answered, and no card is ever said to hold more than it has."""
    models = {name: placed_engine(40, gpu_count=1) for name in ("a", "b", "c")}
    server = make_server(
        models,
        simulated_gpu={"total_gb": CARD_GB, "devices": 2},
        min_residency_seconds=0.5,
        max_hold_seconds=1.5,
    )
    statuses: list[int] = []
    over: list[dict[str, float]] = []

    async def user(http: httpx.AsyncClient, model: str, until: float) -> None:
        while asyncio.get_running_loop().time() < until:
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            response = await http.post("/v1/chat/completions", json=body)
            statuses.append(response.status_code)
            if response.status_code == 200:
                assert response.json()["model"] == model

    async def watch(http: httpx.AsyncClient) -> None:
        while True:
            devices = (await http.get("/v1/models/status")).json()["gpu"]["devices"]
            for device in devices:
                if sum(device["models"].values()) > device["total_gb"]:
                    over.append(device["models"])
            await asyncio.sleep(0.05)

    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        watcher = asyncio.create_task(watch(http))
        until = asyncio.get_running_loop().time() + 10
        await asyncio.gather(*(user(http, model, until) for model in "abcabc"))
        assert not watcher.done(), watcher
        watcher.cancel()
    assert statuses
    assert set(statuses) == {200}
    assert over == []
