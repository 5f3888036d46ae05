"""The gateway's API over two real switchd hosts, without Ray: a fixed list of
hosts (`switchd gateway --host-url`), the same gateway code Ray's directory feeds."""

from __future__ import annotations

import importlib.util
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from switchd.cli import main
from switchd.cluster.commands import NO_RAY
from tests.cluster.hosts import Gateway, start_gateway, start_hosts, switch
from tests.integration.server import Server

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@dataclass
class Fleet:
    hosts: dict[str, Server]
    gateway: Gateway


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    folder = tmp_path_factory.mktemp("gateway")
    servers = start_hosts(folder, 2)
    gateway = None
    try:
        hosts = dict(zip(("a", "b"), servers, strict=True))
        switch(hosts["a"], "big")
        switch(hosts["b"], "mid")
        switch(hosts["b"], "small")
        urls = [f"--host-url={name}={server.url}" for name, server in hosts.items()]
        gateway = start_gateway(folder, *urls, hosts=2)
        yield Fleet(hosts, gateway)
    finally:
        if gateway is not None:
            gateway.stop()
        for server in servers:
            if server.process is not None and server.process.poll() is None:
                server.stop()


def test_status_names_where_each_model_is(fleet: Fleet) -> None:
    status = httpx.get(f"{fleet.gateway.url}/v1/models/status").json()
    models = status["models"]
    assert {name: (m["status"], m["host"], m["loaded_on"]) for name, m in models.items()} == {
        "big": ("running", "a", ["a"]),
        "mid": ("running", "b", ["b"]),
        "small": ("running", "b", ["b"]),
    }
    assert models["small"]["hosts"]["a"]["status"] == "exited"
    assert {name: h["reachable"] for name, h in status["hosts"].items()} == {"a": True, "b": True}
    assert [d["host"] for d in status["gpu"]["devices"]] == ["a", "b"]
    assert status["gpu"]["total_gb"] == 191.18
    health = httpx.get(f"{fleet.gateway.url}/health").json()
    assert health["hosts"] == {"reachable": 2, "total": 2}
    listed = httpx.get(f"{fleet.gateway.url}/v1/models").json()["data"]
    assert [(m["id"], m["host"]) for m in listed] == [("big", "a"), ("mid", "b"), ("small", "b")]
    one = httpx.get(f"{fleet.gateway.url}/v1/models/s").json()
    assert (one["id"], one["loaded_on"]) == ("small", ["b"])
    missing = httpx.get(f"{fleet.gateway.url}/v1/models/nope")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "model_not_found")


def test_requests_go_to_the_host_that_serves_their_model_alias_included(fleet: Fleet) -> None:
    for model, host in (("big", "a"), ("mid", "b"), ("s", "b")):
        answer = httpx.post(
            f"{fleet.gateway.url}/v1/chat/completions", json={"model": model, **CHAT}, timeout=30
        )
        assert (answer.status_code, answer.headers["x-switchd-host"]) == (200, host)


def test_bad_requests_are_refused_in_the_shapes_of_one_switchd(fleet: Fleet) -> None:
    url = fleet.gateway.url
    unknown = httpx.post(f"{url}/v1/chat/completions", json={"model": "nope", **CHAT})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    missing = httpx.post(f"{url}/v1/chat/completions", json=CHAT)
    assert (missing.status_code, missing.json()["error"]["code"]) == (400, "missing_model")
    escape = httpx.post(f"{url}/v1/%2e%2e/admin", json={"model": "big"})
    assert (escape.status_code, escape.json()["error"]["code"]) == (400, "invalid_path")
    no_host = httpx.post(f"{url}/v1/models/switch", params={"target_model": "big", "host": "z"})
    assert (no_host.status_code, no_host.json()["error"]) == (404, "host_not_found")
    last_id = httpx.get(f"{url}/v1/events", headers={"Last-Event-ID": "x"})
    assert (last_id.status_code, last_id.json()["error"]) == (400, "invalid_last_event_id")


def test_a_switch_with_a_host_goes_there_and_its_job_is_found_through_the_gateway(
    fleet: Fleet,
) -> None:
    url = fleet.gateway.url
    answer = httpx.post(
        f"{url}/v1/models/switch",
        params={"target_model": "small", "host": "a", "wait": "ready"},
        timeout=30,
    )
    # Named, the host is used even where it must unload (a's switchd decides how).
    assert (answer.status_code, answer.headers["x-switchd-host"]) == (200, "a")
    assert answer.json()["unloaded_models"] == ["big"]
    job = answer.json()["job"]
    found = httpx.get(f"{url}/v1/switches/{job}", timeout=10)
    assert (found.status_code, found.headers["x-switchd-host"]) == (200, "a")
    assert found.json()["id"] == job
    # small is now on both hosts: an unload must say which.
    both = httpx.post(f"{url}/v1/models/unload", params={"model": "small"})
    assert both.status_code == 400
    assert (both.json()["error"], both.json()["hosts"]) == ("host_required", ["a", "b"])
    one = httpx.post(f"{url}/v1/models/unload", params={"model": "small", "host": "a"}, timeout=30)
    assert (one.status_code, one.headers["x-switchd-host"]) == (200, "a")


def test_a_dead_host_is_unreachable_within_seconds_and_its_models_go_elsewhere(
    fleet: Fleet,
) -> None:
    url = fleet.gateway.url
    # a is empty now, b holds mid and small: big fits on a only without unloading.
    first = httpx.post(f"{url}/v1/chat/completions", json={"model": "big", **CHAT}, timeout=60)
    assert (first.status_code, first.headers["x-switchd-host"]) == (200, "a")
    process = fleet.hosts["a"].process
    assert process is not None
    os.kill(process.pid, signal.SIGKILL)
    killed = time.monotonic()
    while httpx.get(f"{url}/v1/models/status").json()["hosts"]["a"]["reachable"]:
        assert time.monotonic() - killed < 3, "host a still reachable 3 s after its death"
        time.sleep(0.05)
    # big ran only on a: b loads it (its own scheduler unloads what it must).
    before = len(httpx.get(f"{fleet.hosts['b'].url}/v1/switches").json()["switches"])
    answer = httpx.post(f"{url}/v1/chat/completions", json={"model": "big", **CHAT}, timeout=60)
    assert (answer.status_code, answer.headers["x-switchd-host"]) == (200, "b")
    assert answer.json()["model"] == "big"
    jobs = httpx.get(f"{fleet.hosts['b'].url}/v1/switches").json()["switches"]
    assert len(jobs) == before + 1
    assert (jobs[0]["target"], jobs[0]["cause"]) == ("big", "demand")
    health = httpx.get(f"{url}/health").json()
    assert health["hosts"] == {"reachable": 1, "total": 2}


def test_host_list_arguments_are_checked() -> None:
    assert main(["gateway", "--host-url", "a=not-a-url"]) == 2


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="Ray is installed here")
def test_without_ray_the_commands_say_what_to_install(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gateway", "--address", "auto"]) == 2
    assert main(["agent", "--name", "a", "--url", "http://127.0.0.1:8080"]) == 2
    assert capsys.readouterr().err == NO_RAY + "\n" + NO_RAY + "\n"
