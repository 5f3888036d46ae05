"""The gateway in front of several hosts: what its extra hop costs, and what routing saves.

1. Added latency: one host (switchd, the demo engine serving a loaded model),
   the same small chat request one at a time, straight to the host and through
   `switchd gateway`; the p50 and p99 of each and the difference. The gateway
   reads hosts from a fixed list here (`--host-url`): a request's path through
   it is the same with Ray's directory, which only feeds the host list.
2. Switches avoided: three hosts (a 95.59 GB card each; models of 80, 40 and 24
   GB, loading in 0.3 s), one random sequence of requests for the three models
   (the same seed for both), sent one at a time through the gateway's routing,
   then, on fresh hosts, each to a host picked at random. Switches counted on
   the hosts (their `/v1/switches`), and the time the sequence took.

Loopback only. Run: `.venv/bin/python -m bench.gateway [--quick]`.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.server import free_port, launch, percentile, start_switchd, stop

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
SIZES = {"big": 80, "mid": 40, "small": 24}
WEIGHTS = {"big": 1, "mid": 2, "small": 3}


def models() -> dict[str, Any]:
    cmd = (
        "${PYTHON} -m switchd.demo.engine --port ${PORT} --model ${MODEL} "
        "--load-seconds 0.3 --tokens-per-second 0"
    )
    return {
        name: {"cmd": cmd, "size_gb": size, "load_time_seconds": 1} for name, size in SIZES.items()
    }


def host(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    folder.mkdir(parents=True)
    settings = {"simulated_gpu": {"total_gb": 95.59, "release_delay_seconds": 0.1}}
    return start_switchd(folder, models(), settings)


def gateway(hosts: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    urls = [f"--host-url={name}={url}" for name, url in hosts.items()]

    def sees_them(answer: httpx.Response) -> bool:
        reachable: int = answer.json()["hosts"]["reachable"]
        return reachable == len(hosts)

    return launch(["gateway", "--listen", f"127.0.0.1:{port}", *urls], port, sees_them)


def timed(http: httpx.Client, url: str, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        answer = http.post(f"{url}/v1/chat/completions", json={"model": "small", **CHAT})
        samples.append(time.perf_counter() - start)
        answer.raise_for_status()
    return samples


def overhead(folder: Path, count: int) -> None:
    process, url = host(folder / "one")
    front = None
    try:
        httpx.post(
            f"{url}/v1/models/switch", params={"target_model": "small", "wait": "ready"}, timeout=30
        ).raise_for_status()
        front, gateway_url = gateway({"one": url})
        with httpx.Client(timeout=30) as http:
            timed(http, url, 50)  # warm both paths
            timed(http, gateway_url, 50)
            direct, through = [], []
            for _ in range(4):  # interleaved, so that a busy moment hits both
                direct += timed(http, url, count // 4)
                through += timed(http, gateway_url, count // 4)
    finally:
        if front is not None:
            stop(front)
        stop(process)
    p50d, p50g = statistics.median(direct) * 1000, statistics.median(through) * 1000
    p99d, p99g = percentile(direct, 0.99) * 1000, percentile(through, 0.99) * 1000
    print(f"\nAdded latency, {count} sequential small chat requests each (ms):\n")
    print("| path | p50 | p99 |\n|---|--:|--:|")
    print(f"| straight to the host's switchd | {p50d:.2f} | {p99d:.2f} |")
    print(f"| through the gateway | {p50g:.2f} | {p99g:.2f} |")
    print(f"| the gateway's hop | +{p50g - p50d:.2f} | +{p99g - p99d:.2f} |")


def switches(urls: list[str]) -> int:
    return sum(
        len(httpx.get(f"{u}/v1/switches", params={"limit": 200}, timeout=10).json()["switches"])
        for u in urls
    )


def sequence(count: int, seed: int) -> list[str]:
    draw = random.Random(seed)
    return draw.choices(list(WEIGHTS), weights=list(WEIGHTS.values()), k=count)


def run_sequence(folder: Path, requests: list[str], routed: bool, seed: int) -> dict[str, Any]:
    started = [host(folder / f"host{i}") for i in range(3)]
    urls = [url for _, url in started]
    front = None
    try:
        target = None
        if routed:
            front, target = gateway({f"gpu{i}": url for i, url in enumerate(urls)})
        pick = random.Random(seed + 1)
        refused = 0
        start = time.monotonic()
        with httpx.Client(timeout=60) as http:
            for model in requests:
                url = target if target is not None else pick.choice(urls)
                answer = http.post(f"{url}/v1/chat/completions", json={"model": model, **CHAT})
                refused += answer.status_code != 200
        seconds = time.monotonic() - start
        return {"switches": switches(urls), "seconds": seconds, "refused": refused}
    finally:
        if front is not None:
            stop(front)
        for process, _ in started:
            stop(process)


def avoided(folder: Path, count: int, seed: int) -> None:
    requests = sequence(count, seed)
    routed = run_sequence(folder / "routed", requests, True, seed)
    scattered = run_sequence(folder / "random", requests, False, seed)
    mix = ", ".join(f"{m} {requests.count(m)}" for m in WEIGHTS)
    print(f"\nSwitches, {count} requests one at a time ({mix}), three hosts:\n")
    print("| sent | switches | not 200 | seconds |\n|---|--:|--:|--:|")
    for label, result in (
        ("through the gateway (routed)", routed),
        ("to a random host", scattered),
    ):
        print(f"| {label} | {result['switches']} | {result['refused']} | {result['seconds']:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as folder:
        overhead(Path(folder), 400 if args.quick else 2000)
        avoided(Path(folder), 20 if args.quick else 40, args.seed)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
