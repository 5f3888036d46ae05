"""Chaos with sleep tiers: chat clients and operators switching between models at
random, at once, on real demo engines with vLLM's sleep API, memory that comes back
slowly, and an engine killed now and then. Bounded: about 20 s of traffic.

Asserted: no answer is a 409 or a 500 (every model fits the card alone), and status
never shows more on the device than it holds.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from tests.integration.conftest import ServerFactory
from tests.integration.test_proxy import CHAT, chat
from tests.integration.test_standby import sleeper

SECONDS = 20.0
SIZES = {"a": 60.0, "b": 50.0, "c": 40.0, "d": 24.0}


@dataclass
class Findings:
    codes: Counter[int] = field(default_factory=Counter)
    refused: list[str] = field(default_factory=list)
    over: list[str] = field(default_factory=list)
    statuses: int = 0
    kills: int = 0


def note(found: Findings, what: str, response: httpx.Response) -> None:
    found.codes[response.status_code] += 1
    if response.status_code in (409, 500):
        found.refused.append(f"{what}: {response.status_code} {response.text[:300]}")


async def chatter(http: httpx.AsyncClient, rng: random.Random, found: Findings) -> None:
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        model = rng.choice(list(SIZES))
        note(found, f"chat {model}", await http.post(CHAT, json=chat(model, max_tokens=2)))


async def operator(http: httpx.AsyncClient, rng: random.Random, found: Findings) -> None:
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        model = rng.choice(list(SIZES))
        response = await http.post("/v1/models/switch", params={"target_model": model})
        note(found, f"switch {model}", response)
        await asyncio.sleep(rng.uniform(0.05, 0.5))


async def watcher(http: httpx.AsyncClient, found: Findings) -> None:
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        status = (await http.get("/v1/models/status")).json()
        found.statuses += 1
        for device in status["gpu"]["devices"]:
            shown = round(sum(device["models"].values()), 2)
            if shown > device["total_gb"] + 0.01:
                found.over.append(f"GPU {device['index']}: {device['models']} > total")
        await asyncio.sleep(0.05)


async def killer(http: httpx.AsyncClient, rng: random.Random, found: Findings) -> None:
    deadline = time.monotonic() + SECONDS - 4
    while time.monotonic() < deadline:
        await asyncio.sleep(rng.uniform(3.0, 5.0))
        models = (await http.get("/v1/models/status")).json()["models"]
        running = [m for m in models.values() if m["status"] == "running" and m.get("engine")]
        if running:
            try:
                os.kill(rng.choice(running)["engine"]["pid"], signal.SIGKILL)
                found.kills += 1
            except ProcessLookupError:
                pass


async def test_no_409_or_500_and_status_within_the_card(make_server: ServerFactory) -> None:
    server = make_server(
        {name: sleeper(size) for name, size in SIZES.items()},
        simulated_gpu={"total_gb": 95.59, "release_delay_seconds": 0.8},
        memory_release_timeout_seconds=5,
        standby_host_ram_gb=80,
        min_residency_seconds=0.5,
        max_hold_seconds=2,
    )
    rng = random.Random(20)
    found = Findings()
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        await asyncio.gather(
            *(chatter(http, random.Random(rng.random()), found) for _ in range(4)),
            *(operator(http, random.Random(rng.random()), found) for _ in range(3)),
            watcher(http, found),
            killer(http, random.Random(rng.random()), found),
        )
    assert found.refused == []
    assert found.over == []
    assert found.statuses > 50
    assert found.codes[200] > 20, found.codes
    assert "Traceback" not in server.log()
