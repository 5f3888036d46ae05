"""Contention: users wanting two models that do not fit on the GPU together.

For each scheduler setting (`min_residency_seconds`, `max_hold_seconds`) and
each tier this starts a fresh `switchd serve` on the simulated 95.59 GB GPU
with two stand-in engines, gpt-oss-120b (80 GB, loads in 4 s) and gpt-oss-20b
(24 GB, 2 s), loads each once (explicit switches, not counted), then runs 8
users, 4 per model, each sending a small non-streamed chat completion,
waiting for its answer, and sending the next, for S seconds (15, `--quick` 6).
The tiers:

- `cold`: a switch stops the other model's engine and starts its own cold.
- `sleep`: both models list `standby: [sleep1, sleep2]`, their engines run
  with sleep mode (the demo engine's `--enable-sleep-mode`: falling asleep
  takes 0.1 s, a wake 0.3 s, a level-2 weight reload 1 s more) and level-1
  sleeps may hold 500 GB of host RAM, so a switch puts the other engine to
  sleep and wakes its own: after the warm-up every switch is a wake.

The loads are 4 s and 2 s, not the 1 s and 0.5 s of earlier runs, so that a
wake (0.3 s) is much shorter than a cold load, as on a real GPU. Settings:
no batching, and batches with holds of 5 and 10 s (a 2 s hold is left out:
with these loads the residency floor covers it, and four settings by two
tiers would run past three minutes).

It records requests answered 200 and not, goodput (200 answers/s), each
model's share of them, demand switches per minute (from /metrics), and the
waits: the stand-in engine answers a non-streamed request in about a
millisecond (its token rate paces streams only), so a request that took over
WAITED_SECONDS waited for its model; their count and p50/p99/max are shown.
From `/v1/events` (one subscription per run) it takes each demand switch's
time, from its `memory_check` to its `ready` event (making room, then loading
or waking), and counts the switches that started their model cold (`start`)
and that woke it (`wake`; in brackets, those from a level-2 sleep). A second
table sets each model's cold load (`ready.load_seconds` of a `start` switch)
against its wake (`woken.wake_seconds`). The residency floor is never below
what a model's last load or wake took, so "no batching" still serves each
load about that long. (The seed's FIFO switcher is not kept for contrast: on
this load it answered nothing, swapping the two models back and forth.)
Loopback only. Run: `.venv/bin/python -m bench.contention [--quick] [--seconds N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.server import heading, percentile, start_switchd

ENGINE = (
    "${PYTHON} -m switchd.demo.engine --port ${PORT} --model ${MODEL} "
    "--load-seconds {load} --tokens-per-second 200"
)
SLEEP_MODE = " --enable-sleep-mode --sleep-seconds 0.1 --wake-seconds 0.3 --reload-seconds 1.0"
MODELS = {"gpt-oss-120b": (80, 4.0), "gpt-oss-20b": (24, 2.0)}  # size GB, load s
TIERS = ("cold", "sleep")
STANDBY = ["sleep1", "sleep2"]
HOST_RAM_GB = 500  # standby_host_ram_gb: level-1 sleeps always have room
USERS_PER_MODEL = 4
WAITED_SECONDS = 0.1  # a request slower than this waited for a load
SETTINGS: list[tuple[str, float, float]] = [
    ("no batching", 0, 0),
    ("batch", 1, 5),
    ("batch", 1, 10),
]
QUICK_SETTINGS = [SETTINGS[1]]
# The job events the switch figures come from.
STAGES = frozenset({"memory_check", "start", "wake", "woken", "ready"})


@dataclass
class SwitchLog:
    """What `/v1/events` told of the demand switches: times, cold starts against wakes."""

    # Per switch, memory_check to ready: its target, whether it woke, the seconds.
    switches: list[tuple[str, bool, float]] = field(default_factory=list)
    cold: int = 0  # `start` events
    woken: int = 0  # `wake` events
    level2: int = 0  # of them, wakes from a level-2 sleep (the weights reloaded)
    loads: dict[str, list[float]] = field(default_factory=dict)  # cold load_seconds per model
    wakes: dict[str, list[float]] = field(default_factory=dict)  # wake_seconds per model
    began: dict[str, float] = field(default_factory=dict)  # job: its memory_check, until ready
    started_cold: set[str] = field(default_factory=set)  # jobs with a `start`, until ready
    waking: set[str] = field(default_factory=set)  # jobs with a `wake`, until ready

    def observe(self, stage: str, data: dict[str, Any]) -> None:
        if stage not in STAGES or (data.get("kind"), data.get("cause")) != ("switch", "demand"):
            return
        job, model = str(data["job"]), str(data["model"])
        at = datetime.fromisoformat(str(data["ts"])).timestamp()
        if stage == "memory_check":
            self.began[job] = at
        elif stage == "start":
            self.cold += 1
            self.started_cold.add(job)
        elif stage == "wake":
            self.woken += 1
            self.level2 += data.get("tier") == "sleep2"
            self.waking.add(job)
        elif stage == "woken":
            self.wakes.setdefault(model, []).append(float(data["wake_seconds"]))
        elif stage == "ready":
            woke = job in self.waking and job not in self.started_cold  # a failed wake: cold
            if job in self.began:
                self.switches.append((model, woke, at - self.began.pop(job)))
            if job in self.started_cold:
                self.loads.setdefault(model, []).append(float(data["load_seconds"]))
            self.started_cold.discard(job)
            self.waking.discard(job)

    def seconds(self, model: str | None = None, woke: bool | None = None) -> list[float]:
        """Switch times, of one target and one kind (woken or cold) where given."""
        return [
            took
            for target, was_woken, took in self.switches
            if model in (None, target) and woke in (None, was_woken)
        ]


@dataclass
class Outcome:
    name: str
    residency: float
    hold: float
    tier: str
    seconds: float = 0.0
    ok: int = 0
    failed: int = 0
    switches: float = 0.0
    per_model: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    switch_log: SwitchLog = field(default_factory=SwitchLog)

    def cells(self) -> str:
        total = sum(self.per_model.values()) or 1
        share = " / ".join(f"{self.per_model.get(m, 0) / total:.0%}" for m in MODELS)
        waits = [latency for latency in self.latencies if latency > WAITED_SECONDS] or [0.0]
        latency = " | ".join(
            f"{value:.2f}"
            for value in (percentile(waits, 0.5), percentile(waits, 0.99), max(waits))
        )
        waited = sum(1 for latency in self.latencies if latency > WAITED_SECONDS)
        log = self.switch_log
        took = log.seconds() or [0.0]
        return (
            f"| {self.name} ({self.residency:g}, {self.hold:g}) | {self.tier} | {self.ok} "
            f"| {self.failed} | {self.ok / self.seconds:.1f} | {share} "
            f"| {self.switches / self.seconds * 60:.1f} | {log.cold} / {log.woken} ({log.level2}) "
            f"| {percentile(took, 0.5):.2f} | {max(took):.2f} | {waited} | {latency} |"
        )


def demand_switches(metrics: str) -> float:
    wanted = {"kind": "switch", "cause": "demand", "result": "success"}
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "switchd_jobs_total"
        and all(sample.labels.get(key) == value for key, value in wanted.items())
    )


async def user(
    client: httpx.AsyncClient, url: str, model: str, until: float, outcome: Outcome
) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            response = await client.post(f"{url}/v1/chat/completions", json=body)
            status = response.status_code
        except httpx.HTTPError:
            status = 0
        outcome.latencies.append(time.monotonic() - started)
        if status == 200:
            outcome.ok += 1
            outcome.per_model[model] = outcome.per_model.get(model, 0) + 1
        else:
            outcome.failed += 1


async def follow_events(
    client: httpx.AsyncClient, url: str, log: SwitchLog, subscribed: asyncio.Event
) -> None:
    """Read `/v1/events` into `log` until cancelled; `subscribed` once its snapshot came."""
    async with client.stream("GET", f"{url}/v1/events") as response:
        response.raise_for_status()
        name, data = "", ""
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
            elif not line:  # the end of one event
                if name == "snapshot":
                    subscribed.set()
                elif name in STAGES and data:
                    log.observe(name, json.loads(data))
                name, data = "", ""


async def warm_up(client: httpx.AsyncClient, url: str) -> None:
    """Load each model once, before the clock starts: explicit switches, which neither
    /metrics' demand switches nor the switch log count. From then on a sleeping
    model wakes, and every learned load time is known."""
    for model in MODELS:
        params = {"target_model": model, "wait": "ready"}
        response = await client.post(f"{url}/v1/models/switch", params=params)
        response.raise_for_status()


async def load(url: str, seconds: float, outcome: Outcome) -> None:
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await warm_up(client, url)
        subscribed = asyncio.Event()
        events = asyncio.create_task(follow_events(client, url, outcome.switch_log, subscribed))
        await asyncio.wait_for(subscribed.wait(), 10)
        started = time.monotonic()
        until = started + seconds
        await asyncio.gather(
            *(
                user(client, url, model, until, outcome)
                for model in MODELS
                for _ in range(USERS_PER_MODEL)
            )
        )
        outcome.seconds = time.monotonic() - started
        metrics = await client.get(f"{url}/metrics")
        metrics.raise_for_status()
        outcome.switches = demand_switches(metrics.text)
        events.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await events


def run_setting(name: str, residency: float, hold: float, tier: str, seconds: float) -> Outcome:
    sleeps = tier == "sleep"
    models: dict[str, Any] = {
        model: {
            "cmd": ENGINE.replace("{load}", f"{load_s:g}") + (SLEEP_MODE if sleeps else ""),
            "size_gb": size,
            **({"standby": STANDBY} if sleeps else {}),
        }
        for model, (size, load_s) in MODELS.items()
    }
    settings: dict[str, Any] = {
        "runtime": "process",
        "simulated_gpu": {"total_gb": 95.59, "release_delay_seconds": 0.3},
        "min_residency_seconds": residency,
        "max_hold_seconds": hold,
        **({"standby_host_ram_gb": HOST_RAM_GB} if sleeps else {}),
    }
    outcome = Outcome(name, residency, hold, tier)
    with tempfile.TemporaryDirectory() as folder:
        process, url = start_switchd(Path(folder), models, settings)
        try:
            asyncio.run(load(url, seconds, outcome))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    return outcome


def cold_against_wake(outcomes: list[Outcome]) -> list[str]:
    """Per model, over every run: its cold loads against its wakes, p50 each, the ratio,
    and the whole switch to it (making room included) either way."""
    rows = [
        "| model | engine load s | cold load p50 s (n) | wake p50 s (n) | cold / wake "
        "| whole switch, cold p50 s | woken p50 s |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]

    def p50(samples: list[float]) -> str:
        return f"{percentile(samples, 0.5):.2f}" if samples else "-"

    for model, (_, load_s) in MODELS.items():
        loads = [s for outcome in outcomes for s in outcome.switch_log.loads.get(model, [])]
        wakes = [s for outcome in outcomes for s in outcome.switch_log.wakes.get(model, [])]
        cold, woken = (
            [s for o in outcomes for s in o.switch_log.seconds(model, woke)]
            for woke in (False, True)
        )
        ratio = (
            f"{percentile(loads, 0.5) / percentile(wakes, 0.5):.1f}x"
            if loads and wakes and percentile(wakes, 0.5) > 0
            else "-"
        )
        rows.append(
            f"| {model} | {load_s:g} | {p50(loads)} ({len(loads)}) | {p50(wakes)} ({len(wakes)}) "
            f"| {ratio} | {p50(cold)} | {p50(woken)} |"
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="6 s per run, not 15, and one setting (batch 1, 5), not three",
    )
    parser.add_argument("--seconds", type=float, help="seconds of load per setting and tier")
    args = parser.parse_args()
    seconds: float = args.seconds or (6.0 if args.quick else 15.0)
    outcomes = []
    for name, residency, hold in QUICK_SETTINGS if args.quick else SETTINGS:
        for tier in TIERS:
            print(
                f"running {name} ({residency:g}, {hold:g}), {tier}, for {seconds:g} s",
                file=sys.stderr,
            )
            outcomes.append(run_setting(name, residency, hold, tier, seconds))
    print(heading("## Contention: two models that do not fit together", "bench.contention"))
    print(
        f"{USERS_PER_MODEL * len(MODELS)} users, {USERS_PER_MODEL} per model, "
        f"{seconds:g} s per setting and tier, on the simulated 95.59 GB GPU.\n"
    )
    print(
        "| setting (min residency s, max hold s) | tier | 200 | not 200 | goodput /s "
        f"| share {' / '.join(MODELS)} | switches/min | cold / wakes (level 2) "
        "| switch p50 s | max s | waited | wait p50 s | p99 s | max s |"
    )
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for outcome in outcomes:
        print(outcome.cells())
    print(
        "\nMeans: bigger holds batch more requests per load, so fewer switches and "
        "more goodput, but each wait for the other model grows with the hold. A wake "
        "costs a fraction of a cold load and the hold shrinks with it (max hold x wake / "
        "load), so the sleep rows switch more often, in smaller batches, and wait less."
    )
    print("\nSwitch time cold against wake, per model, over every run above:\n")
    print("\n".join(cold_against_wake(outcomes)))
    print(
        "\nMeans: where the engines support sleep mode, switching back to a model that "
        "sleeps costs its wake, not its cold load: compare the two p50 columns."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
