"""A three-host cluster on one machine, on Ray, driven through the gateway.

Run inside a network namespace with only loopback up (tests/cluster/test_ray.py
does), so that nothing Ray or switchd sends leaves the machine:

    unshare --net -- sh -c 'ip link set lo up && exec python -m tests.cluster.scenario DIR'

A Ray head and two worker nodes (`ray.cluster_utils.Cluster`, one CPU each, no
dashboard, a small object store), each node with its own switchd on a simulated
card and its agent pinned to it, and `switchd gateway --address` in front.
Prints one JSON object: what each case saw, for the test to assert on.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import ray
import ray.exceptions
from ray.cluster_utils import Cluster

from switchd.client import SseParser
from switchd.cluster import ray_directory
from tests.cluster.hosts import start_gateway, start_hosts, switch

# Ray's Python API is partly untyped: called through Any here.
RAY: Any = ray
HOSTS = ("gpu0", "gpu1", "gpu2")
HEAD = "gpu2"  # the head node's host; gpu0 (a worker node) is the one that dies
OBJECT_STORE = 75 * 1024 * 1024
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def jobs(url: str) -> int:
    """How many switch and unload jobs a host has run."""
    return len(
        httpx.get(f"{url}/v1/switches", params={"limit": 200}, timeout=10).json()["switches"]
    )


def wait_for(check: Any, within: float, what: str) -> float:
    """Seconds until `check()` is true; fails past `within`."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        try:
            if check():
                return time.monotonic() - start
        except (httpx.HTTPError, KeyError, ValueError, ray.exceptions.RayError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"not within {within} s: {what}")


def host_state(gateway: str, host: str) -> bool:
    status = httpx.get(f"{gateway}/v1/models/status", timeout=5).json()
    return bool(status["hosts"].get(host, {}).get("reachable"))


def chat(gateway: str, model: str) -> tuple[int, str | None, dict[str, Any] | None]:
    answer = httpx.post(f"{gateway}/v1/chat/completions", json={"model": model, **CHAT}, timeout=30)
    body = (
        answer.json()
        if answer.headers.get("content-type", "").startswith("application/json")
        else None
    )
    return answer.status_code, answer.headers.get("x-switchd-host"), body


async def one_stream(http: httpx.AsyncClient, model: str, outcome: dict[str, Any]) -> None:
    """A streamed chat answer: right when it ends with [DONE], its chunks name `model`
    and carry text; else the error it ended with (code), or the client's exception."""
    body = {"model": model, **CHAT, "stream": True, "max_tokens": 40, "ignore_eos": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as answer:
        outcome.update(status=answer.status_code, host=answer.headers.get("x-switchd-host"))
        if answer.status_code != 200:
            outcome["code"] = json.loads(await answer.aread())["error"]["code"]
            return
        text, models, done = "", set(), False
        async for line in answer.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                outcome["code"] = chunk["error"]["code"]
                return
            models.add(chunk["model"])
            text += chunk["choices"][0]["delta"].get("content") or ""
        outcome["right"] = done and models == {model} and text != ""
        if not done:
            outcome["code"] = "ended_without_done"


async def one_answer(http: httpx.AsyncClient, model: str, outcome: dict[str, Any]) -> None:
    answer = await http.post("/v1/chat/completions", json={"model": model, **CHAT})
    outcome.update(status=answer.status_code, host=answer.headers.get("x-switchd-host"))
    data = answer.json()
    if answer.status_code == 200:
        text = data["choices"][0]["message"]["content"]
        outcome["right"] = data["model"] == model and isinstance(text, str) and text != ""
    else:
        outcome["code"] = data["error"]["code"]


async def traffic(gateway: str, model: str, seconds: float, workers: int) -> list[dict[str, Any]]:
    """Requests for `model`, `workers` at a time (half of them streamed, 40 tokens at 200
    a second), for `seconds`: each one's outcome."""
    outcomes: list[dict[str, Any]] = []
    stop = time.monotonic() + seconds

    async def worker(http: httpx.AsyncClient, streamed: bool) -> None:
        while time.monotonic() < stop:
            outcome: dict[str, Any] = {"sent": time.monotonic(), "stream": streamed}
            try:
                if streamed:
                    await one_stream(http, model, outcome)
                else:
                    await one_answer(http, model, outcome)
                    await asyncio.sleep(0.05)
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                outcome.update(error=type(exc).__name__)
            outcomes.append(outcome)

    async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
        await asyncio.gather(*(worker(http, i % 2 == 0) for i in range(workers)))
    return outcomes


def collect_events(
    gateway: str, until: Any, within: float, last_id: str | None = None
) -> list[dict[str, Any]]:
    """Events of the gateway's stream (name, id, data) until `until(event)` is true."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + within
    with httpx.stream("GET", f"{gateway}/v1/events", headers=headers, timeout=within) as answer:
        parser = SseParser()
        for line in answer.iter_lines():
            event = parser.feed(line)
            if event is None:
                continue
            seen.append({"name": event.name, "id": event.id, "data": event.data})
            if until(seen[-1]) or time.monotonic() > deadline:
                break
    return seen


def main(folder: Path) -> dict[str, Any]:
    report: dict[str, Any] = {}
    node_args: dict[str, Any] = {
        "num_cpus": 1,
        "object_store_memory": OBJECT_STORE,
        "node_ip_address": "127.0.0.1",
    }
    started = time.monotonic()
    cluster: Any = Cluster(
        initialize_head=True,
        head_node_args={**node_args, "include_dashboard": False, "resources": {HEAD: 1}},
    )
    hosts = []
    gateways = []
    try:
        nodes: dict[str, Any] = {HEAD: cluster.head_node}
        for name in HOSTS:
            if name == HEAD:
                continue
            nodes[name] = cluster.add_node(**node_args, resources={name: 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=ray_directory.NAMESPACE, log_to_driver=False)
        report["cluster_up_seconds"] = round(time.monotonic() - started, 1)
        report["node_ips"] = sorted({n["NodeManagerAddress"] for n in RAY.nodes()})
        servers = start_hosts(folder, len(HOSTS))
        hosts.extend(servers)
        by_name = dict(zip(HOSTS, servers, strict=True))
        for name in HOSTS:
            ray_directory.start_agent(name, by_name[name].url, node=nodes[name].node_id)
        agents = {
            name: RAY.get(ray.get_actor(ray_directory.PREFIX + name).snapshot.remote())["node"]
            for name in HOSTS
        }
        report["agents_on_their_nodes"] = all(agents[n] == nodes[n].node_id for n in HOSTS)
        report["distinct_agent_nodes"] = len(set(agents.values()))
        # gpu0 and gpu2 hold big (80 GB), gpu1 holds mid (40 GB): small (24) fits only
        # on gpu1 without unloading.
        switch(by_name["gpu0"], "big")
        switch(by_name["gpu1"], "mid")
        switch(by_name["gpu2"], "big")
        gateway = start_gateway(folder, "--address", cluster.address, hosts=3)
        gateways.append(gateway)
        url = gateway.url

        # Routing: requests for a loaded model go where it runs; nothing switches.
        before = {n: jobs(by_name[n].url) for n in HOSTS}
        routed = [chat(url, "mid")[:2] for _ in range(5)]
        routed += [chat(url, "big")[:2] for _ in range(5)]
        after = {n: jobs(by_name[n].url) for n in HOSTS}
        report["routing"] = {
            "mid_hosts": sorted({h for s, h in routed[:5] if s == 200}),
            "big_hosts": sorted({h for s, h in routed[5:] if s == 200}),
            "statuses": sorted({s for s, _ in routed}),
            "new_jobs": {n: after[n] - before[n] for n in HOSTS},
        }

        # Placement, watched on the merged event stream: small fits on gpu1 beside mid.
        opening = collect_events(url, lambda e: True, 10)
        start_id = opening[0]["id"]
        status, host, _ = chat(url, "small")
        events = collect_events(
            url,
            lambda e: e["name"] == "ready" and e["data"].get("model") == "small",
            20,
            last_id=start_id,
        )
        stages = [e for e in events if e["data"].get("job")]
        report["placement"] = {
            "status": status,
            "host": host,
            "unloaded": [e["data"].get("victim") for e in stages if e["name"] == "unloaded"],
            "stage_hosts": sorted({e["data"]["host"] for e in stages}),
            "stages": [e["name"] for e in stages],
        }
        ids = [int(e["id"]) for e in events]
        middle = events[len(events) // 2]
        resumed = collect_events(url, lambda e: e["id"] == events[-1]["id"], 10, middle["id"])
        report["events"] = {
            "opening": opening[0]["name"],
            "every_event_has_host": all("host" in e["data"] for e in events),
            "ids_increasing": ids == sorted(ids) and len(set(ids)) == len(ids),
            "data_ids_match": all(str(e["data"]["id"]) == e["id"] for e in events),
            "resumed_ids": [e["id"] for e in resumed]
            == [e["id"] for e in events[len(events) // 2 + 1 :]],
            "stale_resume": collect_events(url, lambda e: e["name"] == "snapshot", 10, "5")[0][
                "name"
            ],
        }

        # Ray restarts a dead agent; a restarted gateway finds every host again.
        def agent_pid() -> int:
            handle = ray.get_actor(ray_directory.PREFIX + "gpu1")
            return int(RAY.get(handle.snapshot.remote(), timeout=2)["agent_pid"])

        first_pid = agent_pid()
        os.kill(first_pid, signal.SIGKILL)
        report["agent_restarted_seconds"] = round(
            wait_for(lambda: agent_pid() != first_pid, 30, "the agent restarted by Ray"), 2
        )
        gateway.stop()
        restarted_at = time.monotonic()
        gateway = start_gateway(folder, "--address", cluster.address, hosts=3)
        gateways.append(gateway)
        url = gateway.url
        report["gateway_restart_found_hosts_seconds"] = round(time.monotonic() - restarted_at, 1)

        # A host dies mid-traffic (its switchd killed, its node removed): requests for
        # big, held by gpu0 and gpu2, go to gpu2; none is answered wrong.
        dying = by_name["gpu0"]
        dying_pid = dying.process.pid if dying.process is not None else 0
        seen: dict[str, float] = {}

        async def kill_midway() -> list[dict[str, Any]]:
            run = asyncio.create_task(traffic(url, "big", 6.0, 4))
            await asyncio.sleep(2.0)
            seen["killed"] = time.monotonic()
            os.kill(dying_pid, signal.SIGKILL)
            await asyncio.to_thread(cluster.remove_node, nodes["gpu0"], True)
            seen["detected"] = seen["killed"] + await asyncio.to_thread(
                wait_for, lambda: not host_state(url, "gpu0"), 10, "gpu0 unreachable"
            )
            return await run

        outcomes = asyncio.run(kill_midway())
        killed = seen["killed"]
        report["kill_detect_seconds"] = round(seen["detected"] - killed, 2)
        after_kill = [o for o in outcomes if o["sent"] > seen["detected"]]
        report["kill"] = {
            "requests": len(outcomes),
            "outcomes": dict(
                Counter(
                    f"{o.get('status')}:{o.get('code') or o.get('error') or ''}" for o in outcomes
                )
            ),
            # Answered as if whole, yet wrong: a 200 without an error that is not right.
            "wrong": sum(
                1
                for o in outcomes
                if o.get("status") == 200 and not o.get("right") and not o.get("code")
            ),
            "in_flight_at_kill": sorted(
                f"{o.get('status')}:{o.get('code') or o.get('error')}:stream={o['stream']}"
                for o in outcomes
                if not o.get("right")
            ),
            "hosts_before": sorted({str(o.get("host")) for o in outcomes if o["sent"] < killed}),
            "after_detected": dict(
                Counter(f"{o.get('status')}@{o.get('host')}" for o in after_kill)
            ),
        }

        # It comes back: a new node, its switchd again, its agent again.
        nodes["gpu0"] = cluster.add_node(**node_args, resources={"gpu0": 1})
        cluster.wait_for_nodes()
        dying.start()
        ray_directory.start_agent("gpu0", dying.url, node=nodes["gpu0"].node_id)
        report["back_seconds"] = round(
            wait_for(lambda: host_state(url, "gpu0"), 15, "gpu0 back"), 2
        )
        answer = httpx.post(
            f"{url}/v1/models/switch",
            params={"target_model": "small", "host": "gpu0", "wait": "ready"},
            timeout=30,
        )
        report["back_switch"] = {
            "status": answer.status_code,
            "host": answer.headers.get("x-switchd-host"),
            "body": answer.text[:300],
        }
        report["total_seconds"] = round(time.monotonic() - started, 1)
        return report
    finally:
        for gateway in gateways:
            gateway.stop()
        for server in hosts:
            if server.process is not None and server.process.poll() is None:
                server.stop()
        RAY.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    out = main(Path(sys.argv[1]))
    print("SCENARIO " + json.dumps(out))
