"""Status latency: `GET /v1/models/status` on a real switchd, against `/health`.

Starts `switchd serve` with the simulated GPU and two demo engines running,
then times sequential keep-alive requests from one client. `/health` is the
floor (uvicorn + HTTP + the client); the ratio shows what building the status
body adds. Run: `.venv/bin/python -m bench.status [--requests N]`.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from bench.server import percentile, start_switchd

ENGINE = "${PYTHON} -m switchd.demo.engine --port ${PORT} --model ${MODEL} --load-seconds 0.2"


def start_server(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    models = {
        name: {"cmd": ENGINE, "size_gb": size}
        for name, size in [("gpt-oss-20b", 24), ("mistral-7b-v0.1", 18), ("idle", 30)]
    }
    return start_switchd(folder, models)


def timings(client: httpx.Client, path: str, count: int) -> list[float]:
    for _ in range(50):  # warm-up: connections, caches
        client.get(path)
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        response = client.get(path)
        samples.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        process, url = start_server(Path(folder))
        try:
            with httpx.Client(base_url=url, timeout=30) as client:
                for model in ("gpt-oss-20b", "mistral-7b-v0.1"):
                    params = {"target_model": model, "wait": "ready"}
                    client.post("/v1/models/switch", params=params).raise_for_status()
                health = timings(client, "/health", args.requests)
                status = timings(client, "/v1/models/status", args.requests)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
    floor = statistics.median(health)
    print(
        f"switchd status latency, {args.requests} sequential keep-alive requests, "
        f"{os.cpu_count()} CPUs, simulated GPU, 3 models (2 running)"
    )
    print(f"{'route':<22}{'p50 ms':>9}{'p99 ms':>9}{'p50 / health':>14}")
    for route, samples in (("/health", health), ("/v1/models/status", status)):
        p50, p99 = percentile(samples, 0.50), percentile(samples, 0.99)
        print(f"{route:<22}{p50:>9.3f}{p99:>9.3f}{p50 / floor:>14.2f}")
    target = percentile(status, 0.50) <= 2.0
    print(f"target p50 <= 2 ms: {'met' if target else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
