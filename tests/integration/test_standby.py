"""Standby tiers end to end: a real switchd, real demo engines speaking vLLM's sleep API,
and the simulated card, which really gives a sleeping engine's memory back (keeping
its 1.5 GB residue) and takes it back on wake."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
from typing import Any

import httpx

from switchd.client import SseParser
from tests.integration.conftest import ServerFactory
from tests.integration.server import Server, engine_cmd, read_events

RESIDUE_GB = 1.5  # the simulated card's truth for a sleeping engine (its default)
FAST = ("--enable-sleep-mode", "--sleep-seconds", "0.05", "--wake-seconds", "0.05")


def sleeper(size_gb: float, *extra: str, **settings: Any) -> dict[str, Any]:
    """A demo engine with vLLM's sleep API, loading in 0.5 s."""
    return {
        "cmd": engine_cmd(0.5, *FAST, "--reload-seconds", "0.1", *extra),
        "size_gb": size_gb,
        "load_time_seconds": 3,
        "standby": ["sleep1", "sleep2"],
        **settings,
    }


async def switch(http: httpx.AsyncClient, model: str) -> list[Any]:
    params = {"target_model": model, "stream": "true"}
    async with http.stream("POST", "/v1/models/switch", params=params) as response:
        assert response.status_code == 200
        return [event for _, event in await read_events(response)]


def stages(events: list[Any]) -> list[str]:
    return [e.name for e in events if e.name not in ("log", "loading")]


def one(events: list[Any], name: str) -> Any:
    found = [e for e in events if e.name == name]
    assert len(found) == 1, [e.name for e in events]
    return found[0]


async def chat(http: httpx.AsyncClient, model: str, text: str = "hi") -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return await http.post("/v1/chat/completions", json=body)


def learned(server: Server) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((server.state_dir / "learned.json").read_text())
    return data


async def test_a_switch_sleeps_the_victim_and_the_way_back_wakes_it(
    make_server: ServerFactory,
) -> None:
    server = make_server({"big": sleeper(80), "small": sleeper(24)}, standby_host_ram_gb=200)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        await switch(http, "big")
        away = await switch(http, "small")
        assert stages(away) == [
            "memory_check",
            "sleep",
            "slept",
            "freed",
            "start",
            "ready",
            "result",
        ]
        check = one(away, "memory_check")
        assert (check.data["to_unload"], check.data["to_sleep"]) == (["big"], ["big"])
        # Before any wake was measured: a tenth of the learned load, at most.
        assert re.search(
            r": sleeping big \(level 1\): wakes in ~0\.\d+ s instead of a 0\.\d+ s load$",
            check.data["message"],
        ), check.data["message"]
        slept = one(away, "slept")
        assert (slept.data["victim"], slept.data["tier"]) == ("big", "sleep1")
        assert (slept.data["freed_gb"], slept.data["residue_gb"]) == (80 - RESIDUE_GB, RESIDUE_GB)
        assert slept.data["verified"] is True
        result = one(away, "result").data
        assert (result["slept_models"], result["unloaded_models"]) == (["big"], [])
        status = (await http.get("/v1/models/status")).json()
        big = status["models"]["big"]
        assert big["status"] == "sleeping"
        assert big["gpu_memory_used_gb"] == RESIDUE_GB
        assert {k: big["sleep"][k] for k in ("tier", "level", "residue_gb", "host_ram_gb")} == {
            "tier": "sleep1",
            "level": "level 1",
            "residue_gb": RESIDUE_GB,
            "host_ram_gb": 80.0,  # no weights_gb: charged at its whole footprint
        }
        assert status["gpu"]["devices"][0]["models"] == {"big": RESIDUE_GB, "small": 24.0}
        assert status["gpu"]["used_gb"] == 24 + RESIDUE_GB

        # Back: small sleeps, big is woken (same engine, no start).
        pid = big["engine"]["pid"]
        back = await switch(http, "big")
        assert stages(back) == [
            "memory_check",
            "sleep",
            "slept",
            "freed",
            "wake",
            "woken",
            "ready",
            "result",
        ]
        wake = one(back, "wake").data
        assert wake["tier"] == "sleep1"
        assert wake["estimated_wake_seconds"] < wake["estimated_load_time_seconds"]
        woken = one(back, "woken").data
        assert woken["taken_gb"] == 80 - RESIDUE_GB
        assert woken["wake_seconds"] < 0.5  # a wake, not the engine's 0.5 s load
        assert one(back, "result").data["woken"] is True
        status = (await http.get("/v1/models/status")).json()
        assert status["models"]["big"]["status"] == "running"
        assert status["models"]["big"]["engine"]["pid"] == pid
        assert status["models"]["big"]["gpu_memory_used_gb"] == 80.0
        answer = await chat(http, "big", "still me?")
        assert answer.status_code == 200
        assert answer.json()["choices"][0]["message"]["content"] == (
            "Hello from big. You said: still me?"
        )
    figures = learned(server)
    assert figures["big"]["residue_samples"] == [RESIDUE_GB]
    assert set(figures["big"]["wake_seconds"]) == {"sleep1"}
    assert figures["small"]["residue_samples"] == [RESIDUE_GB]


async def test_a_level_2_wake_reloads_the_weights_before_answering(
    make_server: ServerFactory,
) -> None:
    models = {"big": sleeper(80, standby=["sleep2"]), "small": sleeper(24, standby=["sleep2"])}
    server = make_server(models)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        await switch(http, "big")
        await switch(http, "small")
        back = await switch(http, "big")
        assert one(back, "wake").data["tier"] == "sleep2"
        # The demo engine answers 500 weights_not_loaded until reload_weights ran: the
        # wake check would have failed and fallen back to a cold start.
        assert "start" not in stages(back)
        answer = await chat(http, "big")
        assert answer.status_code == 200
    assert server.process is not None
    assert server.process.poll() is None


async def test_the_host_ram_budget_refuses_a_third_level_1_sleep(
    make_server: ServerFactory,
) -> None:
    # Five 40 GB models, two fit at once; level 1 holds 20 GB of weights in host RAM
    # and the budget takes two of them.
    models = {name: sleeper(40, weights_gb=20) for name in ("m1", "m2", "m3", "m4", "m5")}
    server = make_server(models, standby_host_ram_gb=45)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        await switch(http, "m1")
        await switch(http, "m2")
        third = await switch(http, "m3")
        assert one(third, "sleep").data["victim"] == "m1"
        assert one(third, "sleep").data["tier"] == "sleep1"
        fourth = await switch(http, "m4")
        assert (one(fourth, "sleep").data["victim"], one(fourth, "sleep").data["tier"]) == (
            "m2",
            "sleep1",
        )
        # m1 wakes and takes its 20 GB back from host RAM: that is not m3's to lose,
        # so m3 sleeps at level 1 too (the budget then holds m2's and m3's 40 of 45).
        fifth = await switch(http, "m1")
        assert (one(fifth, "sleep").data["victim"], one(fifth, "sleep").data["tier"]) == (
            "m3",
            "sleep1",
        )
        # m5 is cold: the next victim cannot have level 1, 5 GB of the budget is left.
        sixth = await switch(http, "m5")
        sleep = one(sixth, "sleep").data
        assert (sleep["victim"], sleep["tier"]) == ("m1", "sleep2")
        assert re.fullmatch(
            r"sleeping m1 \(level 2\): wakes in ~[\d.]+ s instead of a [\d.]+ s load; "
            r"level 1 would need 20\.00 GB of host RAM, over budget",
            sleep["reason"],
        ), sleep["reason"]
        status = (await http.get("/v1/models/status")).json()["models"]
    assert {
        name: (m["status"], (m.get("sleep") or {}).get("tier")) for name, m in status.items()
    } == {
        "m1": ("sleeping", "sleep2"),
        "m2": ("sleeping", "sleep1"),
        "m3": ("sleeping", "sleep1"),
        "m4": ("running", None),
        "m5": ("running", None),
    }
    assert status["m2"]["sleep"]["host_ram_gb"] == 20.0
    assert status["m3"]["sleep"]["host_ram_gb"] == 20.0
    assert status["m1"]["sleep"]["host_ram_gb"] == 0.0


async def test_a_failed_sleep_falls_back_to_a_stop(make_server: ServerFactory) -> None:
    models = {"big": sleeper(80, "--fail-sleep"), "small": sleeper(24)}
    server = make_server(models, standby_host_ram_gb=200)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        await switch(http, "big")
        away = await switch(http, "small")
        assert stages(away) == [
            "memory_check",
            "sleep",
            "unload",
            "unloaded",
            "freed",
            "start",
            "ready",
            "result",
        ]
        unload = one(away, "unload").data
        assert unload["message"].startswith(
            "Unloading big: its sleep failed (POST /sleep answered 500"
        )
        assert one(away, "unloaded").data["freed_gb"] == 80.0
        assert one(away, "result").data["unloaded_models"] == ["big"]
        status = (await http.get("/v1/models/status")).json()
    assert status["models"]["big"]["status"] == "exited"
    assert status["gpu"]["used_gb"] == 24.0


async def test_an_engine_dead_after_a_sleep_that_answered_200_is_stopped_instead(
    make_server: ServerFactory,
) -> None:
    """vLLM #45520: the sleep answered 200, its health path no longer does."""
    models = {"big": sleeper(80, "--crash-in-sleep"), "small": sleeper(24)}
    server = make_server(models, standby_host_ram_gb=200)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        await switch(http, "big")
        away = await switch(http, "small")
        assert stages(away) == [
            "memory_check",
            "sleep",
            "unload",
            "unloaded",
            "freed",
            "start",
            "ready",
            "result",
        ]
        assert one(away, "unload").data["message"] == (
            "Unloading big: it stopped answering /health after its sleep"
        )
        result = one(away, "result").data
        assert (result["unloaded_models"], result["slept_models"]) == (["big"], [])
        status = (await http.get("/v1/models/status")).json()
    assert status["models"]["big"]["status"] == "exited"
    assert status["gpu"]["used_gb"] == 24.0
    assert learned(server)["big"]["residue_samples"] == []  # nothing slept to be measured


async def test_a_failed_wake_falls_back_to_a_cold_start(make_server: ServerFactory) -> None:
    models = {"big": sleeper(80, "--fail-wake"), "small": sleeper(24)}
    server = make_server(models, standby_host_ram_gb=200)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        await switch(http, "big")
        await switch(http, "small")
        back = await switch(http, "big")
        assert stages(back) == [
            "memory_check",
            "sleep",
            "slept",
            "freed",
            "wake",
            "unload",
            "unloaded",
            "start",
            "ready",
            "result",
        ]
        assert "waking it failed (POST /wake_up answered 500" in one(back, "unload").data["message"]
        assert one(back, "result").data["woken"] is False
        assert (await chat(http, "big")).status_code == 200
        status = (await http.get("/v1/models/status")).json()
    assert status["models"]["big"]["status"] == "running"
    assert status["gpu"]["used_gb"] == 80 + RESIDUE_GB  # big awake, small asleep


async def test_a_sleeping_engine_killed_from_outside_is_seen_and_starts_cold(
    make_server: ServerFactory,
) -> None:
    server = make_server({"big": sleeper(80), "small": sleeper(24)}, standby_host_ram_gb=200)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        await switch(http, "big")
        await switch(http, "small")
        status = (await http.get("/v1/models/status")).json()
        os.kill(status["models"]["big"]["engine"]["pid"], signal.SIGKILL)
        for _ in range(100):
            big = (await http.get("/v1/models/status")).json()["models"]["big"]
            if big["status"] != "sleeping":
                break
            await asyncio.sleep(0.05)
        assert big["status"] == "failed"
        assert "outside switchd while asleep" in big["error"]
        assert "sleep" not in big
        await asyncio.sleep(0.5)  # the simulated card's release delay
        gpu = (await http.get("/v1/models/status")).json()["gpu"]
        assert gpu["devices"][0]["models"] == {"small": 24.0}
        assert gpu["used_gb"] == 24.0
        back = await switch(http, "big")
        assert "wake" not in stages(back)
        assert "start" in stages(back)
        assert (await chat(http, "big")).status_code == 200


async def test_clients_alternating_between_two_models_are_served_by_wakes(
    make_server: ServerFactory,
) -> None:
    """Six clients at once for 5 s, three per model, on models that do not fit together:
    everyone is answered, and after the first two cold starts every switch is a
    sleep and a wake of the same two engines."""
    server = make_server(
        {"big": sleeper(80), "small": sleeper(24)},
        standby_host_ram_gb=200,
        min_residency_seconds=0.2,
        max_hold_seconds=1,
    )
    answers: list[tuple[str, int, str]] = []
    watched: list[str] = []

    async def user(http: httpx.AsyncClient, model: str, index: int) -> None:
        end = asyncio.get_running_loop().time() + 5
        for turn in itertools.count():
            if asyncio.get_running_loop().time() > end:
                return
            response = await chat(http, model, f"user {index} turn {turn}")
            content = (
                response.json()["choices"][0]["message"]["content"] if response.is_success else ""
            )
            answers.append((model, response.status_code, content))

    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        events = asyncio.create_task(watch(http, watched))
        await asyncio.gather(*(user(http, m, i) for i, m in enumerate(["big", "small"] * 3)))
        await asyncio.sleep(0.2)
        events.cancel()
        await asyncio.gather(events, return_exceptions=True)
    assert [(m, code) for m, code, _ in answers if code != 200] == []
    assert len(answers) >= 12
    assert all(content.startswith(f"Hello from {m}.") for m, _, content in answers)
    assert watched.count("start") == 2, watched  # one cold start per model, then wakes
    assert watched.count("wake") >= 2, watched
    assert watched.count("wake") == watched.count("woken")
    assert watched.count("unload") == 0, watched  # nobody was stopped


async def watch(http: httpx.AsyncClient, into: list[str]) -> None:
    """The name of every job stage on /v1/events, into `into`."""
    parser = SseParser()
    async with http.stream("GET", "/v1/events") as response:
        async for line in response.aiter_lines():
            event = parser.feed(line)
            if event is not None and event.name not in ("log", "snapshot", "model_state"):
                into.append(event.name)


async def test_a_sleeper_killed_during_anothers_load_teaches_nothing_false(
    make_server: ServerFactory,
) -> None:
    """Three clients wait for `small` while `big` is put to sleep; `big` is killed while
    `small` loads. Every client is answered, `big` is seen failed, and `small`'s
    footprint is not learned from a window in which another engine's memory moved."""
    slow = sleeper(24, "--load-seconds", "1.5")
    server = make_server(
        {"big": sleeper(80), "small": slow}, standby_host_ram_gb=200, min_residency_seconds=0.2
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        await switch(http, "big")
        pid = (await http.get("/v1/models/status")).json()["models"]["big"]["engine"]["pid"]
        clients = [asyncio.create_task(chat(http, "small", f"c{i}")) for i in range(3)]
        for _ in range(200):
            models = (await http.get("/v1/models/status")).json()["models"]
            if models["small"]["status"] == "loading":
                break
            await asyncio.sleep(0.02)
        assert (models["big"]["status"], models["small"]["status"]) == ("sleeping", "loading")
        os.kill(pid, signal.SIGKILL)
        answers = await asyncio.gather(*clients)
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert [a.json()["choices"][0]["message"]["content"] for a in answers] == [
            ANSWER_SMALL.format(said=f"c{i}") for i in range(3)
        ]
        status = (await http.get("/v1/models/status")).json()["models"]
        assert status["big"]["status"] == "failed"
        assert "outside switchd while asleep" in status["big"]["error"]
        assert status["small"]["gpu_memory_used_gb"] is None  # not attributable
    assert learned(server)["small"]["samples"] == []


ANSWER_SMALL = "Hello from small. You said: {said}"


async def test_a_json_switch_to_a_sleeping_model_answers_that_it_wakes(
    make_server: ServerFactory,
) -> None:
    # Its wake takes 1 s: the answer, sent once the wake begins, comes before it ends.
    models = {"big": sleeper(80, "--wake-seconds", "1"), "small": sleeper(24)}
    server = make_server(models, standby_host_ram_gb=200)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        await switch(http, "big")
        await switch(http, "small")
        answer = await http.post("/v1/models/switch", params={"target_model": "big"})
        assert answer.status_code == 200
        body = answer.json()
        assert body["woken"] is True
        assert body["start_result"] == {"message": "Model 'big' is waking up", "status": "starting"}
        done = await http.get(f"/v1/switches/{body['job']}/events")
        events = [event for _, event in await read_events(done)]
        assert "start" not in stages(events)
        assert one(events, "result").data["woken"] is True
