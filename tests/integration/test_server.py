"""The seed's scenarios against a real switchd, real HTTP and real demo engines."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from typing import Any

import httpx

from tests.integration.conftest import ServerFactory
from tests.integration.server import Server, engine_cmd, read_events, seed_models
from tests.processes import gone

SSE = {"Accept": "text/event-stream"}


def fold(names: list[str]) -> list[str]:
    """Repeats of `loading` and `log` folded into one, for exact sequences."""
    folded: list[str] = []
    for name in names:
        if name in ("loading", "log") and folded and folded[-1] == name:
            continue
        folded.append(name)
    return folded


async def switch_and_wait(http: httpx.AsyncClient, model: str) -> dict[str, Any]:
    response = await http.post("/v1/models/switch", params={"target_model": model, "wait": "ready"})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def model_status(http: httpx.AsyncClient, model: str) -> dict[str, Any]:
    status: dict[str, Any] = (await http.get("/v1/models/status")).json()
    return dict(status["models"][model])


async def test_status_reports_every_model_and_the_gpu(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models/status")
    assert response.status_code == 200
    status = response.json()
    assert set(status["models"]) == {
        "gpt-oss-120b",
        "gpt-oss-20b",
        "deepseek-coder-33b-instruct",
        "mistral-7b-v0.1",
    }
    assert status["models"]["gpt-oss-20b"]["status"] == "exited"
    assert status["models"]["gpt-oss-20b"]["size_gb"] == 24.0
    assert status["gpu"] == {
        "used_gb": 0.0,
        "total_gb": 95.59,
        "available_gb": 95.59,
        "source": "simulated",
        "devices": [
            {
                "index": 0,
                "name": "Simulated GPU",
                "used_gb": 0.0,
                "total_gb": 95.59,
                "available_gb": 95.59,
                "models": {},
            },
        ],
    }
    assert status["switch"] is None
    health = (await client.get("/health")).json()
    assert health["status"] == "ok"


async def test_seed_switch_unloads_the_largest_and_reports_measured_freed(
    client: httpx.AsyncClient,
) -> None:
    await switch_and_wait(client, "gpt-oss-120b")
    response = await client.post("/v1/models/switch", params={"target_model": "gpt-oss-20b"})
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "success"
    assert body["model"] == "gpt-oss-20b"
    assert body["unloaded_models"] == ["gpt-oss-120b"]
    assert body["start_result"]["status"] == "starting"
    assert body["memory_info"] == {
        "required_gb": 24.0,
        "available_before_gb": 15.59,
        "freed_gb": 80.0,
    }
    status = (await client.get("/v1/models/status")).json()
    assert status["models"]["gpt-oss-120b"]["status"] == "exited"
    assert status["models"]["gpt-oss-20b"]["status"] in ("loading", "running")
    job = (await client.get(f"/v1/switches/{body['job']}")).json()
    assert job["target"] == "gpt-oss-20b"


async def test_already_loaded(client: httpx.AsyncClient) -> None:
    await switch_and_wait(client, "mistral-7b-v0.1")
    response = await client.post("/v1/models/switch", params={"target_model": "mistral-7b-v0.1"})
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "already_loaded"
    assert body["model"] == "mistral-7b-v0.1"


async def test_insufficient_memory_is_409_and_unloads_nothing(make_server: ServerFactory) -> None:
    models = seed_models()
    models["base"] = {"cmd": engine_cmd(0.5), "size_gb": 30, "pinned": True}
    models["huge"] = {"cmd": engine_cmd(0.5), "size_gb": 70}  # never beside the pinned base
    server = make_server(models)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        await switch_and_wait(http, "base")
        await switch_and_wait(http, "gpt-oss-20b")
        response = await http.post("/v1/models/switch", params={"target_model": "huge"})
        assert response.status_code == 409
        assert response.json() == {
            "status": "error",
            "error": "insufficient_memory",
            "message": "huge needs 70.00 GB but only 65.59 GB would be free after unloading "
            "every unpinned model; nothing was unloaded",
            "required_gb": 70.0,
            "available_gb": 41.59,
            "freed_gb": 0.0,
            "total_available_gb": 65.59,
        }
        assert (await model_status(http, "gpt-oss-20b"))["status"] == "running"


async def test_unknown_model_404_and_missing_parameter_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/models/switch", params={"target_model": "gpt-5"}, headers=SSE)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] == "model_not_found"
    assert "gpt-oss-20b" in body["message"]
    assert body["available_models"] == sorted(body["available_models"])
    response = await client.post("/v1/models/switch")
    assert response.status_code == 400
    assert response.json()["error"] == "missing_parameter"
    response = await client.post("/v1/models/unload")
    assert response.status_code == 400
    response = await client.post(
        "/v1/models/switch",
        content=b"{" + b" " * 70_000 + b"}",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413
    assert response.json()["error"] == "body_too_large"
    response = await client.get("/v1/switches/nope")
    assert response.status_code == 404
    assert response.json()["error"] == "job_not_found"


async def test_target_in_a_json_body_works_too(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/models/switch", json={"target_model": "20b"}, params={"wait": "ready"}
    )
    assert response.status_code == 200
    assert response.json()["start_result"]["status"] == "ready"


async def test_engine_crash_while_loading_streams_its_last_lines(
    make_server: ServerFactory,
) -> None:
    models = seed_models()
    models["crashy"] = {"cmd": engine_cmd(5, "--fail-after", "0.4"), "size_gb": 10}
    server = make_server(models)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        params = {"target_model": "crashy"}
        async with http.stream("POST", "/v1/models/switch", params=params, headers=SSE) as resp:
            assert resp.status_code == 200
            events = [event for _, event in await read_events(resp)]
        assert fold([e.name for e in events]) == [
            "memory_check",
            "start",
            "loading",
            "log",
            "error",
        ]
        error = events[-1].data
        assert error["error"] == "engine_failed"
        assert error["exit_code"] == 1
        assert "ERROR Engine core initialization failed" in error["last_lines"]
        assert "CUDA out of memory" in "\n".join(error["last_lines"])
        assert "exited with code 1 while loading" in error["message"]
        status = await model_status(http, "crashy")
        assert status["status"] == "failed"
        assert "Engine core initialization failed" in status["error"]
        # Waiting for readiness, the JSON mode answers the crash with 502.
        params = {"target_model": "crashy", "wait": "ready"}
        response = await http.post("/v1/models/switch", params=params)
        assert response.status_code == 502
        assert response.json()["error"] == "engine_failed"


async def test_stages_stream_live_in_order_with_rising_progress(
    make_server: ServerFactory,
) -> None:
    models = seed_models(load_seconds=0.5)
    models["gpt-oss-20b"]["cmd"] = engine_cmd(2.0)
    server = make_server(models)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        await switch_and_wait(http, "gpt-oss-120b")
        params = {"target_model": "gpt-oss-20b"}
        async with http.stream("POST", "/v1/models/switch", params=params, headers=SSE) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert resp.headers["x-accel-buffering"] == "no"
            timed = await read_events(resp)
    events = [event for _, event in timed]
    # Log lines and loading ticks interleave as the engine prints: exact at both ends.
    names = [e.name for e in events]
    assert names[:5] == ["memory_check", "unload", "unloaded", "freed", "start"]
    assert names[-2:] == ["ready", "result"]
    assert set(names[5:-2]) == {"loading", "log"}
    arrived = {event.name: at for at, event in timed}
    first_start = next(at for at, event in timed if event.name == "start")
    assert arrived["ready"] - first_start >= 1.5, "ready came as it happened, not with start"
    ids = [int(e.id or 0) for e in events]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    progress = [e.data["progress"] for e in events]
    assert progress == sorted(progress)
    assert progress[-1] == 1.0
    assert all(e.data["job"] == events[0].data["job"] for e in events)
    assert all(e.data["model"] == "gpt-oss-20b" for e in events)
    assert events[1].data["victim"] == events[2].data["victim"] == "gpt-oss-120b"
    assert events[2].data["freed_gb"] == 80.0
    assert events[-1].data["unloaded_models"] == ["gpt-oss-120b"]


async def test_two_clients_for_one_target_share_one_job(client: httpx.AsyncClient) -> None:
    async def follow() -> list[Any]:
        params = {"target_model": "deepseek-coder-33b-instruct"}
        async with client.stream("POST", "/v1/models/switch", params=params, headers=SSE) as r:
            return [event for _, event in await read_events(r)]

    first, second = await asyncio.gather(follow(), follow())
    assert first[0].data["job"] == second[0].data["job"]
    assert [e.id for e in first] == [e.id for e in second]
    assert first[-1].name == "result"


async def test_other_target_waits_in_the_queue(client: httpx.AsyncClient) -> None:
    async def follow(model: str) -> list[Any]:
        params = {"target_model": model}
        async with client.stream("POST", "/v1/models/switch", params=params, headers=SSE) as r:
            return [event for _, event in await read_events(r)]

    first = asyncio.create_task(follow("mistral-7b-v0.1"))
    await asyncio.sleep(0.3)
    second = await follow("deepseek-coder-33b-instruct")
    assert second[0].name == "queued"
    assert second[0].data["position"] == 1
    assert second[0].data["behind"] == "mistral-7b-v0.1"
    assert second[-1].name == "result"
    assert (await first)[-1].name == "result"


async def test_a_client_that_leaves_does_not_cancel_its_switch(
    client: httpx.AsyncClient,
) -> None:
    params = {"target_model": "gpt-oss-20b"}
    async with client.stream("POST", "/v1/models/switch", params=params, headers=SSE) as resp:
        events = await read_events(resp, stop=frozenset({"start"}))
        job = events[0][1].data["job"]
    deadline = time.monotonic() + 20
    while (await model_status(client, "gpt-oss-20b"))["status"] != "running":
        assert time.monotonic() < deadline, "the switch did not finish"
        await asyncio.sleep(0.1)
    record = (await client.get(f"/v1/switches/{job}")).json()
    assert record["status"] == "succeeded"
    assert record["stage"] == "done"
    async with client.stream("GET", f"/v1/switches/{job}/events") as resp:
        replay = [event for _, event in await read_events(resp)]
    assert replay[0].name == "memory_check"
    assert replay[-1].name == "result"


async def test_server_events_open_with_a_snapshot_and_resume_from_last_event_id(
    client: httpx.AsyncClient,
) -> None:
    async with client.stream("GET", "/v1/events") as resp:
        timed = await read_events(resp, stop=frozenset({"snapshot"}))
    snapshot = timed[0][1]
    assert snapshot.name == "snapshot"
    assert set(snapshot.data["models"]) >= {"gpt-oss-20b"}
    await switch_and_wait(client, "mistral-7b-v0.1")
    headers = {"Last-Event-ID": snapshot.id or "0"}
    async with client.stream("GET", "/v1/events", headers=headers) as resp:
        replayed = [event for _, event in await read_events(resp)]
    assert replayed[0].name != "snapshot"
    assert int(replayed[0].id or 0) == int(snapshot.id or 0) + 1
    names = [e.name for e in replayed]
    assert "model_state" in names
    assert names[-1] == "result"
    states = [(e.data["from"], e.data["to"]) for e in replayed if e.name == "model_state"]
    assert states == [("exited", "loading"), ("loading", "running")]
    headers = {"Last-Event-ID": "99999999"}
    async with client.stream("GET", "/v1/events", headers=headers) as resp:
        fresh = await read_events(resp, stop=frozenset({"snapshot"}))
    # An id no longer held (from before any journal): said so, then a fresh snapshot.
    gap, snapshot = fresh[0][1], fresh[1][1]
    assert gap.name == "gap"
    assert gap.data["asked"] == 99999999
    assert snapshot.name == "snapshot"
    assert snapshot.data["reason"] == "gap"
    assert snapshot.data["models"]["mistral-7b-v0.1"]["status"] == "running"
    assert timed[0][1].data["reason"] == "connect"


async def test_unload_frees_measured_memory(client: httpx.AsyncClient) -> None:
    await switch_and_wait(client, "mistral-7b-v0.1")
    response = await client.post("/v1/models/unload", params={"model": "mistral-7b-v0.1"})
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "success"
    assert body["unloaded_models"] == ["mistral-7b-v0.1"]
    assert body["freed_gb"] == 18.0
    assert (await model_status(client, "mistral-7b-v0.1"))["status"] == "exited"
    response = await client.post("/v1/models/unload", params={"model": "all"})
    assert response.json()["status"] == "not_loaded"


async def test_api_keys_guard_everything_but_health(make_server: ServerFactory) -> None:
    server = make_server(api_keys=["s3cret-key-1"])
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        assert (await http.get("/health")).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key-1"}):
            response = await http.get("/v1/models/status", headers=headers)
            assert response.status_code == 401
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert response.json()["error"]["code"] == "invalid_api_key"
        response = await http.post(
            "/v1/models/switch",
            params={"target_model": "mistral-7b-v0.1"},
            headers={**SSE, "Authorization": "Bearer wrong"},
        )
        assert response.status_code == 401
        good = {"Authorization": "Bearer s3cret-key-1"}
        assert (await http.get("/v1/models/status", headers=good)).status_code == 200
    assert "s3cret-key-1" not in server.log()


async def test_sigterm_stops_every_engine_and_learning_survives_restart(
    make_server: ServerFactory,
) -> None:
    server = make_server()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        await switch_and_wait(http, "gpt-oss-20b")
        await switch_and_wait(http, "mistral-7b-v0.1")
        status = (await http.get("/v1/models/status")).json()["models"]
        pids = [status[m]["engine"]["pid"] for m in ("gpt-oss-20b", "mistral-7b-v0.1")]
        learned = status["gpt-oss-20b"]["estimated_load_time_seconds"]
    assert learned != 1.0, "the configured estimate was replaced by a measured one"
    assert not any(gone(pid) for pid in pids)
    assert server.stop() == 0
    for pid in pids:
        assert gone(pid), f"engine {pid} outlived switchd"
    server.start()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        again = await model_status(http, "gpt-oss-20b")
    assert again["status"] == "exited"
    assert again["estimated_load_time_seconds"] == learned


async def test_event_streams_that_clients_close_leave_nothing_behind(
    client: httpx.AsyncClient,
) -> None:
    for _ in range(5):
        async with client.stream("GET", "/v1/events") as resp:
            await read_events(resp, stop=frozenset({"snapshot"}))
    # No event is published meanwhile: nothing but the closing itself may release them.
    deadline = time.monotonic() + 3
    while True:
        metrics = (await client.get("/metrics")).text
        if "switchd_event_subscribers 0.0" in metrics and "switchd_sse_streams 0.0" in metrics:
            break
        assert time.monotonic() < deadline, metrics
        await asyncio.sleep(0.1)


async def test_job_events_resume_after_last_event_id_and_end_with_204(
    client: httpx.AsyncClient,
) -> None:
    params = {"target_model": "mistral-7b-v0.1", "wait": "ready"}
    job = (await client.post("/v1/models/switch", params=params)).json()["job"]
    async with client.stream("GET", f"/v1/switches/{job}/events") as resp:
        everything = [event for _, event in await read_events(resp)]
    middle = everything[len(everything) // 2]
    headers = {"Last-Event-ID": middle.id or ""}
    async with client.stream("GET", f"/v1/switches/{job}/events", headers=headers) as resp:
        rest = [event for _, event in await read_events(resp)]
    assert [e.id for e in rest] == [
        e.id for e in everything if int(e.id or 0) > int(middle.id or 0)
    ]
    headers = {"Last-Event-ID": everything[-1].id or ""}
    response = await client.get(f"/v1/switches/{job}/events", headers=headers)
    assert response.status_code == 204


async def test_the_switch_history_lists_recent_jobs_newest_first_with_their_stages(
    client: httpx.AsyncClient,
) -> None:
    await switch_and_wait(client, "gpt-oss-120b")
    await switch_and_wait(client, "gpt-oss-20b")
    history = await client.get("/v1/switches")
    assert history.status_code == 200
    jobs = history.json()["switches"]
    assert [(j["target"], j["kind"], j["status"]) for j in jobs] == [
        ("gpt-oss-20b", "switch", "succeeded"),
        ("gpt-oss-120b", "switch", "succeeded"),
    ]
    latest = jobs[0]
    assert latest["unloaded_models"] == ["gpt-oss-120b"]
    assert [s["stage"] for s in latest["timeline"]] == [
        "memory_check",
        "unload",
        "unloaded",
        "freed",
        "start",
        "ready",
        "result",
    ]
    offsets = [s["at_seconds"] for s in latest["timeline"]]
    assert offsets == sorted(offsets)
    assert offsets[-1] >= 0.5  # the engine's load, at least
    one = await client.get("/v1/switches", params={"limit": "1"})
    assert [j["target"] for j in one.json()["switches"]] == ["gpt-oss-20b"]
    for bad in ("0", "201", "x", "-1"):
        refused = await client.get("/v1/switches", params={"limit": bad})
        assert refused.status_code == 400
        assert refused.json() == {
            "status": "error",
            "error": "invalid_parameter",
            "message": f"limit must be a whole number from 1 to 200, got {bad!r}",
        }


# ---- SSE blocks as sent: the retry hint rides on the first event --------------------------


async def raw_blocks(response: httpx.Response, until: str, within: float = 30.0) -> list[list[str]]:
    """The stream's blocks as sent, each its lines, split by hand at the blank lines,
    up to the first block of event `until` (as a client without an SSE library reads)."""
    received = b""

    async def collect() -> list[list[str]]:
        nonlocal received
        async for chunk in response.aiter_raw():
            received += chunk
            text = received.decode().replace("\r\n", "\n")
            blocks = [block.split("\n") for block in text.split("\n\n")[:-1]]
            if any(f"event: {until}" in block for block in blocks):
                return blocks
        raise AssertionError(f"the stream ended before `{until}`: {received!r}")

    return await asyncio.wait_for(collect(), within)


def data_of(block: list[str]) -> Any:
    lines = [line.removeprefix("data: ") for line in block if line.startswith("data: ")]
    assert lines, f"a block without data: {block}"
    return json.loads("\n".join(lines))


def check_blocks(blocks: list[list[str]], first_event: str) -> None:
    """The first block is the first event with `retry: 3000` in it; no other block has a
    retry, and each block but a comment (a ping) is an event with data."""
    first = blocks[0]
    assert "retry: 3000" in first, first
    assert f"event: {first_event}" in first, first
    assert any(line.startswith("id: ") for line in first), first
    data_of(first)
    for block in blocks:
        if all(line.startswith(":") for line in block):
            continue  # a ping: a comment, which clients skip
        data_of(block)
    assert [block for block in blocks[1:] if any(x.startswith("retry:") for x in block)] == []


async def test_the_first_sse_block_is_the_snapshot_with_the_retry_hint(
    client: httpx.AsyncClient,
) -> None:
    async with client.stream("GET", "/v1/events") as resp:
        blocks = await raw_blocks(resp, until="snapshot")
    check_blocks(blocks, "snapshot")
    assert len(blocks) == 1
    snapshot = data_of(blocks[0])
    assert set(snapshot["models"]) >= {"gpt-oss-20b"}
    snapshot_id = next(line for line in blocks[0] if line.startswith("id: "))[4:]
    # A resumed stream starts with the first event missed, which carries the hint.
    await switch_and_wait(client, "mistral-7b-v0.1")
    headers = {"Last-Event-ID": snapshot_id}
    async with client.stream("GET", "/v1/events", headers=headers) as resp:
        resumed = await raw_blocks(resp, until="result")
    first = resumed[0]
    assert "event: snapshot" not in first
    assert f"id: {int(snapshot_id) + 1}" in first
    check_blocks(resumed, first[1].removeprefix("event: "))


async def test_switch_streams_send_the_retry_hint_with_their_first_event(
    client: httpx.AsyncClient,
) -> None:
    params = {"target_model": "mistral-7b-v0.1"}
    async with client.stream("POST", "/v1/models/switch", params=params, headers=SSE) as resp:
        live = await raw_blocks(resp, until="result")
    check_blocks(live, "memory_check")
    job = data_of(live[0])["job"]
    assert data_of(live[-1])["status"] == "success"
    # The job's own stream replays it from its first event, hint included.
    async with client.stream("GET", f"/v1/switches/{job}/events") as resp:
        replay = await raw_blocks(resp, until="result")
    check_blocks(replay, "memory_check")
    assert [data_of(block)["seq"] for block in replay] == [data_of(b)["seq"] for b in live]
    # Resumed after Last-Event-ID: the first event not yet seen, hint included.
    middle = next(line for line in live[1] if line.startswith("id: "))[4:]
    headers = {"Last-Event-ID": middle}
    async with client.stream("GET", f"/v1/switches/{job}/events", headers=headers) as resp:
        rest = await raw_blocks(resp, until="result")
    assert "retry: 3000" in rest[0]
    assert [data_of(block)["seq"] for block in rest] == [data_of(b)["seq"] for b in live[2:]]
    # And once every event was seen: 204, no stream at all.
    last = next(line for line in live[-1] if line.startswith("id: "))[4:]
    done = await client.get(f"/v1/switches/{job}/events", headers={"Last-Event-ID": last})
    assert done.status_code == 204
    assert done.content == b""


async def test_sigterm_ends_open_event_streams_properly_and_promptly(
    make_server: ServerFactory,
) -> None:
    """Watchers of /v1/events get the end of their stream (not a cut connection) when
    switchd stops, and do not hold its shutdown up."""
    server = make_server()
    ended: list[bytes] = []

    async def watch(http: httpx.AsyncClient) -> None:
        async with http.stream("GET", "/v1/events") as response:
            ended.append(b"".join([chunk async for chunk in response.aiter_raw()]))

    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        watchers = [asyncio.create_task(watch(http)) for _ in range(20)]
        for _ in range(100):
            metrics = (await http.get("/metrics")).text
            if "switchd_sse_streams 20.0" in metrics:
                break
            await asyncio.sleep(0.05)
        assert "switchd_sse_streams 20.0" in metrics
        started = time.monotonic()
        assert await asyncio.to_thread(server.stop) == 0
        await asyncio.wait_for(asyncio.gather(*watchers), 10)
    assert time.monotonic() - started < 5  # the open streams did not hold switchd up
    assert len(ended) == 20
    assert all(body.startswith(b"id: ") and b"event: snapshot" in body for body in ended)


async def test_a_watcher_that_stops_reading_does_not_hold_up_the_others(
    client: httpx.AsyncClient, server: Server
) -> None:
    # A raw socket that subscribes and never reads, with a tiny receive buffer.
    _reader, writer = await asyncio.open_connection("127.0.0.1", server.port, limit=1024)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    writer.write(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    try:
        async with client.stream("GET", "/v1/events") as response:
            events = response.aiter_lines()
            # Many events for everyone while the stalled one reads nothing.
            for _ in range(3):
                await switch_and_wait(client, "mistral-7b-v0.1")
                await client.post("/v1/models/unload", params={"model": "mistral-7b-v0.1"})
            seen: list[str] = []
            async with asyncio.timeout(10):
                async for line in events:
                    if line.startswith("event: "):
                        seen.append(line[7:])
                    if seen.count("result") == 6:
                        break
        assert seen.count("result") == 6
    finally:
        writer.close()


# ---- every stream's bytes: `\n` line endings, and ids a shell can cut out ---------------

SSE_LINE = re.compile(rb"^(id: \d+|event: [a-z_]+|data: \{.*\}|retry: 3000|: ping)$")


async def raw_until(response: httpx.Response, until: str, within: float = 30.0) -> bytes:
    """The stream's bytes as sent (after HTTP's chunking), up to the end of the first
    block of event `until`."""
    received = b""
    marker = f"event: {until}\n".encode()

    async def collect() -> bytes:
        nonlocal received
        async for chunk in response.aiter_raw():
            received += chunk
            at = received.find(marker)
            if at >= 0 and b"\n\n" in received[at:]:
                return received[: received.index(b"\n\n", at) + 2]
        raise AssertionError(f"the stream ended before `{until}`: {received!r}")

    return await asyncio.wait_for(collect(), within)


def check_lines(raw: bytes) -> list[str]:
    """Every line of `raw` ends with a bare `\\n` and is a field switchd writes; gives the
    ids, cut out as a shell would (`grep '^id: ' | cut -c5-`)."""
    assert b"\r" not in raw, raw
    assert raw.endswith(b"\n\n"), raw
    lines = [line for line in raw.split(b"\n") if line]
    assert [line for line in lines if not SSE_LINE.match(line)] == [], raw
    return [line[4:].decode() for line in lines if line.startswith(b"id: ")]


async def test_every_stream_is_written_with_bare_newlines_and_its_ids_resume(
    client: httpx.AsyncClient,
) -> None:
    await client.post("/v1/models/unload", params={"model": "mistral-7b-v0.1"})
    params = {"target_model": "mistral-7b-v0.1"}
    async with client.stream("POST", "/v1/models/switch", params=params, headers=SSE) as resp:
        assert resp.headers["content-type"] == "text/event-stream; charset=utf-8"
        live = await raw_until(resp, "result")
    ids = check_lines(live)
    job = json.loads(live.split(b"\ndata: ", 1)[1].split(b"\n", 1)[0])["job"]
    # The job's own stream, resumed with the second id as cut out of the bytes.
    headers = {"Last-Event-ID": ids[1]}
    async with client.stream("GET", f"/v1/switches/{job}/events", headers=headers) as resp:
        assert resp.status_code == 200
        rest = await raw_until(resp, "result")
    assert check_lines(rest) == ids[2:]
    # /v1/events: its snapshot, then a resume from the snapshot's id.
    async with client.stream("GET", "/v1/events") as resp:
        assert resp.headers["content-type"] == "text/event-stream; charset=utf-8"
        snapshot = await raw_until(resp, "snapshot")
    (snapshot_id,) = check_lines(snapshot)
    await client.post("/v1/models/unload", params={"model": "mistral-7b-v0.1"})
    await switch_and_wait(client, "mistral-7b-v0.1")
    headers = {"Last-Event-ID": snapshot_id}
    async with client.stream("GET", "/v1/events", headers=headers) as resp:
        assert resp.status_code == 200
        resumed = await raw_until(resp, "result")
    assert check_lines(resumed)[0] == str(int(snapshot_id) + 1)


async def test_a_last_event_id_with_a_trailing_cr_or_blanks_resumes(
    client: httpx.AsyncClient,
) -> None:
    """An id cut out of a `\\r\\n` stream (another server's, an older switchd's) keeps
    its `\\r`; it is still that id."""
    async with client.stream("GET", "/v1/events") as resp:
        (snapshot_id,) = check_lines(await raw_until(resp, "snapshot"))
    await switch_and_wait(client, "mistral-7b-v0.1")
    for query in (f"last_event_id={snapshot_id}%0D", f"last_event_id={snapshot_id}%20%09"):
        async with client.stream("GET", f"/v1/events?{query}") as resp:
            assert resp.status_code == 200, query
            resumed = await raw_until(resp, "result")
        assert check_lines(resumed)[0] == str(int(snapshot_id) + 1), query
    refused = await client.get("/v1/events", params={"last_event_id": f"{snapshot_id}x"})
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_last_event_id"
