"""Switch overhead: what a switch costs beyond the engines' own stop and start.

Starts `switchd serve` (simulated GPU) with two stand-in engines of 60 GB each,
which do not fit on its 95.59 GB together, each loading in 0.5 s
(`--load-seconds 0.5`), and switches between them: 2 warm-up switches, then
20 measured (`--quick`: 8), one at a time, each `POST /v1/models/switch?wait=ready`
stopping one engine and starting the other.

For each switch the phases come from `/v1/events` (each event's `ts`,
switchd's wall clock, ms resolution) and from the benchmark's own clock:
  - request: the POST sent -> `memory_check`;
  - unload: `memory_check` -> `freed` (stop the old engine, see its memory back).
    Most of it is the old engine's own stop (the stand-in's uvicorn shuts down
    gracefully, checking its exit flag every 0.1 s, then its interpreter tears
    down), so that is observed directly, switch by switch: "engine stop" is the
    `unload` event (switchd signals the engine right after it) -> the old
    engine's process exited, as a pidfd of it opened by this process sees it
    (Linux 5.3 on; without one the derived rows are left out). "of which
    switchd" is unload - engine stop: everything else in it (draining, seeing
    the exit, seeing the memory come back);
  - spawn: `freed` -> `start` (the new engine's process started);
  - engine start: `start` -> the engine's `/health` first answering 200, as a
    poller in this process sees it, asking every 5 ms from the `start` event on
    (so up to 5 ms late). Of it, "engine load" is what the engine reports in
    its log ("Model X loaded in N.NNs", counted once its interpreter is up and
    its server starting); the rest is the interpreter starting and importing;
  - ready detection: that first 200 -> the `ready` event (switchd's own
    health polling, with backoff);
  - response: `ready` -> the POST's answer arrived.
Overhead = (POST -> `ready`) - engine start: what a switch adds to the new
engine's start. Switchd's own overhead = overhead - engine stop, per switch:
what switchd adds to both engines' own stop and start. Target: switchd's own
overhead p50 <= 50 ms.
Loopback only. Run: `.venv/bin/python -m bench.switch_overhead [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import re
import select
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.server import heading, percentile, start_switchd, stop

MODELS = ("switch-a", "switch-b")
MODEL_GB = 60  # two of them do not fit on the simulated 95.59 GB
LOAD_SECONDS = 0.5
ENGINE = (
    "${PYTHON} -m switchd.demo.engine --port ${PORT} --model ${MODEL} "
    f"--load-seconds {LOAD_SECONDS}"
)
POLL_SECONDS = 0.005
WARM_UP = 2
SWITCHES = 20
QUICK_SWITCHES = 8
EXIT_DEADLINE_SECONDS = 30.0  # for the old engine to exit once its switch began
TARGET_MS = 50  # switchd's own overhead, p50
LOADED = re.compile(r"loaded in ([0-9.]+)s")
# The phases, in order: (name, what it is).
PHASES = [
    ("request", "POST sent -> memory_check"),
    ("unload", "memory_check -> freed: stop the old engine, see its memory back"),
    ("  engine stop", "unload event -> the old engine's process exited (its pidfd)"),
    ("  of which switchd", "unload - engine stop"),
    ("spawn", "freed -> start: the new engine's process started"),
    ("engine start", "start -> its /health first 200 (5 ms poller)"),
    ("  of which interpreter", "engine start - engine load"),
    ("  of which engine load", "what the engine logs: 'loaded in N.NNs'"),
    ("ready detection", "first 200 -> ready event"),
    ("response", "ready event -> POST answered"),
    ("total", "POST sent -> ready event"),
    ("overhead", "total - engine start: what the switch adds to the engine's start"),
    ("switchd's own overhead", "overhead - engine stop: what switchd adds to both engines"),
]


class HealthPoller(threading.Thread):
    """Asks an engine's /health every POLL_SECONDS until it answers 200."""

    def __init__(self, port: int, deadline: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.deadline = deadline
        self.healthy_at: float | None = None  # time.time() of the first 200

    def run(self) -> None:
        while time.monotonic() < self.deadline:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
            try:
                connection.request("GET", "/health")
                status = connection.getresponse().status
            except OSError:
                status = 0
            finally:
                connection.close()
            if status == 200:
                self.healthy_at = time.time()
                return
            time.sleep(POLL_SECONDS)


class ExitWatcher(threading.Thread):
    """Notes when process `pid` exits, through a pidfd of it (readable once it has)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.exited_at: float | None = None  # time.time()
        try:
            self._fd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):  # not Linux 5.3+, or it is gone already
            self._fd = None

    def run(self) -> None:
        if self._fd is None:
            return
        try:
            readable, _, _ = select.select([self._fd], [], [], EXIT_DEADLINE_SECONDS)
            if readable:
                self.exited_at = time.time()
        finally:
            os.close(self._fd)


def engine_port(pid: int) -> int:
    """The `--port` the engine with this pid was started with."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return int(argv[argv.index("--port") + 1])


@dataclass
class Switch:
    target: str
    sent: float = 0.0  # time.time() when the POST went
    answered: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)  # stage -> its ts
    engine_load: float | None = None  # what the engine logged
    poller: HealthPoller | None = None
    pid: int | None = None  # the new engine's
    old_exit: ExitWatcher | None = None  # the old engine's

    def phases(self) -> dict[str, float] | None:
        """Milliseconds per phase, or None when a stage is missing. Without the old
        engine's exit (no pidfd) the rows that need it are left out."""
        stages = self.stages
        healthy = self.poller.healthy_at if self.poller is not None else None
        needed = ("memory_check", "freed", "start", "ready")
        if healthy is None or self.engine_load is None or any(s not in stages for s in needed):
            return None
        engine_start = healthy - stages["start"]
        total = stages["ready"] - self.sent
        seconds = {
            "request": stages["memory_check"] - self.sent,
            "unload": stages["freed"] - stages["memory_check"],
            "spawn": stages["start"] - stages["freed"],
            "engine start": engine_start,
            "  of which interpreter": engine_start - self.engine_load,
            "  of which engine load": self.engine_load,
            "ready detection": stages["ready"] - healthy,
            "response": self.answered - stages["ready"],
            "total": total,
            "overhead": total - engine_start,
        }
        exited = self.old_exit.exited_at if self.old_exit is not None else None
        if exited is not None and "unload" in stages:
            engine_stop = exited - stages["unload"]
            seconds["  engine stop"] = engine_stop
            seconds["  of which switchd"] = seconds["unload"] - engine_stop
            seconds["switchd's own overhead"] = total - engine_start - engine_stop
        return {name: value * 1000 for name, value in seconds.items()}


class Follower:
    """Reads `/v1/events`, filling in the switch under way."""

    def __init__(self) -> None:
        self.current: Switch | None = None
        self.job: str | None = None
        self.subscribed = asyncio.Event()

    async def follow(self, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        name = ""
        try:
            while line := await reader.readline():
                text = line.decode().rstrip("\r\n")
                field, _, value = text.partition(":")
                value = value.removeprefix(" ")
                if field == "event":
                    name = value
                elif field == "data":
                    self.observe(name, value)
                elif not text:
                    name = ""
        finally:
            writer.close()

    def observe(self, name: str, raw: str) -> None:
        if name == "snapshot":
            self.subscribed.set()
            return
        switch = self.current
        if switch is None or not raw.startswith("{") or '"job":' not in raw:
            return
        data: dict[str, Any] = json.loads(raw)
        if data.get("model") != switch.target or data.get("kind") != "switch":
            return
        if self.job is None and name == "memory_check":
            self.job = str(data["job"])
        if data["job"] != self.job:
            return
        if name not in switch.stages:
            switch.stages[name] = datetime.fromisoformat(str(data["ts"])).timestamp()
        if name == "start" and "pid" in data:
            switch.pid = int(data["pid"])
            deadline = time.monotonic() + 30
            switch.poller = HealthPoller(engine_port(int(data["pid"])), deadline)
            switch.poller.start()
        elif name == "log" and (found := LOADED.search(str(data.get("line", "")))):
            switch.engine_load = float(found.group(1))


async def switch_once(
    client: aiohttp.ClientSession, url: str, follower: Follower, target: str, old: int | None
) -> Switch:
    """Switch to `target`; `old`: the pid of the engine that must stop for it."""
    switch = Switch(target)
    if old is not None:
        switch.old_exit = ExitWatcher(old)
        switch.old_exit.start()
    follower.current, follower.job = switch, None
    params = {"target_model": target, "wait": "ready"}
    switch.sent = time.time()
    async with client.post(f"{url}/v1/models/switch", params=params) as response:
        response.raise_for_status()
        await response.read()
    switch.answered = time.time()
    await asyncio.sleep(0.05)  # the last events, then the next switch
    for thread in (switch.poller, switch.old_exit):
        if thread is not None:
            await asyncio.to_thread(thread.join, 30)
    follower.current = None
    return switch


async def measure(url: str, count: int) -> list[Switch]:
    port = int(url.rsplit(":", 1)[1])
    follower = Follower()
    following = asyncio.create_task(follower.follow(port))
    await asyncio.wait_for(follower.subscribed.wait(), 10)
    switches = []
    previous: Switch | None = None
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        for index in range(WARM_UP + count):
            old = previous.pid if previous is not None else None
            switch = await switch_once(client, url, follower, MODELS[index % 2], old)
            if index >= WARM_UP:
                switches.append(switch)
            previous = switch
    following.cancel()
    return switches


def table(switches: list[Switch]) -> tuple[list[str], dict[str, float], int]:
    measured = [phases for switch in switches if (phases := switch.phases()) is not None]
    rows = [
        "| phase | what | p50 ms | min ms | max ms |",
        "|---|---|--:|--:|--:|",
    ]
    p50s: dict[str, float] = {}
    for name, what in PHASES:
        samples = [phases[name] for phases in measured if name in phases]
        if not samples:
            continue
        p50s[name] = percentile(samples, 0.5)
        rows.append(
            f"| {name.strip()} | {what} | {round(p50s[name])} | {round(min(samples))} "
            f"| {round(max(samples))} |"
        )
    return rows, p50s, len(measured)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SWITCHES} switches")
    parser.add_argument("--switches", type=int, help="measured switches")
    args = parser.parse_args()
    count: int = args.switches or (QUICK_SWITCHES if args.quick else SWITCHES)
    models = {name: {"cmd": ENGINE, "size_gb": MODEL_GB} for name in MODELS}
    with tempfile.TemporaryDirectory() as folder:
        process, url = start_switchd(Path(folder), models)
        try:
            switches = asyncio.run(measure(url, count))
        finally:
            stop(process)
    rows, p50, complete = table(switches)
    print(heading("## Switch overhead", "bench.switch_overhead"))
    print(
        f"{complete} of {len(switches)} switches complete (after {WARM_UP} warm-up), "
        f"between two stand-in engines that do not fit together (engine load "
        f"{LOAD_SECONDS:g} s); phases from `/v1/events` (`ts`, ms) and this process's "
        "clock; p50 of each phase separately, so they need not add up. The old engine's "
        "exit: a pidfd of its process, opened by this process when the switch began.\n"
    )
    print("\n".join(rows))
    print()
    if "switchd's own overhead" not in p50:
        print("Means: no switch was measured completely.", file=sys.stderr)
        return 1
    own = p50["switchd's own overhead"]
    print(
        f"Means: a switch took {p50['total']:.0f} ms: the old engine stopping took "
        f"{p50['  engine stop']:.0f} ms of it, the new engine starting "
        f"{p50['engine start']:.0f} ms ({p50['  of which interpreter']:.0f} ms of it its "
        f"interpreter), and switchd {own:.0f} ms: {p50['  of which switchd']:.0f} ms "
        "around the stop (signalling it, seeing it exit and its memory come back), "
        f"{p50['spawn']:.0f} ms spawning the new engine, {p50['ready detection']:.0f} ms "
        "noticing it was ready."
    )
    verdict = "met" if own <= TARGET_MS else "NOT met"
    print(f"\nTarget: switchd's own overhead p50 <= {TARGET_MS} ms: {verdict} ({own:.0f} ms).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
