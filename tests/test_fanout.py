"""`/v1/events` watchers and their one shared clock (switchd/fanout.py).

Each test serves real HTTP (uvicorn in this process) to several raw-socket
watchers at once: a small app of EventStreams on buses the test publishes to,
or switchd's own app. No figure of time is asserted: the clock is driven by
hand where what it decides matters, and short intervals only make waits short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry, Gauge
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from switchd.app import create_app
from switchd.config import SimulatedGpuSettings
from switchd.events import Event, EventBus
from switchd.fanout import EventStream, Shutdown
from switchd.gpu import SimulatedGpu
from switchd.protocol import server_protocol
from switchd.sse import PING
from tests.fakes import FakeRuntime, make_settings

WITHIN = 10.0  # seconds any one wait may take before the test fails
IDS = re.compile(rb"(?m)^id: (\d+)$")


class FakeTime:
    """The clock's time, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Watchers:
    """A small app serving `/events/{bus}` as switchd serves `/v1/events`."""

    def __init__(self, shutdown: Shutdown, ping_seconds: float, send_timeout_seconds: float):
        self.shutdown = shutdown
        self.buses: dict[str, EventBus] = {"busy": EventBus(), "idle": EventBus()}
        self.registry = CollectorRegistry()
        self.streams = Gauge("t_sse_streams", "open streams", registry=self.registry)
        self.ping_seconds = ping_seconds
        self.send_timeout_seconds = send_timeout_seconds

    def open_streams(self) -> float:
        value = self.registry.get_sample_value("t_sse_streams")
        assert value is not None
        return value

    async def events(self, request: Request) -> Response:
        bus = self.buses[request.path_params["bus"]]
        subscription = bus.subscribe()
        snapshot = Event(bus.last_id, "snapshot", {"bus": request.path_params["bus"]}).sse()
        return EventStream(
            subscription,
            snapshot,
            retry_milliseconds=3000,
            shutdown=self.shutdown,
            streams=self.streams,
            ping_seconds=self.ping_seconds,
            send_timeout_seconds=self.send_timeout_seconds,
        )

    def app(self) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            try:
                yield
            finally:
                self.shutdown.close()

        return Starlette(routes=[Route("/events/{bus}", self.events)], lifespan=lifespan)


@contextlib.asynccontextmanager
async def serving(
    app: Starlette, send_buffer: int | None = None
) -> AsyncIterator[tuple[int, uvicorn.Server]]:
    """`app` on a free port; `send_buffer`: the kernel's send buffer of every connection
    (set on the listening socket, which they inherit), so a reader that stops reading
    blocks switchd's writes after a few KiB instead of after the megabytes that Linux
    would otherwise buffer on loopback."""
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if send_buffer is not None:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    listening.bind(("127.0.0.1", 0))
    # The protocol `switchd serve` runs; a stalled connection is cut off 0.2 s after
    # its watcher is let go.
    config = uvicorn.Config(
        app,
        log_level="critical",
        timeout_graceful_shutdown=2,
        http=server_protocol(30, unsent_close_seconds=0.2),
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[listening]))
    try:
        async with asyncio.timeout(WITHIN):
            while not server.started:  # noqa: ASYNC110 - uvicorn has no started event
                await asyncio.sleep(0.01)
        yield server.servers[0].sockets[0].getsockname()[1], server
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, WITHIN)


class Reader:
    """A watcher that keeps reading: everything that arrives, kept as bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.received = b""
        self.arrived = asyncio.Event()
        self.task = asyncio.create_task(self._read(reader))

    @classmethod
    async def open(cls, port: int, path: str) -> Reader:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        watcher = cls(reader, writer)
        await watcher.until(lambda: b"event: snapshot" in watcher.received)
        return watcher

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while chunk := await reader.read(65536):
            self.received += chunk
            self.arrived.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(WITHIN):
            while not condition():
                self.arrived.clear()
                await self.arrived.wait()

    def body(self) -> bytes:
        """The stream's body so far: the chunks after the headers, their framing taken off."""
        rest = self.received.split(b"\r\n\r\n", 1)[1]
        body = b""
        while b"\r\n" in rest:
            size, after = rest.split(b"\r\n", 1)
            length = int(size, 16)
            if len(after) < length + 2:
                break
            body, rest = body + after[:length], after[length + 2 :]
        return body

    async def got(self, event: Event) -> None:
        """Until `event` has come."""
        await self.until(lambda: f"id: {event.id}\n".encode() in self.received)

    async def pinged(self, times: int) -> None:
        """Until `times` pings have come."""
        await self.until(lambda: self.pings() == times)

    def pings(self) -> int:
        return self.body().count(PING)

    def ids(self) -> list[int]:
        return [int(found) for found in IDS.findall(self.body())]

    async def close(self) -> None:
        self.writer.close()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await self.task


async def eventually(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WITHIN):
        while not condition():  # noqa: ASYNC110 - polls server state the test cannot await
            await asyncio.sleep(0.01)


async def test_idle_watchers_get_pings_and_a_busy_one_needs_none() -> None:
    time = FakeTime()
    # Its own task never ticks in this test; the test ticks it, at the times it sets.
    shutdown = Shutdown(clock_seconds=3600, clock=time)
    watchers = Watchers(shutdown, ping_seconds=10, send_timeout_seconds=30)
    async with serving(watchers.app()) as (port, _server):
        idle = [await Reader.open(port, "/events/idle") for _ in range(5)]
        busy = await Reader.open(port, "/events/busy")
        assert len(shutdown) == 6
        ticking = shutdown.ticking
        assert ticking is not None
        assert not ticking.done()
        for reader in [*idle, busy]:  # the snapshot first, with the retry hint in its block
            first = reader.body().split(b"\n\n")[0].split(b"\n")
            assert first[0].startswith(b"id: ")
            assert first[1] == b"event: snapshot"
            assert first[2].startswith(b"data: {")
            assert first[3:] == [b"retry: 3000"]
        for step in range(1, 11):  # 6 s of the clock's time a step: pings due every 10
            time.now += 6
            event = watchers.buses["busy"].publish("loading", {"step": step})
            await busy.got(event)
            shutdown.tick()
            # Idle since its last ping (or the snapshot) for 12 s at steps 2, 4, ...: a ping.
            for reader in idle:
                await reader.pinged(step // 2)
        # One ping per 10 s of quiet for the idle ones, none early; none for the busy one.
        assert [reader.pings() for reader in idle] == [5] * 5
        assert busy.pings() == 0
        assert busy.body().count(b'"step":') == 10
        for reader in [*idle, busy]:
            await reader.close()
        await eventually(lambda: len(shutdown) == 0)
        assert shutdown.ticking is None  # the last watcher gone, the clock stops
        await asyncio.wait([ticking], timeout=WITHIN)
        assert ticking.cancelled()


async def test_a_stalled_watcher_is_let_go_while_20_others_get_every_event_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    shutdown = Shutdown(clock_seconds=0.05)
    watchers = Watchers(shutdown, ping_seconds=3600, send_timeout_seconds=0.5)
    bus = watchers.buses["busy"]
    async with serving(watchers.app(), send_buffer=4096) as (port, server):
        # uvicorn's loggers do not reach the root logger, nor so caplog, by themselves.
        uvicorn_errors = logging.getLogger("uvicorn.error")
        uvicorn_errors.addHandler(caplog.handler)
        caplog.set_level(logging.ERROR, logger="uvicorn.error")  # after uvicorn set its own
        readers = [await Reader.open(port, "/events/busy") for _ in range(20)]
        # A watcher that never reads, with a small receive buffer.
        stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        stalled.connect(("127.0.0.1", port))
        stalled.sendall(b"GET /events/busy HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            await eventually(lambda: watchers.open_streams() == 21)
            first = bus.last_id + 1
            payload = "x" * 4096
            # Events for everyone, five at a time, each five read by the 20 before the
            # next, until the stalled one's write has been blocked long enough to be let
            # go (were the bus to drop it, that would not end a blocked write: the clock
            # does).
            while watchers.open_streams() == 21 and bus.last_id - first < 1000:
                for _ in range(5):
                    event = bus.publish("loading", {"payload": payload})
                for reader in readers:
                    await reader.got(event)
                await asyncio.sleep(0.02)
            assert watchers.open_streams() == 20, "the stalled watcher was let go"
            assert len(shutdown) == 20
            # Its connection too, though its reader never took what was sent.
            await eventually(lambda: len(server.server_state.connections) == 20)
            for _ in range(5):  # and the others go on
                event = bus.publish("loading", {"payload": "after"})
            for reader in readers:
                await reader.got(event)
                assert reader.ids()[1:] == list(range(first, event.id + 1))  # after the snapshot
                assert reader.pings() == 0
            # Let go on purpose: not an app that left its answer unfinished.
            assert "without completing response" not in caplog.text
        finally:
            uvicorn_errors.removeHandler(caplog.handler)
            stalled.close()
            for reader in readers:
                await reader.close()
        await eventually(lambda: watchers.open_streams() == 0)


async def test_the_clock_ends_when_the_app_stops(tmp_path: Path) -> None:
    app = create_app(
        make_settings(tmp_path), runtime=FakeRuntime(), gpu=SimulatedGpu(SimulatedGpuSettings())
    )
    async with serving(app) as (port, server):
        readers = [await Reader.open(port, "/v1/events") for _ in range(3)]
        shutdown: Shutdown = app.state.services.shutdown
        assert len(shutdown) == 3
        ticking = shutdown.ticking
        assert ticking is not None
        assert not ticking.done()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            metrics = (await http.get("/metrics")).text
        assert "switchd_sse_streams 3.0" in metrics
        server.should_exit = True  # the watchers still open: the app stops all the same
    await asyncio.wait([ticking], timeout=WITHIN)
    assert ticking.done()
    assert shutdown.ticking is None
    assert len(shutdown) == 0
    for reader in readers:
        await reader.close()
