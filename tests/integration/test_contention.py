"""Several clients wanting models that do not fit together: a real switchd, real engines.

Every test here has many clients at once; the policy's figures are small
(residency 1 s, hold 2 s) so that a batch turns over in seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from switchd.client import SseParser
from tests.integration.conftest import ServerFactory
from tests.integration.server import engine_cmd, seed_models
from tests.integration.test_proxy import CHAT, chat, metric

BIG, SMALL = "gpt-oss-120b", "gpt-oss-20b"  # 80 + 24 GB: never both on the 95.59 GB card
POLICY = {"min_residency_seconds": 1, "max_hold_seconds": 2}


@dataclass
class Served:
    """What each user got: (model, status) per request."""

    outcomes: list[tuple[str, int]] = field(default_factory=list)

    def by_model(self) -> Counter[str]:
        return Counter(model for model, status in self.outcomes if status == 200)

    def statuses(self) -> Counter[int]:
        return Counter(status for _, status in self.outcomes)


async def user(http: httpx.AsyncClient, model: str, until: float, served: Served) -> None:
    """One person or script: a request, its answer, the next request, until `until`."""
    n = 0
    while time.monotonic() < until:
        n += 1
        response = await http.post(CHAT, json=chat(model, f"{model} {n}", max_tokens=8))
        served.outcomes.append((model, response.status_code))
        if response.status_code == 200:
            assert response.json()["model"] == model


async def model_state(http: httpx.AsyncClient, model: str) -> str:
    state: str = (await http.get("/v1/models/status")).json()["models"][model]["status"]
    return state


async def jobs(http: httpx.AsyncClient, **labels: str) -> float:
    return metric((await http.get("/metrics")).text, "switchd_jobs_total", **labels) or 0.0


class EventLog:
    """Every event of /v1/events while the test runs."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    async def follow(self, http: httpx.AsyncClient) -> None:
        parser = SseParser()
        async with http.stream("GET", "/v1/events") as response:
            async for line in response.aiter_lines():
                event = parser.feed(line)
                if event is not None and event.name != "snapshot":
                    self.events.append((event.name, event.data))

    def victims(self) -> list[str]:
        return [data["victim"] for name, data in self.events if name == "unload"]


async def test_a_cold_burst_for_two_models_that_do_not_fit_answers_every_request(
    make_server: ServerFactory,
) -> None:
    server = make_server(seed_models(0.5), **POLICY)
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        wanted = [model for _ in range(5) for model in (BIG, SMALL)]
        responses = await asyncio.gather(
            *(http.post(CHAT, json=chat(m, f"{m} {i}")) for i, m in enumerate(wanted))
        )
        assert [r.status_code for r in responses] == [200] * 10, [r.text for r in responses]
        assert [r.json()["model"] for r in responses] == wanted
        # One load per model, in batches: not a load per request, and no swapping back.
        assert await jobs(http, kind="switch", cause="demand", result="success") == 2.0
        status = (await http.get("/v1/models/status")).json()
        assert status["waiting"] == 0
        assert all(m["waiting"] == 0 for m in status["models"].values())


async def test_sustained_contention_serves_everyone_in_batches(
    make_server: ServerFactory,
) -> None:
    server = make_server(seed_models(0.5), **POLICY)
    served = Served()
    seconds = 30.0
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        until = time.monotonic() + seconds
        await asyncio.gather(
            *(user(http, BIG if i % 2 else SMALL, until, served) for i in range(8))
        )
        switches = await jobs(http, kind="switch", cause="demand", result="success")
    assert served.statuses() == {200: len(served.outcomes)}, served.statuses()
    share = served.by_model()
    total = sum(share.values())
    assert min(share[BIG], share[SMALL]) >= 0.2 * total, share
    # Batches, not a switch per request: at most one switch per hold (2 s) with room
    # for the loads themselves, and at least one turn for each model.
    assert 2 <= switches <= seconds / POLICY["max_hold_seconds"] + 2, switches
    assert total >= 10 * switches, (total, switches)


async def test_a_model_that_fits_beside_either_keeps_serving_while_the_others_alternate(
    make_server: ServerFactory,
) -> None:
    models = {
        "a": {"cmd": engine_cmd(0.5), "size_gb": 70},
        "b": {"cmd": engine_cmd(0.5), "size_gb": 40},  # a + b = 110: never together
        "c": {"cmd": engine_cmd(0.5), "size_gb": 20},  # fits beside a (90) or b (60)
    }
    server = make_server(models, **POLICY)
    served = Served()
    log = EventLog()
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        follower = asyncio.create_task(log.follow(http))
        until = time.monotonic() + 10
        await asyncio.gather(*(user(http, m, until, served) for m in "abcabc"))
        assert not follower.done(), follower  # still following: it saw every event
        follower.cancel()
        status = (await http.get("/v1/models/status")).json()
    assert served.statuses() == {200: len(served.outcomes)}, served.statuses()
    assert min(served.by_model()[m] for m in "abc") > 0
    assert "c" not in log.victims(), "c never had to make room"
    assert set(log.victims()) <= {"a", "b"}
    assert len(log.victims()) >= 1
    assert status["models"]["c"]["status"] == "running"


async def test_an_explicit_switch_while_demand_waits_drains_and_everyone_is_served(
    make_server: ServerFactory,
) -> None:
    server = make_server(seed_models(0.5), min_residency_seconds=1, max_hold_seconds=30)
    served = Served()
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        until = time.monotonic() + 6
        big_users = [asyncio.create_task(user(http, BIG, until, served)) for _ in range(2)]
        while (await model_state(http, BIG)) != "running":  # noqa: ASYNC110 - another process
            await asyncio.sleep(0.05)
        # The small model's requests wait: the big one is busy and within its hold.
        small = [asyncio.create_task(http.post(CHAT, json=chat(SMALL))) for _ in range(3)]
        async with asyncio.timeout(10):
            while (await http.get("/v1/models/status")).json()["models"][SMALL]["waiting"] < 3:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        status = (await http.get("/v1/models/status")).json()
        assert status["models"][SMALL]["waiting"] == 3, "still waiting: the big one holds"
        assert status["models"][SMALL]["oldest_wait_seconds"] >= 0.4
        # The operator switches to a third model: the big one is drained, not cut.
        switched = await http.post(
            "/v1/models/switch", params={"target_model": "deepseek-coder-33b-instruct"}
        )
        assert switched.status_code == 200, switched.text
        assert switched.json()["unloaded_models"] == [BIG]
        # deepseek (40) + the small model (24) fit: its waiters load it at once.
        answers = await asyncio.gather(*small)
        await asyncio.gather(*big_users)
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert served.statuses() == {200: len(served.outcomes)}, served.statuses()


async def test_a_model_that_fails_to_load_cools_down_instead_of_restarting_per_request(
    make_server: ServerFactory,
) -> None:
    models = {
        "broken": {"cmd": engine_cmd(5, "--fail-after 0.3"), "size_gb": 10},
        "fine": {"cmd": engine_cmd(0.3), "size_gb": 10},
    }
    server = make_server(models, load_failure_cooldown_seconds=3)
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        first = await asyncio.gather(*(http.post(CHAT, json=chat("broken")) for _ in range(3)))
        for response in first:
            assert response.status_code == 503
            assert response.headers["retry-after"] == "3"
            error = response.json()["error"]
            assert error["code"] == "load_failed"
            assert error["type"] == "server_error"
            assert "broken exited with code" in error["message"]
        # Within the cooldown: refused at once, nothing restarted.
        again = await http.post(CHAT, json=chat("broken"))
        assert again.status_code == 503
        assert again.json()["error"]["code"] == "load_failed"
        assert "1 time(s) in a row" in again.json()["error"]["message"]
        model = (await http.get("/v1/models/status")).json()["models"]["broken"]
        assert model["failures"] == 1
        assert model["cooldown_until"] is not None
        assert await jobs(http, kind="switch", cause="demand", result="engine_failed") == 1.0
        # Other models are not affected.
        assert (await http.post(CHAT, json=chat("fine"))).status_code == 200
        # After the cooldown one request tries again; a second failure doubles it.
        model = (await http.get("/v1/models/status")).json()["models"]["broken"]
        left = datetime.fromisoformat(model["cooldown_until"]) - datetime.now(UTC)
        await asyncio.sleep(left.total_seconds() + 0.1)
        retried = await http.post(CHAT, json=chat("broken"))
        assert retried.status_code == 503
        assert retried.headers["retry-after"] == "6"
        model = (await http.get("/v1/models/status")).json()["models"]["broken"]
        assert model["failures"] == 2
        # An operator's switch clears the cooldown and tries at once.
        switched = await http.post(
            "/v1/models/switch", params={"target_model": "broken", "wait": "ready"}
        )
        assert switched.status_code == 502
        assert await jobs(http, kind="switch", cause="explicit", result="engine_failed") == 1.0
