"""Restarts and config changes without cold reloads, against a real switchd and real
demo engines: adoption after `kill -9`, a planned restart, live reloads, preload."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from switchd.client import ServerEvent, SseParser
from tests.integration.conftest import ServerFactory
from tests.integration.server import Server, engine_cmd, read_events
from tests.processes import gone, wait_gone

SSE = {"Accept": "text/event-stream"}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def models(**extra: dict[str, Any]) -> dict[str, Any]:
    """Small models that all fit together (the simulated card holds 95.59 GB)."""
    catalog: dict[str, Any] = {
        "small-a": {"cmd": engine_cmd(0.3), "size_gb": 10},
        "small-b": {"cmd": engine_cmd(0.3), "size_gb": 10},
    }
    catalog.update(extra)
    return catalog


@pytest.fixture
def engines() -> Iterator[list[int]]:
    """Engine process groups a test leaves running (a planned restart): killed at its end."""
    groups: list[int] = []
    yield groups
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def connect(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        yield http


async def switch_and_wait(http: httpx.AsyncClient, model: str) -> None:
    response = await http.post("/v1/models/switch", params={"target_model": model, "wait": "ready"})
    assert response.status_code == 200, response.text


async def statuses(http: httpx.AsyncClient) -> dict[str, Any]:
    body: dict[str, Any] = (await http.get("/v1/models/status")).json()["models"]
    return body


async def pid_of(http: httpx.AsyncClient, model: str) -> int:
    status = (await statuses(http))[model]
    assert status["status"] == "running", status
    pid: int = status["engine"]["pid"]
    return pid


async def chat(http: httpx.AsyncClient, model: str) -> httpx.Response:
    return await http.post("/v1/chat/completions", json={"model": model, **CHAT})


async def until(check: Any, within: float = 20.0, every: float = 0.1) -> None:
    """Poll the async predicate `check` until it holds; fail past `within` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(every)


def crash(server: Server) -> None:
    assert server.process is not None
    server.process.kill()  # kill -9: no shutdown code runs
    server.process.wait(10)


def rewrite(server: Server, change: Any) -> None:
    """Edit the server's config file in place (`change` gets the decoded mapping)."""
    data = yaml.safe_load(server.config.read_text())
    change(data)
    server.config.write_text(yaml.safe_dump(data))


async def next_event(response: httpx.Response, name: str, within: float = 20.0) -> ServerEvent:
    parser = SseParser()

    async def find() -> ServerEvent:
        async for line in response.aiter_lines():
            event = parser.feed(line)
            if event is not None and event.name == name:
                return event
        raise AssertionError(f"the stream ended before a {name} event")

    return await asyncio.wait_for(find(), within)


# ---- adoption -----------------------------------------------------------------------


async def test_an_engine_outlives_a_killed_switchd_and_is_adopted_without_a_load(
    make_server: ServerFactory,
) -> None:
    server = make_server(models())
    async with connect(server) as http:
        await switch_and_wait(http, "small-a")
        pid = await pid_of(http, "small-a")
    crash(server)
    await asyncio.sleep(0.5)
    assert not gone(pid), "the engine died with switchd"
    server.start()
    async with connect(server) as http:
        began = time.monotonic()
        answer = await chat(http, "small-a")
        assert answer.status_code == 200, answer.text
        assert time.monotonic() - began < 2.0  # no load: the engine answers at once
        assert await pid_of(http, "small-a") == pid  # the same engine
        history = (await http.get("/v1/switches")).json()["switches"]
        assert history == []  # no load job, no switch
        gpu = (await http.get("/v1/models/status")).json()["gpu"]
        assert gpu["used_gb"] == 10.0  # the simulated card's ledger learned it
    assert "adopting the engine of small-a" in server.log()


async def test_an_engine_loading_when_switchd_was_killed_is_adopted_and_its_lines_flow(
    make_server: ServerFactory,
) -> None:
    server = make_server(models(slow={"cmd": engine_cmd(6.0), "size_gb": 10}))
    async with connect(server) as http:
        started = await http.post("/v1/models/switch", params={"target_model": "slow"})
        assert started.status_code == 200, started.text
        pid = (await statuses(http))["slow"]["engine"]["pid"]
    crash(server)
    server.start()
    async with connect(server) as http:
        (job,) = (await http.get("/v1/switches")).json()["switches"]
        assert (job["target"], job["cause"]) == ("slow", "demand")
        async with http.stream("GET", f"/v1/switches/{job['id']}/events", headers=SSE) as resp:
            events = [event for _, event in await read_events(resp, within=30)]
        assert events[-1].name == "result", events[-1]
        lines = [e.data["line"] for e in events if e.name == "log"]
        # Printed by the engine after the new switchd took it over, read from its file.
        assert "INFO Model slow loaded in" in " ".join(lines), lines
        assert await pid_of(http, "slow") == pid


async def test_an_engine_whose_model_left_the_config_is_stopped_saying_why(
    make_server: ServerFactory,
) -> None:
    server = make_server(models())
    async with connect(server) as http:
        await switch_and_wait(http, "small-b")
        pid = await pid_of(http, "small-b")
    crash(server)
    rewrite(server, lambda data: data["models"].pop("small-b"))
    server.start()
    assert await wait_gone(pid, 10)
    assert (
        f"not adopting the engine of small-b (pid {pid}) left by an earlier switchd:"
        " its model is no longer in the config; stopping it"
    ) in server.log()


async def test_an_engine_whose_settings_changed_is_stopped_and_loads_anew(
    make_server: ServerFactory,
) -> None:
    server = make_server(models())
    async with connect(server) as http:
        await switch_and_wait(http, "small-a")
        pid = await pid_of(http, "small-a")
    crash(server)
    rewrite(server, lambda data: data["models"]["small-a"].update(cmd=engine_cmd(0.2)))
    server.start()
    assert await wait_gone(pid, 10)
    assert "its engine settings changed in the config; stopping it" in server.log()
    async with connect(server) as http:
        assert (await statuses(http))["small-a"]["status"] == "exited"


async def test_a_planned_restart_keeps_the_engines_serving(
    make_server: ServerFactory, engines: list[int]
) -> None:
    server = make_server(models(), keep_engines_on_exit=True)
    async with connect(server) as http:
        await switch_and_wait(http, "small-a")
        await switch_and_wait(http, "small-b")
        pids = [await pid_of(http, m) for m in ("small-a", "small-b")]
    engines.extend(pids)
    assert server.stop() == 0  # SIGTERM
    await asyncio.sleep(0.5)
    assert not any(gone(pid) for pid in pids), "an engine stopped with switchd"
    assert "left 2 engine(s) running for the next switchd" in server.log()
    server.start()
    async with connect(server) as http:
        for model, pid in zip(("small-a", "small-b"), pids, strict=True):
            began = time.monotonic()
            assert (await chat(http, model)).status_code == 200
            assert time.monotonic() - began < 2.0
            assert await pid_of(http, model) == pid
        assert (await http.get("/v1/switches")).json()["switches"] == []


# ---- preload ------------------------------------------------------------------------


async def test_preload_loads_in_order_at_start_and_skips_what_would_unload_another(
    make_server: ServerFactory,
) -> None:
    catalog = models(big={"cmd": engine_cmd(0.3), "size_gb": 80})
    server = make_server(catalog, preload=["small-b", "small-a", "big"])
    async with connect(server) as http:

        async def settled() -> bool:
            jobs = (await http.get("/v1/switches")).json()["switches"]
            return len(jobs) == 3 and all(job["status"] != "running" for job in jobs)

        await until(settled)
        jobs = (await http.get("/v1/switches")).json()["switches"]
        assert [(j["target"], j["cause"], j["status"]) for j in reversed(jobs)] == [
            ("small-b", "preload", "succeeded"),
            ("small-a", "preload", "succeeded"),
            ("big", "preload", "succeeded"),  # skipped: a result, not an error
        ]
        status = await statuses(http)
        assert {m: status[m]["status"] for m in status} == {
            "small-a": "running",
            "small-b": "running",
            "big": "exited",
        }
    assert "big not preloaded: it does not fit beside the models loaded" in server.log()


async def test_preload_does_not_load_an_adopted_model_again(make_server: ServerFactory) -> None:
    server = make_server(models(), preload=["small-a"])
    async with connect(server) as http:
        await until(lambda: _running(http, "small-a"))
        pid = await pid_of(http, "small-a")
    crash(server)
    server.start()
    async with connect(server) as http:
        assert await pid_of(http, "small-a") == pid
        assert (await http.get("/v1/switches")).json()["switches"] == []


async def _running(http: httpx.AsyncClient, model: str) -> bool:
    return bool((await statuses(http))[model]["status"] == "running")


# ---- live reloads -------------------------------------------------------------------


async def test_sighup_adds_removes_and_restarts_models_while_requests_flow(
    make_server: ServerFactory,
) -> None:
    catalog = models(doomed={"cmd": engine_cmd(0.3), "size_gb": 10})
    server = make_server(catalog)
    async with connect(server) as http:
        for model in ("small-a", "small-b", "doomed"):
            await switch_and_wait(http, model)
        kept, changed, doomed = [await pid_of(http, m) for m in ("small-a", "small-b", "doomed")]
        codes: list[int] = []
        stop = asyncio.Event()

        async def traffic() -> None:
            while not stop.is_set():
                codes.append((await chat(http, "small-a")).status_code)

        flow = asyncio.create_task(traffic())
        try:
            async with http.stream("GET", "/v1/events", headers=SSE) as events:

                def change(data: dict[str, Any]) -> None:
                    data["models"].pop("doomed")
                    data["models"]["small-b"]["cmd"] = engine_cmd(0.2)
                    data["models"]["fresh"] = {"cmd": engine_cmd(0.3), "size_gb": 10}
                    data["models"]["small-a"]["ttl_seconds"] = 600  # switchd-only: kept

                rewrite(server, change)
                assert server.process is not None
                server.process.send_signal(signal.SIGHUP)
                reloaded = await next_event(events, "config_reloaded")
            described = {k: v for k, v in reloaded.data.items() if k not in ("id", "event", "ts")}
            assert described == {
                "status": "ok",
                "added": ["fresh"],
                "removed": ["doomed"],
                "changed": ["small-b"],
                "unchanged": ["small-a"],
                "refused": {},
            }

            async def settled() -> bool:
                status = await statuses(http)
                engine = status.get("small-b", {}).get("engine") or {}
                return "doomed" not in status and engine.get("pid") not in (None, changed)

            await until(settled)
            await asyncio.sleep(0.5)  # requests keep flowing after it
        finally:
            stop.set()
            await flow
        status = await statuses(http)
        assert sorted(status) == ["fresh", "small-a", "small-b"]
        assert status["fresh"]["status"] == "exited"  # new: loads on demand
        assert status["small-a"]["engine"]["pid"] == kept
        assert status["small-b"]["status"] == "running"  # restarted with its new cmd
        assert gone(changed)
        assert gone(doomed)
        assert codes
        assert set(codes) == {200}  # no request to the unchanged model failed
        assert (await chat(http, "fresh")).status_code == 200
        assert (await chat(http, "doomed")).status_code == 404


async def test_a_broken_file_changes_nothing_and_says_why(
    make_server: ServerFactory,
) -> None:
    server = make_server(models())
    async with connect(server) as http:
        await switch_and_wait(http, "small-a")
        pid = await pid_of(http, "small-a")
        good = server.config.read_text()
        server.config.write_text(good.replace("models:", "models: [", 1))
        async with http.stream("GET", "/v1/events", headers=SSE) as events:
            assert server.process is not None
            server.process.send_signal(signal.SIGHUP)
            event = await next_event(events, "config_reloaded")
        problem = f"{server.config}: is not valid YAML at line"
        assert event.data["status"] == "error"
        assert event.data["error"].startswith(problem), event.data
        assert "config reload refused, nothing changed: " + problem in server.log()

        answer = await http.post("/v1/config/reload")
        assert answer.status_code == 422
        body = answer.json()
        assert (body["status"], body["error"]) == ("error", "invalid_config")
        assert body["message"].startswith(problem)

        # Valid YAML, an invalid config: the same.
        server.config.write_text(good.replace("size_gb: 10", "size_gb: -1", 1))
        answer = await http.post("/v1/config/reload")
        assert answer.status_code == 422
        assert "size_gb" in answer.json()["message"]

        assert await pid_of(http, "small-a") == pid
        assert sorted(await statuses(http)) == ["small-a", "small-b"]
        assert (await chat(http, "small-a")).status_code == 200


async def test_listen_and_runtime_cannot_change_live(make_server: ServerFactory) -> None:
    server = make_server(models())
    rewrite(server, lambda data: data.update(listen="127.0.0.1:1", runtime="docker"))
    async with connect(server) as http:
        answer = await http.post("/v1/config/reload")
        assert answer.status_code == 200, answer.text
        assert set(answer.json()["refused"]) == {"listen", "runtime"}
        assert (await http.get("/health")).status_code == 200  # still on its port


async def test_reload_needs_the_admin_key(make_server: ServerFactory) -> None:
    server = make_server(models(), api_keys=["admin"], read_keys=["reader"])
    async with connect(server) as http:
        denied = await http.post("/v1/config/reload", headers={"Authorization": "Bearer reader"})
        assert denied.status_code == 403
        allowed = await http.post("/v1/config/reload", headers={"Authorization": "Bearer admin"})
        assert allowed.status_code == 200
        assert allowed.json()["unchanged"] == ["small-a", "small-b"]


def test_the_cli_reloads(make_server: ServerFactory, capsys: pytest.CaptureFixture[str]) -> None:
    from switchd.cli import main  # noqa: PLC0415

    server = make_server(models())
    rewrite(
        server, lambda data: data["models"].update(extra={"cmd": engine_cmd(0.3), "size_gb": 1})
    )
    assert main(["reload", "--url", server.url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "added      extra",
        "removed    -",
        "changed    -",
        "unchanged  small-a, small-b",
    ]
    Path(server.config).write_text("models: [")
    assert main(["reload", "--url", server.url]) == 1
    assert "is not valid YAML" in capsys.readouterr().err
