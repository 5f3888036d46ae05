"""Event fan-out: how fast `/v1/events` reaches many subscribers, and what each costs.

For each N (100, 300, 1000; `--quick`: 100, 300) this starts a fresh `switchd
serve` (simulated GPU, two stand-in engines of 60 GB each that do not fit on
its 95.59 GB together, loading in 0.1 s), switches once to each (warm-up), then
opens N subscribers to `GET /v1/events`. Each is a raw socket with a hand-written
HTTP/1.1 request, read by an asyncio protocol (on uvloop) that only
stamps the arrival time of every chunk and keeps its bytes: nothing is parsed
while the events arrive, so the client's parsing is not what is measured.

Then it switches between the two models K times (5; `--quick`: 3), each switch
stopping one engine and starting the other, about 20 events each (the stages,
the engine's load lines, model states). Afterwards, per subscriber, it finds
each event of those switches in the bytes (its `data:` line, and in it the
`"job"` and `"ts"` fields, by pattern, not by JSON) and takes its delivery latency =
arrival of the event's last byte at the subscriber (`time.time()`) minus the
event's `ts` (switchd's wall clock when it published the event; same machine,
same clock; `ts` is truncated to the millisecond, so figures may read up to
1 ms high). Model-state events carry no `ts` and are not counted.

Memory: switchd's VmRSS with the N subscribers connected (each has had its
snapshot) minus the VmRSS just before they connected, divided by N.

Stalled reader: then one more socket subscribes with SO_RCVBUF 4 KiB and never
reads. Switches run until the kernel queues towards it are full (switchd's
side holds unsent bytes; at most 15 switches), and then K more switches are
measured as above, with the N readers and the stalled one connected.

Client, switchd and engines share this machine's CPUs: the client's own
reading of N sockets is part of each figure. Loopback only; every loop is
bounded. Run: `.venv/bin/python -m bench.fanout [--quick] [--subscribers N ...]`.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import re
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import aiohttp
import uvloop

from bench.server import (
    cpu_seconds,
    heading,
    percentile,
    raise_open_files,
    rss_kb,
    start_switchd,
    stop,
)

ENGINE = "${PYTHON} -m switchd.demo.engine --port ${PORT} --model ${MODEL} --load-seconds 0.1"
MODELS = ("fan-a", "fan-b")
MODEL_GB = 60  # two of them do not fit on the simulated 95.59 GB
SUBSCRIBERS = (100, 300, 1000)
QUICK_SUBSCRIBERS = (100, 300)
CONNECT_BATCH = 100  # subscribers connecting at once
STALLED_RCVBUF = 4096
PREFILL_SWITCHES = 15  # at most, to fill the stalled reader's kernel queues
TCP_ESTABLISHED = "01"  # the state column of /proc/net/tcp
DEADLINE_SECONDS = 60.0  # for any one wait: a round that takes longer fails

# An event's data line (one line of compact JSON), whatever the order of the
# event's other fields and its line endings; the event is complete with it.
DATA = re.compile(rb"(?m)^data: ?(\{[^\r\n]*)\r?\n")
TS = re.compile(rb'"ts":"([^"]+)"')
JOB = re.compile(rb'"job":"([^"]+)"')
SNAPSHOT = re.compile(rb"(?m)^event: ?snapshot\r?$")


class Reader(asyncio.Protocol):
    """One subscriber: stamps and keeps what arrives, parses nothing meanwhile."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.times: list[float] = []
        self.chunks: list[bytes] = []
        self.subscribed = asyncio.get_running_loop().create_future()
        self.lost = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.times.append(time.time())
        self.chunks.append(data)
        if not self.subscribed.done() and SNAPSHOT.search(b"".join(self.chunks[-2:])):
            self.subscribed.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def has(self, marker: re.Pattern[bytes]) -> bool:
        return marker.search(b"".join(self.chunks[-3:])) is not None

    def reset(self) -> None:
        """Forget what arrived (at a quiet moment: no event is cut in two)."""
        self.times.clear()
        self.chunks.clear()

    def deliveries(self, jobs: set[bytes], parsed: Callable[[bytes], float]) -> list[float]:
        """Milliseconds from each event's `ts` to its last byte here, for `jobs`' events."""
        data = b"".join(self.chunks)
        ends = list(itertools.accumulate(len(chunk) for chunk in self.chunks))
        latencies = []
        for match in DATA.finditer(data):
            payload = match.group(1)
            job = JOB.search(payload)
            stamp = TS.search(payload)
            if job is None or stamp is None or job.group(1) not in jobs:
                continue
            arrived = self.times[bisect.bisect_left(ends, match.end())]
            latencies.append((arrived - parsed(stamp.group(1))) * 1000)
        return latencies

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass
class Round:
    latencies: list[float] = field(default_factory=list)
    # Per event, when the last subscriber had it: how long until all have it.
    last: list[float] = field(default_factory=list)
    missed: int = 0  # event deliveries that never came
    switchd_cpu: float = 0.0  # seconds of CPU switchd used for the round
    client_cpu: float = 0.0  # and this process
    seconds: float = 0.0  # wall time of the round

    def cpu_per_delivery_us(self) -> str:
        if not self.latencies:
            return "-"
        return f"{self.switchd_cpu / len(self.latencies) * 1e6:.0f}"

    def cells(self) -> tuple[str, str, str, str]:
        if not self.latencies:
            return ("-", "-", "-", "-")
        return (
            f"{percentile(self.latencies, 0.5):.1f}",
            f"{percentile(self.latencies, 0.99):.1f}",
            f"{max(self.latencies):.1f}",
            f"{percentile(self.last, 0.5):.1f}",
        )


@dataclass
class Outcome:
    subscribers: int
    events: int = 0  # measured events (with a ts) per subscriber
    rss_before_kb: int = 0
    rss_with_kb: int = 0
    plain: Round = field(default_factory=Round)
    stalled: Round = field(default_factory=Round)
    prefill_switches: int = 0
    stuck_bytes: int = 0  # unread bytes in the kernel queues towards the stalled reader
    stalled_dropped: bool = False  # switchd closed the stalled reader's connection

    @property
    def per_subscriber_kb(self) -> float:
        return (self.rss_with_kb - self.rss_before_kb) / self.subscribers


class Switcher:
    """Explicit switches between the two models, each waiting for `ready`."""

    def __init__(self, client: aiohttp.ClientSession, url: str) -> None:
        self.client = client
        self.url = url
        self.turn = itertools.cycle(MODELS)

    async def switch(self) -> bytes:
        """One switch to the other model; returns its job id."""
        params = {"target_model": next(self.turn), "wait": "ready"}
        async with self.client.post(f"{self.url}/v1/models/switch", params=params) as response:
            response.raise_for_status()
            body: dict[str, Any] = await response.json()
        return str(body["job"]).encode()


async def within(awaitable: Awaitable[Any], what: str) -> None:
    try:
        await asyncio.wait_for(awaitable, DEADLINE_SECONDS)
    except TimeoutError:
        raise SystemExit(f"fan-out: {what} took over {DEADLINE_SECONDS:g} s") from None


async def connect(port: int, count: int) -> list[Reader]:
    loop = asyncio.get_running_loop()
    request = (
        f"GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()
    readers: list[Reader] = []
    for start in range(0, count, CONNECT_BATCH):
        batch = min(CONNECT_BATCH, count - start)
        made = await asyncio.gather(
            *(
                loop.create_connection(lambda: Reader(request), "127.0.0.1", port)
                for _ in range(batch)
            )
        )
        readers += [protocol for _, protocol in made]
        await within(
            asyncio.gather(*(reader.subscribed for reader in readers[-batch:])), "subscribing"
        )
    return readers


async def all_have(readers: list[Reader], job: bytes) -> None:
    """Until every reader still connected got `job`'s last event (its result)."""
    job_field = re.escape(b'"job":"' + job + b'"')
    marker = re.compile(rb"(?m)^data: ?(?=[^\n]*" + job_field + rb')(?=[^\n]*"stage":"result")')
    waiting = [reader for reader in readers if not reader.lost]
    while waiting:
        await asyncio.sleep(0.02)
        waiting = [reader for reader in waiting if not reader.lost and not reader.has(marker)]


def collect(readers: list[Reader], jobs: set[bytes]) -> Round:
    """Every reader's delivery latencies of `jobs`' events."""
    stamps: dict[bytes, float] = {}

    def parsed(stamp: bytes) -> float:
        if stamp not in stamps:
            stamps[stamp] = datetime.fromisoformat(stamp.decode()).timestamp()
        return stamps[stamp]

    outcome = Round()
    per_reader = [reader.deliveries(jobs, parsed) for reader in readers]
    expected = max((len(latencies) for latencies in per_reader), default=0)
    for latencies in per_reader:
        outcome.latencies += latencies
        outcome.missed += expected - len(latencies)
    # The i-th event is the same event for every reader that got them all.
    complete = [latencies for latencies in per_reader if len(latencies) == expected]
    outcome.last = [max(column) for column in zip(*complete, strict=True)]
    return outcome


async def measured(switcher: Switcher, readers: list[Reader], switches: int, pid: int) -> Round:
    """`switches` switches, then each reader's delivery latency of their events."""
    for reader in readers:
        reader.reset()
    started, cpu, client_cpu = time.monotonic(), cpu_seconds(pid), time.process_time()
    jobs = [await switcher.switch() for _ in range(switches)]
    await within(all_have(readers, jobs[-1]), "delivering the last switch's events")
    cpu, client_cpu = cpu_seconds(pid) - cpu, time.process_time() - client_cpu
    seconds = time.monotonic() - started
    outcome = collect(readers, set(jobs))
    outcome.switchd_cpu, outcome.client_cpu, outcome.seconds = cpu, client_cpu, seconds
    return outcome


def kernel_queues(local_port: int, remote_port: int) -> tuple[int, int] | None:
    """(tx, rx) bytes queued on the established IPv4 connection local_port ->
    remote_port, or None when there is none."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, queues = fields[1], fields[2], fields[3], fields[4]
        if (
            state == TCP_ESTABLISHED
            and int(local.split(":")[1], 16) == local_port
            and int(remote.split(":")[1], 16) == remote_port
        ):
            tx, rx = queues.split(":")
            return int(tx, 16), int(rx, 16)
    return None


def stalled_socket(port: int) -> socket.socket:
    """A subscriber that never reads, with a small receive buffer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALLED_RCVBUF)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        f"GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    sock.setblocking(False)
    return sock


def stuck(sock: socket.socket, port: int) -> int | None:
    """Bytes switchd has sent towards `sock` that it never read, or None while
    switchd's side of the connection still has room (it is not stalled yet)."""
    mine = sock.getsockname()[1]
    server = kernel_queues(port, mine)
    client = kernel_queues(mine, port)
    if server is None or client is None:
        return 0
    return server[0] + client[1] if server[0] > 0 else None


async def run_round(url: str, pid: int, count: int, switches: int) -> Outcome:
    port = int(url.rsplit(":", 1)[1])
    outcome = Outcome(count)
    timeout = aiohttp.ClientTimeout(total=DEADLINE_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        switcher = Switcher(client, url)
        for _ in MODELS:  # warm-up: both engines started once, imports and caches
            await switcher.switch()
        await asyncio.sleep(0.5)
        outcome.rss_before_kb = rss_kb(pid)
        readers = await connect(port, count)
        await asyncio.sleep(0.5)
        outcome.rss_with_kb = rss_kb(pid)
        try:
            outcome.plain = await measured(switcher, readers, switches, pid)
            outcome.events = len(outcome.plain.latencies) // max(1, count)
            sock = stalled_socket(port)
            try:
                while outcome.prefill_switches < PREFILL_SWITCHES:
                    outcome.prefill_switches += 1
                    job = await switcher.switch()
                    await within(all_have(readers, job), "delivering the prefill")
                    await asyncio.sleep(0.05)
                    if stuck(sock, port) is not None:
                        break
                outcome.stalled = await measured(switcher, readers, switches, pid)
                held = stuck(sock, port)
                outcome.stuck_bytes = held or 0
                mine = sock.getsockname()[1]
                outcome.stalled_dropped = kernel_queues(port, mine) is None
            finally:
                sock.close()
        finally:
            for reader in readers:
                reader.close()
    return outcome


def run(count: int, switches: int) -> Outcome:
    models = {name: {"cmd": ENGINE, "size_gb": MODEL_GB} for name in MODELS}
    with tempfile.TemporaryDirectory() as folder:
        process, url = start_switchd(Path(folder), models)
        try:
            return run_async(run_round(url, process.pid, count, switches))
        finally:
            stop(process)


def run_async(main: Coroutine[Any, Any, Outcome]) -> Outcome:
    return uvloop.run(main)


def table(outcomes: list[Outcome]) -> list[str]:
    rows = [
        "| subscribers | events each | p50 ms | p99 ms | max ms | all have it, p50 ms "
        "| switchd CPU per delivery, us | CPU busy, switchd / client | RSS per subscriber, KiB "
        "| one stalled: p50 ms | p99 ms | max ms | stalled: switches to fill, bytes held "
        "| missed |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for o in outcomes:
        plain, stalled = o.plain, o.stalled
        p50, p99, top, last = plain.cells()
        s50, s99, smax, _ = stalled.cells()
        busy = (
            f"{plain.switchd_cpu / plain.seconds:.0%} / {plain.client_cpu / plain.seconds:.0%}"
            if plain.seconds
            else "-"
        )
        held = f"{o.prefill_switches}, {o.stuck_bytes:,}" + (
            " (dropped)" if o.stalled_dropped else ""
        )
        rows.append(
            f"| {o.subscribers} | {o.events} | {p50} | {p99} | {top} | {last} "
            f"| {plain.cpu_per_delivery_us()} | {busy} | {o.per_subscriber_kb:.1f} "
            f"| {s50} | {s99} | {smax} | {held} | {plain.missed + stalled.missed} |"
        )
    return rows


def meaning(outcomes: list[Outcome]) -> str:
    biggest = outcomes[-1]
    plain, stalled = biggest.plain, biggest.stalled
    if not plain.latencies or not stalled.latencies:
        return "Means: no deliveries were measured."
    return (
        f"Means: with {biggest.subscribers} dashboards or collectors on `/v1/events`, a "
        f"switch's progress reaches each in {percentile(plain.latencies, 0.5):.0f} ms "
        f"(p99 {percentile(plain.latencies, 0.99):.0f} ms); each open stream costs switchd "
        f"about {biggest.per_subscriber_kb:.0f} KiB; a reader that stops reading leaves the "
        f"others at p99 {percentile(stalled.latencies, 0.99):.0f} ms."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100 and 300 subscribers, 3 switches")
    parser.add_argument("--subscribers", type=int, nargs="+", help="the N to measure")
    parser.add_argument("--switches", type=int, help="measured switches per round")
    args = parser.parse_args()
    counts: tuple[int, ...] = tuple(
        args.subscribers or (QUICK_SUBSCRIBERS if args.quick else SUBSCRIBERS)
    )
    switches: int = args.switches or (3 if args.quick else 5)
    raise_open_files(2 * max(counts) + 256)  # the readers, and switchd's side (inherited)
    outcomes = []
    for count in counts:
        print(f"fan-out: {count} subscribers", file=sys.stderr)
        outcomes.append(run(count, switches))
    print(heading("## Event fan-out (`/v1/events`)", "bench.fanout"))
    print(
        f"Each N: a fresh switchd, N raw-socket subscribers, {switches} switches between "
        "two stand-in engines that do not fit together. Delivery latency = arrival of an "
        "event's last byte at a subscriber minus the event's `ts` (switchd's clock when it "
        "published it; ms resolution, so up to 1 ms high), over every event with a `ts` "
        "and every subscriber; 'all have it' = per event, the slowest subscriber; CPU: "
        "switchd's CPU seconds in the round over its deliveries, and each process's CPU "
        "over the round's wall time (100% = one core). "
        "'one stalled': the same with one more subscriber that never reads (4 KiB "
        "receive buffer), after switches filled its kernel queues.\n"
    )
    print("\n".join(table(outcomes)))
    print()
    print(meaning(outcomes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
