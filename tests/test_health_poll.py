"""A transport error while an engine starts is "not ready yet": only the health
timeout or the engine's exit fails a load."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from switchd.config import ModelSpec
from switchd.events import EventBus
from switchd.gpu import SimulatedGpu
from switchd.jobs import SwitchError
from switchd.runtime.base import EngineInfo
from switchd.scheduler import Scheduler
from switchd.states import ModelState
from switchd.stats import LearnedStats
from tests.fakes import FakeRuntime, make_settings
from tests.test_scheduler import rig

MODELS = {"m": {"cmd": "engine", "size_gb": 20, "load_time_seconds": 1}}


def flaky(runtime: FakeRuntime, errors: list[Exception]) -> httpx.MockTransport:
    """The fake engines' health answers, after `errors` raised one per request."""
    healthy = runtime.transport()

    async def handle(request: httpx.Request) -> httpx.Response:
        if errors:
            raise errors.pop(0)
        return await healthy.handle_async_request(request)

    return httpx.MockTransport(handle)


async def test_transport_errors_while_polling_are_not_ready_yet(tmp_path: Path) -> None:
    runtime = FakeRuntime(default_load_seconds=0.3)
    errors: list[Exception] = [
        # What httpcore raised when a connection was reset as it was made.
        AttributeError("'NoneType' object has no attribute 'getpeername'"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        httpx.ReadError("[Errno 104] Connection reset by peer"),
        httpx.ConnectError("[Errno 111] Connection refused"),
        AttributeError("'NoneType' object has no attribute 'getpeername'"),
    ]
    settings = make_settings(tmp_path, MODELS)
    gpu = SimulatedGpu(settings.simulated_gpu)
    bus = EventBus()
    stats = LearnedStats(settings.state_dir)
    async with httpx.AsyncClient(transport=flaky(runtime, errors)) as http:
        scheduler = Scheduler(
            settings, runtime=runtime, gpu=gpu, ledger=gpu, bus=bus, stats=stats, http=http
        )
        await scheduler.start()
        try:
            job = scheduler.request_switch("m")
            await asyncio.wait_for(job.done.wait(), 10)
            assert job.error is None  # was: 500 internal_error ('getpeername')
            assert errors == []
            assert scheduler.records["m"].state is ModelState.RUNNING
        finally:
            await scheduler.close()
            await runtime.close()


@asynccontextmanager
async def resetting_engine() -> AsyncIterator[tuple[str, list[str]]]:
    """A health route that resets every other connection (SO_LINGER 0: an RST)."""
    seen: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append("reset" if len(seen) % 2 == 0 else "answered")
        sock = writer.get_extra_info("socket")
        if seen[-1] == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.close()


@dataclass
class Resetting(FakeRuntime):
    url: str = ""

    async def start(self, spec: ModelSpec, devices: tuple[int, ...] | None = None) -> EngineInfo:
        info = await super().start(spec, devices)
        return EngineInfo(info.model, info.instance, self.url, info.started_at, pid=info.pid)


async def test_an_engine_resetting_half_its_connections_still_loads(tmp_path: Path) -> None:
    async with resetting_engine() as (url, seen):
        runtime = Resetting(url=url)
        settings = make_settings(tmp_path, MODELS)
        gpu = SimulatedGpu(settings.simulated_gpu)
        stats = LearnedStats(settings.state_dir)
        async with httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0)) as http:
            scheduler = Scheduler(
                settings,
                runtime=runtime,
                gpu=gpu,
                ledger=gpu,
                bus=EventBus(),
                stats=stats,
                http=http,
            )
            await scheduler.start()
            try:
                for _ in range(3):  # a few switches, each polling through resets
                    job = scheduler.request_switch("m")
                    await asyncio.wait_for(job.done.wait(), 10)
                    assert job.error is None
                    unload = scheduler.request_unload("m")
                    await asyncio.wait_for(unload.done.wait(), 10)
                assert "reset" in seen
                assert "answered" in seen
            finally:
                await scheduler.close()
                await runtime.close()


async def test_only_the_health_timeout_fails_a_load_and_it_cools_down(tmp_path: Path) -> None:
    runtime = FakeRuntime(load_seconds={"m": 60.0})
    errors: list[Exception] = [httpx.RemoteProtocolError("reset")] * 1000
    settings = make_settings(tmp_path, MODELS, health_timeout_seconds=0.5)
    async with rig(settings, runtime) as r:
        r.scheduler.loader._http = httpx.AsyncClient(transport=flaky(runtime, errors))
        with pytest.raises(SwitchError) as failed:
            async with r.scheduler.serving("m"):
                raise AssertionError("served an engine that never answered")
        assert failed.value.code == "load_failed"
        assert failed.value.retry_after_seconds is not None
        assert r.scheduler.records["m"].failures == 1
        await r.scheduler.loader._http.aclose()
