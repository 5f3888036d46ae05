"""Proxy overhead: the same demo engine reached directly and through switchd.

Starts `switchd serve` with one stand-in engine (1,000 tokens/s), loads it,
then in one run measures, direct and proxied side by side:
  - latency of a small non-streamed chat completion, sequential and at 64
    concurrent clients (p50/p99, and what switchd adds), and requests/s;
  - the delivered token rate of streamed answers at 1, 16 and 128 concurrent
    streams, proxied as a % of direct.
Everything (client, switchd, engine) shares this machine's CPUs, so the
ratios, not the absolute figures, are the result.
Run: `.venv/bin/python -m bench.proxy [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx

from bench.server import percentile, start_switchd

MODEL = "bench-engine"
TOKENS_PER_SECOND = 1000
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def start_engine_behind_switchd(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    engine = (
        "${PYTHON} -m switchd.demo.engine --port ${PORT} --model ${MODEL} "
        f"--load-seconds 0.2 --tokens-per-second {TOKENS_PER_SECOND}"
    )
    return start_switchd(folder, {MODEL: {"cmd": engine, "size_gb": 10}})


async def timed_chat(client: aiohttp.ClientSession, base: str) -> float:
    started = time.perf_counter()
    async with client.post(f"{base}/v1/chat/completions", json=CHAT) as response:
        response.raise_for_status()
        await response.read()
    return (time.perf_counter() - started) * 1000


async def sequential(
    client: aiohttp.ClientSession, bases: list[str], count: int
) -> list[list[float]]:
    """Alternate direct and proxied requests so drift hits both alike."""
    samples: list[list[float]] = [[] for _ in bases]
    for _ in range(count):
        for index, base in enumerate(bases):
            samples[index].append(await timed_chat(client, base))
    return samples


async def concurrent(
    client: aiohttp.ClientSession, base: str, workers: int, per_worker: int
) -> tuple[list[float], float]:
    samples: list[float] = []

    async def worker() -> None:
        for _ in range(per_worker):
            samples.append(await timed_chat(client, base))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return samples, len(samples) / (time.perf_counter() - started)


async def stream_rate(client: aiohttp.ClientSession, base: str, tokens: int) -> float:
    """Tokens per second one streamed answer delivered, first byte to [DONE]."""
    body = {**CHAT, "stream": True, "max_tokens": tokens, "ignore_eos": True}
    received = 0
    started = 0.0
    async with client.post(f"{base}/v1/chat/completions", json=body) as response:
        async for raw in response.content:
            line = raw.decode()
            if not line.startswith("data: {"):
                continue
            if not started:
                started = time.perf_counter()
            received += bool(json.loads(line[6:])["choices"][0].get("delta", {}).get("content"))
    return (received - 1) / (time.perf_counter() - started)


async def streams(client: aiohttp.ClientSession, base: str, count: int, tokens: int) -> float:
    rates = await asyncio.gather(*(stream_rate(client, base, tokens) for _ in range(count)))
    return statistics.mean(rates)


@dataclass
class Row:
    name: str
    direct: float
    proxied: float
    unit: str

    def cells(self) -> str:
        added = self.proxied - self.direct
        ratio = f"{self.proxied / self.direct * 100:>8.1f}%" if self.direct else f"{'':>9}"
        return (
            f"{self.name:<34}{self.direct:>10.2f}{self.proxied:>10.2f}"
            f"{added:>+10.2f}{ratio}  {self.unit}"
        )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(direct: str, proxied: str, quick: bool, switchd_pid: int) -> list[Row]:
    rows: list[Row] = []
    # The load generator is aiohttp: it needs about a third of httpx's CPU per
    # request, and every cycle it takes is one the engine and switchd lack.
    connector = aiohttp.TCPConnector(limit=512)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        for base in (direct, proxied):  # warm-up: connections, imports, caches
            await sequential(client, [base], 50)
        count = 200 if quick else 1000
        cpu_before = cpu_seconds(switchd_pid)
        seq_direct, seq_proxied = await sequential(client, [direct, proxied], count)
        switchd_cpu_ms = (cpu_seconds(switchd_pid) - cpu_before) / count * 1000
        for fraction, label in ((0.5, "p50"), (0.99, "p99")):
            rows.append(
                Row(
                    f"sequential latency {label}",
                    percentile(seq_direct, fraction),
                    percentile(seq_proxied, fraction),
                    "ms",
                )
            )
        per_worker = 5 if quick else 20
        conc_direct, rps_direct = await concurrent(client, direct, 64, per_worker)
        conc_proxied, rps_proxied = await concurrent(client, proxied, 64, per_worker)
        for fraction, label in ((0.5, "p50"), (0.99, "p99")):
            rows.append(
                Row(
                    f"64 concurrent latency {label}",
                    percentile(conc_direct, fraction),
                    percentile(conc_proxied, fraction),
                    "ms",
                )
            )
        rows.append(Row("64 concurrent throughput", rps_direct, rps_proxied, "requests/s"))
        rows.append(Row("switchd CPU per proxied request", 0.0, switchd_cpu_ms, "ms"))
        tokens = 300 if quick else 1000
        for count in (1, 16, 128):
            rate_direct = await streams(client, direct, count, tokens)
            rate_proxied = await streams(client, proxied, count, tokens)
            rows.append(
                Row(f"stream rate, {count} concurrent", rate_direct, rate_proxied, "tokens/s each")
            )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples, for a smoke run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        process, url = start_engine_behind_switchd(Path(folder))
        try:
            load = {"target_model": MODEL, "wait": "ready"}
            httpx.post(f"{url}/v1/models/switch", params=load, timeout=60).raise_for_status()
            status = httpx.get(f"{url}/v1/models/status").json()
            engine = status["models"][MODEL]["engine"]["url"]
            rows = asyncio.run(measure(engine, url, args.quick, process.pid))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
    print(
        f"switchd proxy overhead, {os.cpu_count()} CPUs shared by client, switchd and engine; "
        f"engine streams {TOKENS_PER_SECOND} tokens/s"
    )
    print(f"{'':<34}{'direct':>10}{'switchd':>10}{'added':>10}{'ratio':>9}")
    for row in rows:
        print(row.cells())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
