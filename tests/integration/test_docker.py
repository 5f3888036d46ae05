"""A real `switchd serve` with the Docker runtime, engines in real containers.

Skipped, with the reason, when no Docker daemon answers. Two 60 GB models never
fit the simulated 95.59 GB card together. switchd is stopped with SIGTERM at the
end (its containers outlive it by design) and then every container is removed:
`containers` comes before `make_server` in each test's arguments, so it is set
up first and torn down last.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import docker
import httpx

from switchd.client import ServerEvent, SseParser
from tests import docker_engine
from tests.docker_engine import (
    Containers,
    container_model,
    image_model,
    load_lines,
    unique,
)
from tests.integration.conftest import ServerFactory
from tests.integration.server import Server, read_events

docker_client = docker_engine.docker_client
engine_image = docker_engine.engine_image
containers = docker_engine.containers

SSE = {"Accept": "text/event-stream"}
SIZE_GB = 60  # two never fit the 95.59 GB card together
SETTINGS: dict[str, Any] = {
    "runtime": "docker",
    "stop_grace_seconds": 2,
    "health_timeout_seconds": 30,
}


def serve(make_server: ServerFactory, models: dict[str, Any]) -> Server:
    return make_server(models, **SETTINGS)


async def status(http: httpx.AsyncClient) -> dict[str, Any]:
    response = await http.get("/v1/models/status")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def model_status(http: httpx.AsyncClient, model: str) -> dict[str, Any]:
    return dict((await status(http))["models"][model])


async def switch_and_wait(http: httpx.AsyncClient, model: str) -> dict[str, Any]:
    response = await http.post("/v1/models/switch", params={"target_model": model, "wait": "ready"})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def switch_events(http: httpx.AsyncClient, model: str) -> list[ServerEvent]:
    async with http.stream(
        "POST", "/v1/models/switch", params={"target_model": model}, headers=SSE
    ) as response:
        assert response.status_code == 200
        return [event for _, event in await read_events(response, within=30)]


async def wait_for_status(
    http: httpx.AsyncClient, model: str, wanted: str, within: float
) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        found = await model_status(http, model)
        if found["status"] == wanted:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{model} is {found['status']}, not {wanted}, after {within} s")
        await asyncio.sleep(0.05)


async def wait_for_used_gb(http: httpx.AsyncClient, wanted: float, within: float) -> None:
    deadline = time.monotonic() + within
    while (used := (await status(http))["gpu"]["used_gb"]) != wanted:
        if time.monotonic() > deadline:
            raise AssertionError(f"GPU used_gb is {used}, not {wanted}, after {within} s")
        await asyncio.sleep(0.05)


class EventFeed:
    """/v1/events, read in the background from its snapshot on."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.events: list[ServerEvent] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async with self.http.stream("GET", "/v1/events") as response:
            parser = SseParser()
            async for line in response.aiter_lines():
                event = parser.feed(line)
                if event is not None:
                    self.events.append(event)

    async def wait_for(self, name: str, within: float, **fields: Any) -> ServerEvent:
        deadline = time.monotonic() + within
        while True:
            for event in self.events:
                if event.name == name and all(event.data.get(k) == v for k, v in fields.items()):
                    return event
            if self.task.done() or time.monotonic() > deadline:
                raise AssertionError(f"no {name} event with {fields} within {within} s")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@contextlib.asynccontextmanager
async def event_feed(http: httpx.AsyncClient) -> AsyncIterator[EventFeed]:
    feed = EventFeed(http)
    try:
        await feed.wait_for("snapshot", within=5)
        yield feed
    finally:
        await feed.close()


def kill_switchd(server: Server) -> None:
    """kill -9: no shutdown at all, as in a crash."""
    assert server.process is not None
    server.process.kill()
    server.process.wait(10)


def docker_state(containers: Containers, name: str) -> dict[str, Any]:
    state: dict[str, Any] = containers.inspect(name)["State"]
    return state


def serve_two(
    make_server: ServerFactory,
    engine_image: str,
    a: str,
    b: str,
    load_b: float = 0.5,
) -> Server:
    """switchd with two image models that do not fit on the card together."""
    models = {
        a: image_model(engine_image, a, size_gb=SIZE_GB),
        b: image_model(engine_image, b, size_gb=SIZE_GB, load_seconds=load_b),
    }
    return serve(make_server, models)


# ---- switching -------------------------------------------------------------------


async def test_switching_between_two_engine_containers(
    containers: Containers, make_server: ServerFactory, engine_image: str
) -> None:
    a, b = containers.model("a"), containers.model("b")
    server = serve_two(make_server, engine_image, a, b, load_b=1.0)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        await switch_and_wait(http, a)
        assert docker_state(containers, f"switchd-{a}")["Running"] is True

        events = await switch_events(http, b)

        names = [e.name for e in events]
        assert names[-1] == "result", events[-1]
        assert events[-1].data["unloaded_models"] == [a]
        unload, unloaded, start, ready = (
            names.index("unload"),
            names.index("unloaded"),
            names.index("start"),
            names.index("ready"),
        )
        assert unload < unloaded < start < ready
        assert events[unload].data["victim"] == a
        assert events[unloaded].data["victim"] == a
        assert events[start].data["container"] == f"switchd-{b}"
        assert events[ready].data["model"] == b
        logs = [e for e in events if e.name == "log"]
        assert all(start < events.index(e) < ready for e in logs)
        assert {e.data["source"] for e in logs} == {b}
        lines = [e.data["line"] for e in logs]
        assert lines[: len(load_lines(b))] == load_lines(b)

        a_state = docker_state(containers, f"switchd-{a}")
        assert (a_state["Running"], a_state["Status"], a_state["ExitCode"]) == (False, "exited", 0)
        assert docker_state(containers, f"switchd-{b}")["Running"] is True
        found = await status(http)
        assert found["models"][a]["status"] == "exited"
        assert found["models"][b]["status"] == "running"
        assert found["models"][b]["engine"]["container"] == f"switchd-{b}"
        assert found["gpu"]["used_gb"] == SIZE_GB


# ---- changes behind switchd's back ------------------------------------------------


async def test_containers_stopped_or_killed_outside_show_at_once(
    containers: Containers, make_server: ServerFactory, engine_image: str
) -> None:
    a, b = containers.model("stopped"), containers.model("killed")
    server = serve_two(make_server, engine_image, a, b)
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
        event_feed(http) as feed,
    ):
        await switch_and_wait(http, a)

        containers.get(f"switchd-{a}").stop(timeout=2)  # docker stop
        gone_at = time.monotonic()
        found = await wait_for_status(http, a, "exited", within=2)
        assert time.monotonic() - gone_at < 2
        assert found["last_exit"]["exit_code"] == 0
        assert found["last_exit"]["reason"] == "exited with code 0"
        assert "engine" not in found
        changed = await feed.wait_for("model_state", 1, model=a, to="exited")
        assert changed.data["from"] == "running"
        assert changed.data["error"].startswith("exited with code 0 outside switchd")
        await wait_for_used_gb(http, 0.0, within=2)  # after the simulated release delay

        await switch_and_wait(http, b)  # nothing to unload: a is not running any more
        containers.get(f"switchd-{b}").kill()  # docker kill
        gone_at = time.monotonic()
        found = await wait_for_status(http, b, "failed", within=2)
        assert time.monotonic() - gone_at < 2
        assert found["last_exit"]["exit_code"] == 137
        assert found["last_exit"]["reason"] == "killed (SIGKILL)"
        assert found["error"].startswith("killed (SIGKILL) outside switchd:\n")
        assert f"INFO Model {b} loaded in " in found["error"]
        changed = await feed.wait_for("model_state", 1, model=b, to="failed")
        assert changed.data["from"] == "running"
        assert docker_state(containers, f"switchd-{b}")["ExitCode"] == 137


# ---- switchd killed and restarted ---------------------------------------------------


async def test_a_running_engine_is_adopted_after_kill_9_with_its_start_time(
    containers: Containers, make_server: ServerFactory, engine_image: str
) -> None:
    a, b = containers.model("a"), containers.model("b")
    server = serve_two(make_server, engine_image, a, b)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        await switch_and_wait(http, b)
        before = await model_status(http, b)
        docker_started = docker_state(containers, f"switchd-{b}")["StartedAt"]

        kill_switchd(server)
        assert docker_state(containers, f"switchd-{b}")["Running"] is True
        server.start()

        found = await status(http)
        assert found["models"][b]["status"] == "running"
        assert found["models"][b]["engine"] == before["engine"]  # same start time, same URL
        assert found["models"][a]["status"] == "exited"
        assert docker_state(containers, f"switchd-{b}")["StartedAt"] == docker_started
        assert found["gpu"]["used_gb"] == SIZE_GB
        assert found["switch"] is None

        answer = await http.post(
            "/v1/chat/completions",
            json={"model": b, "messages": [{"role": "user", "content": "still there?"}]},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == (
            f"Hello from {b}. You said: still there?"
        )
        assert docker_state(containers, f"switchd-{b}")["StartedAt"] == docker_started


async def test_kill_9_during_a_switch_converges_to_what_docker_runs(
    containers: Containers, make_server: ServerFactory, engine_image: str
) -> None:
    a, b = containers.model("a"), containers.model("b")
    server = serve_two(make_server, engine_image, a, b, load_b=3.0)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        await switch_and_wait(http, a)
        async with http.stream(
            "POST", "/v1/models/switch", params={"target_model": b}, headers=SSE
        ) as response:
            seen = [e for _, e in await read_events(response, stop=frozenset({"start"}))]
            assert [e.name for e in seen if e.name in ("unloaded", "start")] == [
                "unloaded",
                "start",
            ]
            job = seen[-1].data["job"]
            assert (await model_status(http, b))["status"] == "loading"
            kill_switchd(server)  # b's container is loading
        started = {
            name: docker_state(containers, f"switchd-{name}")["StartedAt"] for name in (a, b)
        }

        server.start()

        found = await status(http)
        for name in (a, b):
            running = docker_state(containers, f"switchd-{name}")["Running"]
            # An engine Docker runs is adopted (`loading` until healthy would do too).
            wanted = ("loading", "running") if running else ("exited",)
            assert found["models"][name]["status"] in wanted, name
        assert docker_state(containers, f"switchd-{b}")["Running"] is True
        assert docker_state(containers, f"switchd-{a}")["Running"] is False
        # No job resumed: at most a new one that waits for the adopted, loading engine.
        current = found["switch"]
        assert current is None or (current["id"] != job and current["target"] == b), current
        assert (await http.get(f"/v1/switches/{job}")).status_code == 404
        assert found["gpu"]["used_gb"] == SIZE_GB
        await wait_for_status(http, b, "running", within=10)
        found = await status(http)
        assert found["models"][a]["status"] == "exited"
        assert found["switch"] is None
        for name in (a, b):  # nothing was started again
            assert docker_state(containers, f"switchd-{name}")["StartedAt"] == started[name]


async def test_an_engine_adopted_while_loading_is_not_served_before_it_is_healthy(
    containers: Containers, make_server: ServerFactory, engine_image: str
) -> None:
    b = containers.model("slow")
    server = serve(
        make_server, {b: image_model(engine_image, b, size_gb=SIZE_GB, load_seconds=4.0)}
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        async with http.stream(
            "POST", "/v1/models/switch", params={"target_model": b}, headers=SSE
        ) as response:
            await read_events(response, stop=frozenset({"start"}))
            kill_switchd(server)
        server.start()

        answer = await http.post(
            "/v1/chat/completions",
            json={"model": b, "messages": [{"role": "user", "content": "hi"}]},
        )

        assert answer.status_code == 200, answer.text


# ---- clear errors, the proxy ----------------------------------------------------------


async def test_a_missing_container_fails_that_model_while_the_others_work(
    containers: Containers, make_server: ServerFactory, engine_image: str
) -> None:
    ghost, a = unique("ghost"), containers.model("a")
    missing = unique("no-such-container")
    message = f"container {missing} does not exist (create it with `docker compose create`)"
    server = serve(
        make_server,
        {
            ghost: {"container": missing, "size_gb": 10},
            a: image_model(engine_image, a, size_gb=SIZE_GB),
        },
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        found = await model_status(http, ghost)
        assert (found["status"], found["error"]) == ("failed", message)

        await switch_and_wait(http, a)
        assert (await model_status(http, a))["status"] == "running"

        response = await http.post("/v1/models/switch", params={"target_model": ghost})
        assert response.status_code == 502
        assert response.json()["error"] == "engine_failed"
        assert response.json()["message"] == f"{ghost}: {message}"
        found = await status(http)
        assert (found["models"][ghost]["status"], found["models"][ghost]["error"]) == (
            "failed",
            message,
        )
        assert found["models"][a]["status"] == "running"  # 10 GB fit: a was not unloaded
        assert docker_state(containers, f"switchd-{a}")["Running"] is True


async def test_the_proxy_loads_a_container_model_and_answers(
    containers: Containers,
    make_server: ServerFactory,
    docker_client: docker.DockerClient,
    engine_image: str,
) -> None:
    model = unique("chat")
    name = containers.name("compose-chat")
    entry = container_model(docker_client, engine_image, name, model, size_gb=SIZE_GB)
    server = serve(make_server, {model: entry})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        assert (await model_status(http, model))["status"] == "exited"

        answer = await http.post(
            "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "hello engine"}]},
        )

        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model"] == model
        assert body["choices"][0]["message"]["content"] == (
            f"Hello from {model}. You said: hello engine"
        )
        assert docker_state(containers, name)["Running"] is True
        found = await model_status(http, model)
        assert found["status"] == "running"
        assert found["engine"]["container"] == name
        assert found["engine"]["url"] == entry["url"]


SLEEP_MODE = ("--enable-sleep-mode", "--sleep-seconds", "0.05", "--wake-seconds", "0.05")


async def test_container_models_sleep_wake_and_are_adopted_asleep(
    containers: Containers,
    make_server: ServerFactory,
    docker_client: docker.DockerClient,
    engine_image: str,
) -> None:
    """Two compose-made containers with vLLM's sleep API: a switch puts one to sleep (its
    container keeps running), the way back wakes the same container, and a switchd
    started later finds the sleeping one asleep (vLLM's /is_sleeping)."""
    first, second = unique("sleepy"), unique("other")
    names = {model: containers.name(f"compose-{model}") for model in (first, second)}
    models = {
        model: {
            **container_model(
                docker_client, engine_image, names[model], model, size_gb=SIZE_GB, extra=SLEEP_MODE
            ),
            "standby": ["sleep1", "sleep2"],
        }
        for model in (first, second)
    }
    server = make_server(models, **SETTINGS, standby_host_ram_gb=500)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        await switch_and_wait(http, first)
        started = docker_state(containers, names[first])["StartedAt"]
        away = await switch_events(http, second)
        assert [e.name for e in away if e.name in ("sleep", "slept", "unload")] == [
            "sleep",
            "slept",
        ]
        asleep = await model_status(http, first)
        assert asleep["status"] == "sleeping"
        assert asleep["sleep"]["tier"] == "sleep1"
        assert docker_state(containers, names[first])["Running"] is True
        back = await switch_events(http, first)
        assert [e.name for e in back if e.name in ("start", "wake", "woken")] == ["wake", "woken"]
        # The same container run: woken, not restarted.
        assert docker_state(containers, names[first])["StartedAt"] == started
        answer = await http.post(
            "/v1/chat/completions",
            json={"model": first, "messages": [{"role": "user", "content": "awake?"}]},
        )
        assert answer.status_code == 200, answer.text
        assert (await model_status(http, second))["status"] == "sleeping"
    assert server.stop() == 0

    again = make_server(models, **SETTINGS, standby_host_ram_gb=500)
    async with httpx.AsyncClient(base_url=again.url, timeout=30) as http:
        found = await model_status(http, second)
        assert found["status"] == "sleeping"
        assert found["sleep"]["tier"] == "sleep2"  # its level is not told: woken thoroughly
        assert (await model_status(http, first))["status"] == "running"
        answer = await http.post(
            "/v1/chat/completions",
            json={"model": second, "messages": [{"role": "user", "content": "and you?"}]},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == (
            f"Hello from {second}. You said: and you?"
        )
        assert (await model_status(http, first))["status"] == "sleeping"
