"""Contention: users wanting two models that do not fit on the GPU together.

For each scheduler setting (`min_residency_seconds`, `max_hold_seconds`) this
starts a fresh `switchd serve` on the simulated 95.59 GB GPU with two stand-in
engines, gpt-oss-120b (80 GB, loads in 1 s) and gpt-oss-20b (24 GB, 0.5 s), and
runs 8 users, 4 per model, each sending a small non-streamed chat completion,
waiting for its answer, and sending the next, for S seconds (30, `--quick` 10).
It records requests answered 200 and not, goodput (200 answers/s), each
model's share of them, demand switches per minute (from /metrics, the first
cold load included), and the waits: the stand-in engine answers a
non-streamed request in about a millisecond (its token rate paces streams
only), so a request that took over WAITED_SECONDS waited for its model to be
loaded; their count and p50/p99/max are shown. The residency floor is never
below a model's learned load time, so "no batching" still serves each load
about that long. (The seed's FIFO switcher is not kept for contrast: on this
load it answered nothing, swapping the two models back and forth.)
Loopback only. Run: `.venv/bin/python -m bench.contention [--quick] [--seconds N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.server import percentile, start_switchd

ENGINE = (
    "${PYTHON} -m switchd.demo.engine --port ${PORT} --model ${MODEL} "
    "--load-seconds {load} --tokens-per-second 200"
)
MODELS = {"gpt-oss-120b": (80, 1.0), "gpt-oss-20b": (24, 0.5)}  # size GB, load s
USERS_PER_MODEL = 4
WAITED_SECONDS = 0.1  # a request slower than this waited for a load
SETTINGS: list[tuple[str, float, float]] = [
    ("no batching", 0, 0),
    ("batch", 1, 2),
    ("batch", 1, 5),
    ("batch", 1, 10),
]


@dataclass
class Outcome:
    name: str
    residency: float
    hold: float
    seconds: float = 0.0
    ok: int = 0
    failed: int = 0
    switches: float = 0.0
    per_model: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def cells(self) -> str:
        total = sum(self.per_model.values()) or 1
        share = " / ".join(f"{self.per_model.get(m, 0) / total:.0%}" for m in MODELS)
        waits = [latency for latency in self.latencies if latency > WAITED_SECONDS] or [0.0]
        latency = " | ".join(
            f"{value:.2f}"
            for value in (percentile(waits, 0.5), percentile(waits, 0.99), max(waits))
        )
        waited = sum(1 for latency in self.latencies if latency > WAITED_SECONDS)
        return (
            f"| {self.name} ({self.residency:g}, {self.hold:g}) | {self.ok} | {self.failed} "
            f"| {self.ok / self.seconds:.1f} | {share} "
            f"| {self.switches / self.seconds * 60:.1f} | {waited} | {latency} |"
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


async def load(url: str, seconds: float, outcome: Outcome) -> None:
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
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


def run_setting(name: str, residency: float, hold: float, seconds: float) -> Outcome:
    models: dict[str, Any] = {
        model: {"cmd": ENGINE.replace("{load}", f"{load_s:g}"), "size_gb": size}
        for model, (size, load_s) in MODELS.items()
    }
    settings: dict[str, Any] = {
        "runtime": "process",
        "simulated_gpu": {"total_gb": 95.59, "release_delay_seconds": 0.3},
        "min_residency_seconds": residency,
        "max_hold_seconds": hold,
    }
    outcome = Outcome(name, residency, hold)
    with tempfile.TemporaryDirectory() as folder:
        process, url = start_switchd(Path(folder), models, settings)
        try:
            asyncio.run(load(url, seconds, outcome))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="10 s per setting, not 30")
    parser.add_argument("--seconds", type=float, help="seconds of load per setting")
    args = parser.parse_args()
    seconds: float = args.seconds or (10.0 if args.quick else 30.0)
    outcomes = []
    for name, residency, hold in SETTINGS:
        print(f"running {name} ({residency:g}, {hold:g}) for {seconds:g} s", file=sys.stderr)
        outcomes.append(run_setting(name, residency, hold, seconds))
    uname = os.uname()
    command = " ".join([".venv/bin/python -m bench.contention", *sys.argv[1:]])
    print(
        f"switchd contention, {uname.sysname} {uname.release} {uname.machine}, "
        f"{os.cpu_count()} CPUs; `{command}`; "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {USERS_PER_MODEL * len(MODELS)} users, "
        f"{seconds:g} s per setting\n"
    )
    print(
        "| setting (min residency s, max hold s) | 200 | not 200 | goodput /s "
        f"| share {' / '.join(MODELS)} | switches/min | waited | wait p50 s | p99 s | max s |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for outcome in outcomes:
        print(outcome.cells())
    print(
        "\nTrade-off: bigger holds batch more requests per load, so fewer switches and "
        "more goodput, but each wait for the other model grows with the hold."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
