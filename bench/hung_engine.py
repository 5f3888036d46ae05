"""A hung engine call: how long a request for a model that fits beside everything
waits while a switch is stuck in its victim's /sleep.

A real `switchd serve`, real demo engines, the simulated 95.59 GB GPU: `v` (60 GB,
vLLM's sleep API) is running and its /sleep never answers; an operator switches to
`t` (90 GB, which needs v's memory). Once the switch is in its `sleep` stage, a
chat request for `u` (5 GB, fits beside v and t) is sent. Measured in one run:
how long that request took, and how long the switch took in all (the sleep is
given up after `engine_call_timeout_seconds`, then v is stopped and t loads).
Before loads beside a switch, the request waited for the whole switch.

    python -m bench.hung_engine [--quick] [--call-timeout SECONDS]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.server import heading, start_switchd, stop

ENGINE = (
    "${PYTHON} -m switchd.demo.engine --port ${PORT} --model ${MODEL} "
    "--load-seconds {load} --tokens-per-second 200"
)
HUNG_SLEEP = " --enable-sleep-mode --sleep-seconds 3600"


async def measure(url: str) -> tuple[float, float, str]:
    """(seconds the request for u took, seconds until t served, the switch's stage then)."""
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        answer = await http.post("/v1/models/switch", params={"target_model": "v"})
        answer.raise_for_status()
        began = time.monotonic()
        switching = asyncio.create_task(
            http.post("/v1/models/switch", params={"target_model": "t"})
        )
        stage = None
        while stage != "sleep":
            await asyncio.sleep(0.05)
            current = (await http.get("/v1/models/status")).json()["switch"]
            stage = current["stage"] if current else None
        sent = time.monotonic()
        body = {"model": "u", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        chat = await http.post("/v1/chat/completions", json=body)
        chat.raise_for_status()
        served = time.monotonic() - sent
        current = (await http.get("/v1/models/status")).json()["switch"]
        then = f"{current['target']}: {current['stage']}" if current else "done"
        (await switching).raise_for_status()  # answered once t's engine started
        while (await http.get("/v1/models/status")).json()["models"]["t"]["status"] != "running":  # noqa: ASYNC110 - another process
            await asyncio.sleep(0.05)
        return served, time.monotonic() - began, then


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--call-timeout", type=float, help="seconds (10; --quick: 5)")
    parser.add_argument("--quick", action="store_true", help="the hung call given up after 5 s")
    args = parser.parse_args()
    args.call_timeout = args.call_timeout or (5.0 if args.quick else 10.0)
    models = {
        "v": {
            "cmd": ENGINE.replace("{load}", "0.5") + HUNG_SLEEP,
            "size_gb": 60,
            "standby": ["sleep2"],
        },
        "t": {"cmd": ENGINE.replace("{load}", "3"), "size_gb": 90},
        "u": {"cmd": ENGINE.replace("{load}", "0.5"), "size_gb": 5},
    }
    settings = {"engine_call_timeout_seconds": args.call_timeout, "standby_host_ram_gb": 200}
    with tempfile.TemporaryDirectory() as folder:
        process, url = start_switchd(Path(folder), models, settings)
        try:
            served, switch, then = asyncio.run(measure(url))
        finally:
            stop(process)
    print(heading("## A hung engine call", "bench.hung_engine"), file=sys.stdout)
    print(
        f"v's /sleep never answers (given up after {args.call_timeout:g} s); the switch "
        "to t (90 GB) stops v and loads t (3 s); u (5 GB) fits beside both.\n"
    )
    print("| request for u, sent in the switch's sleep stage | switch until t is ready | ratio |")
    print("|--:|--:|--:|")
    print(f"| {served:.2f} s (switch then: {then}) | {switch:.2f} s | {switch / served:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
