"""Standby tiers: which victims sleep and which stop, the engines' sleep and wake calls,
and the host-RAM budget for level-1 sleeps."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from switchd.config import ModelSpec, Tier
from switchd.standby import (
    DEFAULT_WAKE_SECONDS,
    EngineStandby,
    PutAway,
    StandbyFailed,
    Victim,
    choose,
    host_ram_budget_gb,
    label,
)

URL = "http://engine:8000"


def victim(
    name: str = "a",
    *,
    tiers: tuple[Tier, ...] = (Tier.SLEEP1, Tier.SLEEP2),
    held: Mapping[int, float] | None = None,
    residue: float | None = 2.0,
    wake: Mapping[Tier, float] | None = None,
    load: float = 30.0,
    weights: float = 38.0,
) -> Victim:
    return Victim(
        name,
        tiers,
        dict(held) if held is not None else {0: 40.0},
        residue,
        dict(wake) if wake is not None else {Tier.SLEEP1: 0.5, Tier.SLEEP2: 2.0},
        load,
        weights,
    )


# --- choose: one victim ------------------------------------------------------------------


def test_level_1_while_the_host_ram_budget_has_room_for_the_weights() -> None:
    assert choose([victim()], {0: 30.0}, 100.0) == [
        PutAway(
            "a",
            Tier.SLEEP1,
            "sleeping a (level 1): wakes in ~0.5 s instead of a 30 s load",
            0.5,
            38.0,
        )
    ]


def test_the_weights_exactly_filling_the_budget_still_sleep_at_level_1() -> None:
    [choice] = choose([victim()], {0: 30.0}, 38.0)
    assert (choice.tier, choice.host_ram_gb) == (Tier.SLEEP1, 38.0)


def test_level_2_when_level_1_would_overrun_the_budget() -> None:
    assert choose([victim()], {0: 30.0}, 10.0) == [
        PutAway(
            "a",
            Tier.SLEEP2,
            "sleeping a (level 2): wakes in ~2 s instead of a 30 s load; level 1 would need "
            "38.00 GB of host RAM, over budget",
            2.0,
            0.0,
        )
    ]


def test_level_1_only_and_no_budget_left_is_stopped() -> None:
    assert choose([victim(tiers=(Tier.SLEEP1,))], {0: 30.0}, 10.0) == [
        PutAway(
            "a",
            None,
            "stopping a: a level-1 sleep would hold 38.00 GB of host RAM, 10.00 GB of the "
            "standby budget is left",
        )
    ]


def test_an_overdrawn_budget_is_shown_as_none_left() -> None:
    [choice] = choose([victim(tiers=(Tier.SLEEP1,))], {0: 30.0}, -5.0)
    assert choice == PutAway(
        "a",
        None,
        "stopping a: a level-1 sleep would hold 38.00 GB of host RAM, 0.00 GB of the standby "
        "budget is left",
    )


def test_a_stop_only_victim_is_stopped() -> None:
    assert choose([victim(tiers=())], {0: 30.0}, 100.0) == [PutAway("a", None, "stopping a")]


def test_a_wake_no_faster_than_a_load_is_not_worth_the_residue() -> None:
    slow = victim(tiers=(Tier.SLEEP2,), wake={Tier.SLEEP2: 30.0}, load=30.0)
    assert choose([slow], {0: 30.0}, 100.0) == [
        PutAway("a", None, "stopping a: waking (30 s) is no faster than loading (30 s)")
    ]
    slower = victim(tiers=(Tier.SLEEP2,), wake={Tier.SLEEP2: 45.5}, load=30.0)
    [choice] = choose([slower], {0: 30.0}, 100.0)
    assert choice.reason == "stopping a: waking (45.5 s) is no faster than loading (30 s)"


def test_the_fastest_wake_wins_among_the_allowed_tiers() -> None:
    # Learned: this engine wakes faster from level 2 than from level 1.
    quick_two = victim(wake={Tier.SLEEP1: 3.0, Tier.SLEEP2: 1.5})
    [choice] = choose([quick_two], {0: 30.0}, 100.0)
    assert (choice.tier, choice.wake_seconds, choice.host_ram_gb) == (Tier.SLEEP2, 1.5, 0.0)
    assert choice.reason.startswith("sleeping a (level 2): wakes in ~1.5 s instead of a 30 s load")


def test_a_faster_level_2_is_not_blamed_on_the_budget() -> None:
    quick_two = victim(wake={Tier.SLEEP1: 3.0, Tier.SLEEP2: 1.5})
    [choice] = choose([quick_two], {0: 30.0}, 100.0)
    assert choice.reason == "sleeping a (level 2): wakes in ~1.5 s instead of a 30 s load"


def test_equal_wakes_keep_the_configured_order() -> None:
    even = victim(wake={Tier.SLEEP1: 2.0, Tier.SLEEP2: 2.0})
    [choice] = choose([even], {0: 30.0}, 100.0)
    assert (choice.tier, choice.host_ram_gb) == (Tier.SLEEP1, 38.0)


def test_a_release_sleep_keeps_no_host_ram() -> None:
    sglang = victim(tiers=(Tier.RELEASE,), wake={Tier.RELEASE: 3.0})
    assert choose([sglang], {0: 30.0}, 0.0) == [
        PutAway(
            "a",
            Tier.RELEASE,
            "sleeping a (released): wakes in ~3 s instead of a 30 s load",
            3.0,
            0.0,
        )
    ]


def test_no_victims_no_choices() -> None:
    assert choose([], {0: 10.0}, 100.0) == []


# --- choose: the budget over several victims ------------------------------------------------


def test_the_budget_is_spent_in_the_plans_order() -> None:
    first = victim("a", weights=30.0)
    second = victim("b", weights=30.0)
    assert choose([first, second], {0: 50.0}, 50.0) == [
        PutAway(
            "a",
            Tier.SLEEP1,
            "sleeping a (level 1): wakes in ~0.5 s instead of a 30 s load",
            0.5,
            30.0,
        ),
        PutAway(
            "b",
            Tier.SLEEP2,
            "sleeping b (level 2): wakes in ~2 s instead of a 30 s load; level 1 would need "
            "30.00 GB of host RAM, over budget",
            2.0,
            0.0,
        ),
    ]


def test_what_is_left_of_the_budget_is_named_for_a_later_victim() -> None:
    first = victim("a", weights=30.0)
    second = victim("b", tiers=(Tier.SLEEP1,), weights=30.0)
    [_, choice] = choose([first, second], {0: 50.0}, 50.0)
    assert choice == PutAway(
        "b",
        None,
        "stopping b: a level-1 sleep would hold 30.00 GB of host RAM, 20.00 GB of the standby "
        "budget is left",
    )


def test_a_stopped_victim_spends_none_of_the_budget() -> None:
    stopped = victim("a", tiers=(), weights=30.0)
    second = victim("b", weights=30.0)
    [_, choice] = choose([stopped, second], {0: 50.0}, 30.0)
    assert (choice.tier, choice.host_ram_gb) == (Tier.SLEEP1, 30.0)


def test_a_level_1_sleeper_stopped_after_all_gives_its_budget_to_a_later_one() -> None:
    # A budget for one level-1 sleep: `a` has it, `b` sleeps at level 2. Asleep they
    # keep 4 + 1 GB, 37 are short and 35 would come back: `a` keeps the most, and is
    # stopped; its 30 GB of host RAM now let `b` sleep at level 1.
    first = victim("a", held={0: 20.0}, residue=4.0, weights=30.0)
    second = victim("b", held={0: 20.0}, residue=1.0, weights=30.0)
    assert choose([first, second], {0: 37.0}, 30.0) == [
        PutAway("a", None, "stopping a: asleep it would keep 4.00 GB where memory is short"),
        PutAway(
            "b",
            Tier.SLEEP1,
            "sleeping b (level 1): wakes in ~0.5 s instead of a 30 s load",
            0.5,
            30.0,
        ),
    ]


# --- choose: the residue against what is short ------------------------------------------------


def sleep2(name: str, held: Mapping[int, float], residue: float | None) -> Victim:
    return victim(name, tiers=(Tier.SLEEP2,), held=held, residue=residue, wake={Tier.SLEEP2: 2.0})


def sleeping(name: str) -> PutAway:
    return PutAway(
        name, Tier.SLEEP2, f"sleeping {name} (level 2): wakes in ~2 s instead of a 30 s load", 2.0
    )


def test_the_sleeper_keeping_the_most_residue_is_stopped_while_memory_is_short() -> None:
    victims = [
        sleep2("a", {0: 20.0}, 4.0),
        sleep2("b", {0: 20.0}, 1.0),
        sleep2("c", {0: 20.0}, 2.0),
    ]
    # All asleep: 16 + 19 + 18 = 53 GB freed, 55 short; stopping `a` frees 57.
    assert choose(victims, {0: 55.0}, 100.0) == [
        PutAway("a", None, "stopping a: asleep it would keep 4.00 GB where memory is short"),
        sleeping("b"),
        sleeping("c"),
    ]


def test_sleepers_whose_residue_leaves_enough_all_sleep() -> None:
    victims = [sleep2("a", {0: 20.0}, 4.0), sleep2("b", {0: 20.0}, 1.0)]
    assert choose(victims, {0: 35.0}, 100.0) == [sleeping("a"), sleeping("b")]


def test_sleepers_are_stopped_one_by_one_until_none_is_left() -> None:
    victims = [sleep2("a", {0: 10.0}, 1.0), sleep2("b", {0: 10.0}, 2.0)]
    # Even stopping both (20 GB) leaves it short: both are stopped, the larger residue first.
    assert choose(victims, {0: 30.0}, 100.0) == [
        PutAway("a", None, "stopping a: asleep it would keep 1.00 GB where memory is short"),
        PutAway("b", None, "stopping b: asleep it would keep 2.00 GB where memory is short"),
    ]


def test_equal_residues_stop_the_last_name_first() -> None:
    victims = [sleep2("a", {0: 20.0}, 2.0), sleep2("b", {0: 20.0}, 2.0)]
    assert choose(victims, {0: 37.0}, 100.0) == [
        sleeping("a"),
        PutAway("b", None, "stopping b: asleep it would keep 2.00 GB where memory is short"),
    ]


def test_an_unknown_residue_counts_as_none_and_the_sleep_is_tried() -> None:
    assert choose([sleep2("a", {0: 20.0}, None)], {0: 20.0}, 100.0) == [sleeping("a")]
    # A known residue, however small, is counted.
    assert choose([sleep2("a", {0: 20.0}, 0.5)], {0: 20.0}, 100.0) == [
        PutAway("a", None, "stopping a: asleep it would keep 0.50 GB where memory is short")
    ]


def test_a_residue_is_never_more_than_what_the_victim_holds() -> None:
    # 3 GB of residue over a victim holding 1 GB: a sleep that frees nothing, stopped.
    victims = [sleep2("a", {0: 1.0}, 3.0), sleep2("b", {0: 30.0}, 0.0)]
    assert choose(victims, {0: 30.5}, 100.0) == [
        PutAway(
            "a", None, "stopping a: asleep it kept 3.00 of 1.00 GB last time; a stop frees it all"
        ),
        sleeping("b"),
    ]
    # Split over two devices, 4 GB of residue is 2 on each: device 0 holds only 1 of them.
    victims = [sleep2("a", {0: 1.0, 1: 30.0}, 4.0), sleep2("b", {0: 30.0}, 0.0)]
    assert choose(victims, {0: 30.5}, 100.0) == [
        PutAway("a", None, "stopping a: asleep it would keep 1.00 GB where memory is short"),
        sleeping("b"),
    ]


def test_a_tier_that_keeps_over_half_of_the_footprint_loses_to_a_stop() -> None:
    # A pooling model keeps ~85% asleep: stopped, even with room to spare.
    assert choose([sleep2("a", {0: 20.0}, 17.0)], {0: 1.0}, 100.0) == [
        PutAway(
            "a", None, "stopping a: asleep it kept 17.00 of 20.00 GB last time; a stop frees it all"
        )
    ]
    # Exactly half is still worth a sleep, when the rest covers what is short.
    assert choose([sleep2("a", {0: 20.0}, 10.0)], {0: 5.0}, 100.0) == [sleeping("a")]


def test_only_the_residue_on_the_short_devices_counts() -> None:
    # `a` spans devices 0 and 1 (6 GB of residue: 3 on each), `b` only device 1 (4 GB).
    # Device 0 has room already; device 1 frees 7 + 6 = 13 of the 14 short with both asleep.
    # There `b` keeps more than `a` (4 against 3), though `a` keeps more in all.
    victims = [sleep2("a", {0: 10.0, 1: 10.0}, 6.0), sleep2("b", {1: 10.0}, 4.0)]
    assert choose(victims, {0: -3.0, 1: 14.0}, 100.0) == [
        sleeping("a"),
        PutAway("b", None, "stopping b: asleep it would keep 4.00 GB where memory is short"),
    ]


def test_a_multi_device_sleeper_is_charged_its_residue_on_the_short_device_only() -> None:
    victims = [sleep2("a", {0: 10.0, 1: 10.0}, 4.0), sleep2("b", {1: 10.0}, 1.0)]
    # Short only on device 1: 8 + 9 = 17 of 18 with both asleep; `a` keeps 2 there.
    assert choose(victims, {0: 5.0, 1: 18.0}, 100.0) == [
        PutAway("a", None, "stopping a: asleep it would keep 2.00 GB where memory is short"),
        sleeping("b"),
    ]


def test_a_level_1_sleeper_converted_to_a_stop_is_charged_no_host_ram() -> None:
    victims = [victim("a", held={0: 20.0}, residue=4.0, weights=18.0)]
    assert choose(victims, {0: 20.0}, 100.0) == [
        PutAway("a", None, "stopping a: asleep it would keep 4.00 GB where memory is short")
    ]


# --- the engines' calls ----------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    query: str
    body: Any
    headers: httpx.Headers
    timeout: Mapping[str, float | None]


@dataclass
class FakeEngine:
    """Answers every request with `answer` (or raises `error`), recording each."""

    answer: Callable[[httpx.Request], httpx.Response] = field(
        default=lambda request: httpx.Response(200, json={})
    )
    error: Exception | None = None
    seen: list[Seen] = field(default_factory=list)

    def handle(self, request: httpx.Request) -> httpx.Response:
        content = request.content
        self.seen.append(
            Seen(
                request.method,
                request.url.path,
                request.url.query.decode(),
                json.loads(content) if content else None,
                request.headers,
                request.extensions["timeout"],
            )
        )
        if self.error is not None:
            raise self.error
        return self.answer(request)

    @property
    def calls(self) -> list[tuple[str, str, str, Any]]:
        return [(s.method, s.path, s.query, s.body) for s in self.seen]


CALL_SECONDS = 30.0  # engine_call_timeout_seconds


@asynccontextmanager
async def standby_for(engine: FakeEngine) -> AsyncIterator[EngineStandby]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(engine.handle)) as http:
        yield EngineStandby(http, CALL_SECONDS)


def spec(**extra: Any) -> ModelSpec:
    return ModelSpec(name="m", size_gb=10.0, standby=(Tier.SLEEP1, Tier.SLEEP2), **extra)


@pytest.mark.parametrize(
    ("tier", "query"),
    [(Tier.SLEEP1, "level=1&mode=wait"), (Tier.SLEEP2, "level=2&mode=wait")],
)
async def test_vllm_sleep_levels_always_wait_for_requests_in_flight(tier: Tier, query: str) -> None:
    engine = FakeEngine()
    async with standby_for(engine) as standby:
        await standby.sleep(spec(), URL, tier)
    assert engine.calls == [("POST", "/sleep", query, None)]
    assert engine.seen[0].timeout["read"] == CALL_SECONDS


@pytest.mark.parametrize(
    ("answer", "expected"),
    [(httpx.Response(200, json={}), True), (httpx.Response(503, json={}), False)],
)
async def test_after_a_sleep_the_health_path_is_asked(
    answer: httpx.Response, expected: bool
) -> None:
    engine = FakeEngine(lambda request: answer)
    async with standby_for(engine) as standby:
        assert await standby.answers_health(spec(health_path="/ping"), URL) is expected
    assert engine.calls == [("GET", "/ping", "", None)]


async def test_an_engine_gone_after_its_sleep_does_not_answer_health() -> None:
    engine = FakeEngine(error=httpx.ConnectError("refused"))
    async with standby_for(engine) as standby:
        assert await standby.answers_health(spec(), URL) is False


async def test_vllm_wake_from_level_1() -> None:
    engine = FakeEngine()
    async with standby_for(engine) as standby:
        await standby.wake(spec(), URL, Tier.SLEEP1, within_seconds=7.5)
    assert engine.calls == [("POST", "/wake_up", "", None)]
    assert engine.seen[0].timeout["read"] == 7.5


async def test_vllm_wake_from_level_2_reloads_the_weights_before_the_cache() -> None:
    engine = FakeEngine()
    async with standby_for(engine) as standby:
        await standby.wake(spec(), URL, Tier.SLEEP2, within_seconds=12.0)
    assert engine.calls == [
        ("POST", "/wake_up", "tags=weights", None),
        ("POST", "/collective_rpc", "", {"method": "reload_weights"}),
        ("POST", "/wake_up", "tags=kv_cache", None),
    ]
    assert [s.timeout["read"] for s in engine.seen] == [12.0, 12.0, 12.0]


async def test_a_failed_step_of_a_level_2_wake_stops_the_sequence() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        failing = request.url.path == "/collective_rpc"
        return httpx.Response(500 if failing else 200, text="reload failed" if failing else "")

    engine = FakeEngine(answer)
    async with standby_for(engine) as standby:
        with pytest.raises(StandbyFailed) as caught:
            await standby.wake(spec(), URL, Tier.SLEEP2, within_seconds=12.0)
    assert str(caught.value) == "POST /collective_rpc answered 500: reload failed"
    assert [s.path for s in engine.seen] == ["/wake_up", "/collective_rpc"]


async def test_sglang_release_and_resume() -> None:
    engine = FakeEngine()
    sglang = ModelSpec(name="m", size_gb=10.0, standby=(Tier.RELEASE,))
    async with standby_for(engine) as standby:
        await standby.sleep(sglang, URL, Tier.RELEASE)
        await standby.wake(sglang, URL, Tier.RELEASE, within_seconds=9.0)
    assert engine.calls == [
        ("POST", "/release_memory_occupation", "", {}),
        ("POST", "/resume_memory_occupation", "", {}),
    ]
    assert [s.timeout["read"] for s in engine.seen] == [CALL_SECONDS, 9.0]


@pytest.mark.parametrize(
    ("status", "text", "message"),
    [
        (
            500,
            "CUDA error:\nout of memory\n",
            "POST /sleep answered 500: CUDA error: out of memory",
        ),
        (404, "", "POST /sleep answered 404: (no body)"),
        (307, "  ", "POST /sleep answered 307: (no body)"),
        (400, "x" * 300, "POST /sleep answered 400: " + "x" * 200),
    ],
)
async def test_a_refused_call_raises_naming_the_path_and_the_status(
    status: int, text: str, message: str
) -> None:
    engine = FakeEngine(lambda request: httpx.Response(status, text=text))
    async with standby_for(engine) as standby:
        with pytest.raises(StandbyFailed) as caught:
            await standby.sleep(spec(), URL, Tier.SLEEP1)
    assert str(caught.value) == message


async def test_an_unreachable_engine_raises_standby_failed() -> None:
    engine = FakeEngine(error=httpx.ConnectError("connection refused"))
    async with standby_for(engine) as standby:
        with pytest.raises(StandbyFailed) as caught:
            await standby.wake(spec(), URL, Tier.SLEEP1, within_seconds=5.0)
    assert str(caught.value) == "POST /wake_up failed: ConnectError('connection refused')"
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


async def test_a_timed_out_call_raises_standby_failed() -> None:
    engine = FakeEngine(error=httpx.ReadTimeout("timed out"))
    async with standby_for(engine) as standby:
        with pytest.raises(StandbyFailed) as caught:
            await standby.sleep(spec(), URL, Tier.SLEEP2)
    assert str(caught.value) == "POST /sleep failed: ReadTimeout('timed out')"


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (httpx.Response(200, json={"is_sleeping": True}), True),
        (httpx.Response(200, json={"is_sleeping": False}), False),
        (httpx.Response(404, json={"detail": "Not Found"}), None),
        (httpx.Response(500, json={"is_sleeping": True}), None),
        (httpx.Response(200, text="{not json"), None),
        (httpx.Response(200, json=["is_sleeping"]), None),
        (httpx.Response(200, json={"is_sleeping": "yes"}), None),
        (httpx.Response(200, json={}), None),
    ],
)
async def test_is_sleeping_asks_vllm(response: httpx.Response, expected: bool | None) -> None:
    engine = FakeEngine(lambda request: response)
    async with standby_for(engine) as standby:
        assert await standby.is_sleeping(spec(), URL) is expected
    assert [(s.method, s.path) for s in engine.seen] == [("GET", "/is_sleeping")]


async def test_is_sleeping_of_an_unreachable_engine_is_unknown() -> None:
    engine = FakeEngine(error=httpx.ConnectError("connection refused"))
    async with standby_for(engine) as standby:
        assert await standby.is_sleeping(spec(), URL) is None


async def test_is_sleeping_is_not_asked_of_sglang() -> None:
    engine = FakeEngine()
    async with standby_for(engine) as standby:
        sglang = ModelSpec(name="m", size_gb=10.0, standby=(Tier.RELEASE,))
        assert await standby.is_sleeping(sglang, URL) is None
    assert engine.seen == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"model": "m", "prompt": "ping", "max_tokens": 1}),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1},
        ),
        ("/v1/embeddings", {"model": "m", "input": "ping"}),
        ("/generate", {"model": "m", "prompt": "ping", "max_tokens": 1}),
    ],
)
async def test_the_wake_check_is_one_tiny_request(path: str, body: dict[str, Any]) -> None:
    engine = FakeEngine()
    async with standby_for(engine) as standby:
        await standby.check(spec(wake_check_path=path), URL, within_seconds=4.0)
    assert engine.calls == [("POST", path, "", body)]
    assert engine.seen[0].timeout["read"] == 4.0


async def test_a_failed_wake_check_raises() -> None:
    engine = FakeEngine(lambda request: httpx.Response(503, text="sleeping"))
    async with standby_for(engine) as standby:
        with pytest.raises(StandbyFailed) as caught:
            await standby.check(spec(), URL, within_seconds=4.0)
    assert str(caught.value) == "POST /v1/completions answered 503: sleeping"


async def test_the_models_api_key_is_sent_on_every_call() -> None:
    engine = FakeEngine(lambda request: httpx.Response(200, json={"is_sleeping": False}))
    keyed = spec(api_key="engine-secret")
    async with standby_for(engine) as standby:
        await standby.sleep(keyed, URL, Tier.SLEEP1)
        await standby.wake(keyed, URL, Tier.SLEEP2, within_seconds=5.0)
        await standby.is_sleeping(keyed, URL)
        await standby.check(keyed, URL, within_seconds=5.0)
    assert len(engine.seen) == 6
    assert {s.headers.get("authorization") for s in engine.seen} == {"Bearer engine-secret"}


async def test_no_key_no_authorization_header() -> None:
    engine = FakeEngine()
    async with standby_for(engine) as standby:
        await standby.sleep(spec(), URL, Tier.SLEEP1)
    assert "authorization" not in engine.seen[0].headers


# --- the host-RAM budget -------------------------------------------------------------------


@pytest.fixture
def meminfo(tmp_path: Path) -> Path:
    return tmp_path / "meminfo"


def write(path: Path, content: bytes) -> None:
    path.write_bytes(content)


async def test_a_configured_budget_is_used_as_is(meminfo: Path) -> None:
    assert await host_ram_budget_gb(12.5, meminfo) == 12.5
    assert await host_ram_budget_gb(0.0, meminfo) == 0.0  # configured none: no level-1 sleeps


async def test_else_half_of_what_the_host_has_available(meminfo: Path) -> None:
    write(
        meminfo,
        b"MemTotal:       65536000 kB\nMemFree:         1000000 kB\n"
        b"MemAvailable:   20971520 kB\nBuffers:          123456 kB\n",
    )
    assert await host_ram_budget_gb(None, meminfo) == 10.0


async def test_the_budget_is_rounded_to_hundredths(meminfo: Path) -> None:
    write(meminfo, b"MemAvailable:    1000000 kB\n")  # 0.9537 GiB
    assert await host_ram_budget_gb(None, meminfo) == 0.48


@pytest.mark.parametrize(
    "content",
    [None, "MemTotal: 65536000 kB\n", "MemAvailable: lots kB\n", "MemAvailable:\n", "\xff\xfe"],
)
async def test_an_unreadable_meminfo_gives_no_budget(
    meminfo: Path, content: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    if content is not None:
        write(meminfo, content.encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="switchd.standby"):
        assert await host_ram_budget_gb(None, meminfo) == 0.0
    assert f"cannot read MemAvailable from {meminfo}: no level-1 sleeps" in caplog.text


# --- names -------------------------------------------------------------------------------


def test_labels_and_default_wakes() -> None:
    assert [label(t) for t in Tier] == ["level 1", "level 2", "released"]
    assert dict(DEFAULT_WAKE_SECONDS) == {Tier.SLEEP1: 1.0, Tier.SLEEP2: 3.0, Tier.RELEASE: 3.0}
    assert [t.uses_host_ram for t in Tier] == [True, False, False]
