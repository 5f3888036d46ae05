"""Fairness with clients that give up: models that do not fit together, and users whose
requests time out, as real clients' do (issue 21).

Each case starts a fresh `switchd serve` on a simulated 24 GB card with models of
14 GB each (never two at once) and 4 users per model. A user sends a small chat
completion, waits for its answer, and sends the next at once; a request that
takes longer than CLIENT_TIMEOUT seconds is abandoned (as httpx's, the openai
SDK's or a curl script's timeout would) and sent again. The scheduler runs with
`min_residency_seconds` 5 (the default) and `max_hold_seconds` 20, twice the
clients' timeout: a hold measured from the oldest waiter now, which restarts each
time one gives up, never ends, and the first model loaded keeps the card.

Cases: `cheap` (engines load in 0.3 s), `expensive` (3 s), `sleep` (3 s loads,
vLLM-style sleep tiers: a switch puts the other model to sleep and wakes its own
in 0.3 s), and `cheap, 3 models`. Each model is loaded once before the clock
starts (explicit switches, not counted), so every load and wake time is learned.

Reported per case: answers (200), each model's share of them, demand switches
per minute, the share of the wall time spent switching (each switch from its
`memory_check` to `ready`, from `/v1/events`), waits over WAITED_SECONDS (p50,
p99), and requests the clients gave up on. Loopback only.
Run: `.venv/bin/python -m bench.fairness [--quick] [--seconds N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.contention import ENGINE, SLEEP_MODE, STANDBY, SwitchLog, demand_switches, follow_events
from bench.server import heading, percentile, start_switchd

CLIENT_TIMEOUT = 10.0
USERS_PER_MODEL = 4
WAITED_SECONDS = 0.1  # the stand-in engine answers in about a millisecond
POLICY = {"min_residency_seconds": 5, "max_hold_seconds": 20}
CARD = {"total_gb": 24, "release_delay_seconds": 0.3}


@dataclass(frozen=True)
class Case:
    name: str
    load_seconds: float
    models: tuple[str, ...] = ("a", "b")
    sleeps: bool = False


CASES = [
    Case("cheap", 0.3),
    Case("expensive", 3.0),
    Case("sleep", 3.0, sleeps=True),
    Case("cheap, 3 models", 0.3, ("a", "b", "c")),
]
QUICK_CASES = [CASES[0], CASES[3]]


@dataclass
class Tally:
    case: Case
    seconds: float = 0.0
    answered: dict[str, int] = field(default_factory=dict)
    gave_up: int = 0
    refused: int = 0  # answered, but not 200
    waits: list[float] = field(default_factory=list)
    switches: float = 0.0
    log: SwitchLog = field(default_factory=SwitchLog)

    def row(self) -> str:
        total = sum(self.answered.values()) or 1
        share = " / ".join(f"{self.answered.get(m, 0) / total:.0%}" for m in self.case.models)
        switching = sum(self.log.seconds()) / self.seconds if self.seconds else 0.0
        waits = self.waits or [0.0]
        return (
            f"| {self.case.name} | {self.case.load_seconds:g} s | {sum(self.answered.values())} "
            f"| {share} | {self.switches / self.seconds * 60:.1f} | {switching:.0%} "
            f"| {percentile(waits, 0.5):.2f} | {percentile(waits, 0.99):.2f} "
            f"| {self.gave_up} | {self.refused} |"
        )


async def impatient_user(
    client: httpx.AsyncClient, url: str, model: str, until: float, tally: Tally
) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            response = await client.post(
                f"{url}/v1/chat/completions", json=body, timeout=CLIENT_TIMEOUT
            )
        except httpx.TimeoutException:
            tally.gave_up += 1
            continue
        took = time.monotonic() - started
        if took > WAITED_SECONDS:
            tally.waits.append(took)
        if response.status_code == 200:
            tally.answered[model] = tally.answered.get(model, 0) + 1
        else:
            tally.refused += 1


async def drive(url: str, seconds: float, tally: Tally) -> None:
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        for model in tally.case.models:  # every load (or wake) time learned first
            params = {"target_model": model, "wait": "ready"}
            (await client.post(f"{url}/v1/models/switch", params=params)).raise_for_status()
        subscribed = asyncio.Event()
        events = asyncio.create_task(follow_events(client, url, tally.log, subscribed))
        await asyncio.wait_for(subscribed.wait(), 10)
        started = time.monotonic()
        await asyncio.gather(
            *(
                impatient_user(client, url, model, started + seconds, tally)
                for model in tally.case.models
                for _ in range(USERS_PER_MODEL)
            )
        )
        tally.seconds = time.monotonic() - started
        tally.switches = demand_switches((await client.get(f"{url}/metrics")).text)
        events.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await events


def run_case(case: Case, seconds: float) -> Tally:
    engine = ENGINE.replace("{load}", f"{case.load_seconds:g}")
    models: dict[str, Any] = {
        name: {
            "cmd": engine + (SLEEP_MODE if case.sleeps else ""),
            "size_gb": 14,
            **({"standby": STANDBY} if case.sleeps else {}),
        }
        for name in case.models
    }
    settings: dict[str, Any] = {
        "simulated_gpu": CARD,
        **POLICY,
        **({"standby_host_ram_gb": 500} if case.sleeps else {}),
    }
    tally = Tally(case)
    with tempfile.TemporaryDirectory() as folder:
        process, url = start_switchd(Path(folder), models, settings)
        try:
            asyncio.run(drive(url, seconds, tally))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="15 s per case, two cases")
    parser.add_argument("--seconds", type=float, help="seconds of load per case")
    args = parser.parse_args()
    seconds: float = args.seconds or (15.0 if args.quick else 40.0)
    tallies = []
    for case in QUICK_CASES if args.quick else CASES:
        print(f"running {case.name} for {seconds:g} s", file=sys.stderr)
        tallies.append(run_case(case, seconds))
    print(heading("## Fairness: clients that give up", "bench.fairness"))
    print(
        f"{USERS_PER_MODEL} users per model, each giving up after {CLIENT_TIMEOUT:g} s and "
        f"sending again; models of 14 GB on a 24 GB card; min residency "
        f"{POLICY['min_residency_seconds']} s, max hold {POLICY['max_hold_seconds']} s; "
        f"{seconds:g} s per case.\n"
    )
    print(
        "| case | engine load | 200 | share per model | switches/min | switching share "
        "| wait p50 s | p99 s | gave up | not 200 |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for tally in tallies:
        print(tally.row())
    print(
        "\nMeans: every model with demand gets the card in turn, whatever the clients' "
        "timeouts; cheap switches come often and take a small share of the time, "
        "expensive ones come in longer batches. A client whose timeout is shorter than "
        "one hold plus one switch can still give up, once per turn at most."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
