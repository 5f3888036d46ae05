"""Bounded resources and shutdown on a real switchd: slow bodies, the body budget, and
switch streams told why they end."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.integration.conftest import ServerFactory
from tests.integration.server import engine_cmd, read_events
from tests.integration.test_proxy import CHAT, chat

KIB = 1024


async def send_partly(port: int, declared: int, sent: int) -> asyncio.StreamReader:
    """A chat request whose body stops after `sent` of `declared` bytes; the connection
    stays open. Returns its reader, kept referenced by the caller."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % declared + b" " * sent
    )
    await writer.drain()
    reader.writer = writer  # type: ignore[attr-defined]  # closed with the reader's owner
    return reader


async def status_line(reader: asyncio.StreamReader, within: float = 5) -> bytes:
    return await asyncio.wait_for(reader.readline(), within)


async def test_a_body_that_stops_arriving_gets_408(make_server: ServerFactory) -> None:
    models = {"m": {"cmd": engine_cmd(0.2), "size_gb": 10}}
    server = make_server(models, body_read_timeout_seconds=0.5)
    reader = await send_partly(server.port, declared=100, sent=10)
    assert (await status_line(reader)).startswith(b"HTTP/1.1 408")


async def test_bodies_held_at_once_are_bounded_and_the_budget_comes_back(
    make_server: ServerFactory,
) -> None:
    models = {"m": {"cmd": engine_cmd(0.2), "size_gb": 10}}
    server = make_server(models, max_body_bytes=600 * KIB, max_buffered_body_bytes=1024 * KIB)
    holding = [await send_partly(server.port, 500 * KIB, 450 * KIB) for _ in range(2)]
    await asyncio.sleep(0.3)  # both bodies are being held: 900 KiB of 1,024
    third = await send_partly(server.port, 500 * KIB, 450 * KIB)
    head = await asyncio.wait_for(third.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 503"), head
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    body = json.loads(await asyncio.wait_for(third.readexactly(length), 5))
    assert body["error"]["code"] == "server_busy"
    for reader in holding:
        reader.writer.close()  # type: ignore[attr-defined]
    await asyncio.sleep(0.3)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        response = await http.post(CHAT, json=chat("m"))
    assert response.status_code == 200


async def test_a_switch_stream_hears_shutting_down_when_switchd_stops(
    make_server: ServerFactory,
) -> None:
    models = {"slow": {"cmd": engine_cmd(30), "size_gb": 10}}
    server = make_server(models)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        params = {"target_model": "slow", "stream": "true"}
        async with http.stream("POST", "/v1/models/switch", params=params) as response:
            assert response.status_code == 200
            collect = asyncio.create_task(read_events(response))
            await asyncio.sleep(1.0)  # loading now
            assert await asyncio.to_thread(server.stop) == 0
            events = [event for _, event in await collect]
    names = [event.name for event in events]
    assert "start" in names
    assert names[-1] == "error"
    assert events[-1].data["error"] == "shutting_down"
    assert events[-1].data["model"] == "slow"
