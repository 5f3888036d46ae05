"""switchd's server protocol: slow headers cut off, one write per small answer,
connections with unsent bytes cut off, and clients that leave told of."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import tomllib
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import cast

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from switchd.protocol import (
    UVICORN_SUPPORTED,
    ClientState,
    ResponseTransport,
    client_state,
    server_protocol,
    uvicorn_problem,
)


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


@contextlib.asynccontextmanager
async def server(
    header_timeout: float, max_connections: int | None = None, app: ASGIApp | None = None
) -> AsyncIterator[int]:
    config = uvicorn.Config(
        app or Starlette(routes=[Route("/", hello)]),
        host="127.0.0.1",
        port=0,
        log_level="warning",
        http=server_protocol(header_timeout),
        limit_concurrency=max_connections,
    )
    running = uvicorn.Server(config)
    task = asyncio.create_task(running.serve())
    try:
        while not running.started:  # noqa: ASYNC110 - uvicorn has no started event
            await asyncio.sleep(0.01)
        yield running.servers[0].sockets[0].getsockname()[1]
    finally:
        running.should_exit = True
        await asyncio.wait_for(task, 10)


async def get(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


async def test_connections_that_never_finish_their_headers_are_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with server(header_timeout=0.5) as port:
        slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(30)]
        with caplog.at_level(logging.WARNING, logger="switchd.protocol"):
            for _, writer in slow:
                writer.write(b"GET / HTTP/1.1\r\n")
            for n in range(4):  # a header line now and then, never the blank line
                for _, writer in slow:
                    writer.write(b"x-slow-%d: 1\r\n" % n)
                await asyncio.sleep(0.2)
            closed = await asyncio.gather(
                *(asyncio.wait_for(reader.read(), 2) for reader, _ in slow)
            )
        assert closed == [b""] * 30, "every slow connection was closed by the server"
        assert "no complete request headers within 0.5 s" in caplog.text
        for _, writer in slow:
            writer.close()
        assert (await get(port)).startswith(b"HTTP/1.1 200")


async def test_past_the_connection_limit_requests_get_503() -> None:
    async with server(header_timeout=5, max_connections=3) as port:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert (await get(port)).startswith(b"HTTP/1.1 503")
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.1)
        assert (await get(port)).startswith(b"HTTP/1.1 200")


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.unsent = 0  # what the kernel has not taken (a reader that stopped reading)

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def abort(self) -> None:
        self.aborted = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "a write after close"
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


async def test_headers_leave_with_the_first_body_piece_in_one_write() -> None:
    real = RecordingTransport()
    transport = ResponseTransport(real, asyncio.get_running_loop())
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert real.writes == []  # held for the rest of this turn of the loop
    transport.write(b"body")
    transport.write(b"more")
    assert real.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"more"]
    await asyncio.sleep(0)  # the held headers' flush finds nothing left to send
    assert real.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"more"]


async def test_headers_alone_leave_at_the_end_of_the_loops_turn() -> None:
    real = RecordingTransport()
    transport = ResponseTransport(real, asyncio.get_running_loop())
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    await asyncio.sleep(0)  # a stream whose first piece is late: its headers go now
    assert real.writes == [b"HTTP/1.1 200 OK\r\n\r\n"]
    transport.write(b"data: 1\n\n")
    assert real.writes == [b"HTTP/1.1 200 OK\r\n\r\n", b"data: 1\n\n"]


async def test_close_sends_held_headers_first_and_nothing_goes_after() -> None:
    real = RecordingTransport()
    transport = ResponseTransport(real, asyncio.get_running_loop())
    transport.write(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
    transport.close()
    assert real.writes == [b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n"]
    assert real.closed
    assert transport.is_closing()
    await asyncio.sleep(0)
    assert len(real.writes) == 1


async def test_many_clients_get_whole_answers_through_the_server_protocol() -> None:
    async with server(header_timeout=5) as port:
        answers = await asyncio.gather(*(get(port) for _ in range(20)))
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"content-length: 5" in head
        assert body == b"hello"


async def test_closed_with_bytes_unsent_the_connection_is_cut_off_after_a_while() -> None:
    stalled, reading = RecordingTransport(), RecordingTransport()
    loop = asyncio.get_running_loop()
    for real in (stalled, reading):
        transport = ResponseTransport(real, loop, unsent_close_seconds=0.05)
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(b"data: 1\n\n")
        real.unsent = 4096  # both are slow to take it at first
        transport.close()
    reading.unsent = 0  # this one's reader takes the rest
    await asyncio.sleep(0.1)
    assert stalled.aborted
    assert not reading.aborted


async def test_a_connection_whose_requests_keep_coming_stays_and_a_late_one_is_closed() -> None:
    """One header timer per connection: quick requests over many times the timeout
    keep it, and the next request's headers, begun but never finished, close it."""
    async with server(header_timeout=0.4) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(8):  # 1.6 s in all, four times the timeout
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert await reader.readexactly(5) == b"hello"
            await asyncio.sleep(0.2)
        writer.write(b"GET / HTTP/1.1\r\n")  # and no more
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(reader.read(), 2) == b""
        assert asyncio.get_running_loop().time() - started < 1.0
        writer.close()


class Holding:
    """An app whose requests wait until released, each noting if its client left."""

    def __init__(self) -> None:
        self.left: list[str] = []
        self.watches: list[ClientState | None] = []
        self.release = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        name = scope["path"].strip("/")
        watch = client_state(scope)
        self.watches.append(watch)
        assert watch is not None
        watch.on_leave(lambda: self.left.append(name))
        try:
            await self.release.wait()
        finally:
            watch.on_leave(None)
        body = name.encode()
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def test_clients_that_leave_are_told_of_once_and_the_others_are_answered() -> None:
    app = Holding()
    async with server(header_timeout=5, app=app) as port:
        clients = []
        for n in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /c%d HTTP/1.1\r\nhost: x\r\n\r\n" % n)
            clients.append((reader, writer))
        async with asyncio.timeout(2):
            while len(app.watches) < 5:  # noqa: ASYNC110 - the app only counts
                await asyncio.sleep(0.01)
        for n in (1, 3):
            clients[n][1].close()
        async with asyncio.timeout(2):
            while len(app.left) < 2:  # noqa: ASYNC110 - the app only counts
                await asyncio.sleep(0.01)
        assert sorted(app.left) == ["c1", "c3"]
        app.release.set()
        for n in (0, 2, 4):
            reader, writer = clients[n]
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert await reader.readexactly(2) == b"c%d" % n
            writer.write(b"GET /again HTTP/1.1\r\nhost: x\r\n\r\n")  # same connection
            await asyncio.wait_for(reader.readuntil(b"again"), 2)
            writer.close()  # after its answer: a callback no longer asked for
        await asyncio.sleep(0.1)
        assert sorted(app.left) == ["c1", "c3"], "no one told of a client after its answer"
        assert [w.gone for w in app.watches[:5] if w is not None].count(True) == 5


class FakeFlow:
    def __init__(self) -> None:
        self.resumed = 0

    def resume_reading(self) -> None:
        self.resumed += 1


def test_a_client_state_calls_back_once_and_only_while_asked() -> None:
    calls: list[str] = []
    flow = FakeFlow()
    protocol = cast(HttpToolsProtocol, SimpleNamespace(flow=flow))
    state = ClientState(protocol)
    state.on_leave(lambda: calls.append("first"))
    assert flow.resumed == 1, "reading resumes, so that a leaving client is noticed"
    state.on_leave(None)
    state.left()
    assert calls == []
    assert state.gone
    later = ClientState(protocol)
    later.on_leave(lambda: calls.append("second"))
    later.left()
    later.left()
    assert calls == ["second"]


async def test_a_request_learns_whether_its_body_is_all_in() -> None:
    seen: dict[str, bool] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        state = client_state(scope)
        assert state is not None
        seen[scope["path"]] = state.body_arrived()
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def post(port: int, path: str, halves: bool) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n" % path.encode()
        if halves:  # the app starts with half the body in
            writer.write(head + b"01234")
            await asyncio.sleep(0.2)
            writer.write(b"56789")
        else:
            writer.write(head + b"0123456789")
        status = await asyncio.wait_for(reader.readline(), 2)
        writer.close()
        return status

    async with server(header_timeout=5, app=app) as port:
        statuses = await asyncio.gather(
            *(
                post(port, f"/{kind}-{n}", kind == "halves")
                for n in (1, 2)
                for kind in ("whole", "halves")
            )
        )
    assert all(status.startswith(b"HTTP/1.1 204") for status in statuses)
    assert seen == {"/whole-1": True, "/halves-1": False, "/whole-2": True, "/halves-2": False}


def test_dropping_a_client_closes_its_answer_and_tells_uvicorn_it_is_gone() -> None:
    answer, raw = RecordingTransport(), RecordingTransport()
    cycle = SimpleNamespace(disconnected=False, transport=answer)
    protocol = SimpleNamespace(cycle=cycle, pipeline=[], transport=raw, flow=FakeFlow())
    ClientState(cast(HttpToolsProtocol, protocol)).drop()
    assert cycle.disconnected, "so uvicorn logs no unfinished answer"
    assert answer.closed
    # Behind a pipelined request, `cycle` is not the answer's: the connection goes.
    queued = SimpleNamespace(disconnected=False, transport=RecordingTransport())
    protocol = SimpleNamespace(cycle=queued, pipeline=[queued], transport=raw, flow=FakeFlow())
    ClientState(cast(HttpToolsProtocol, protocol)).drop()
    assert raw.closed
    assert not queued.disconnected


class Connection:
    """A protocol stand-in that, like the real one, holds its ClientState."""

    def __init__(self) -> None:
        self.flow = FakeFlow()
        self.client = ClientState(cast(HttpToolsProtocol, self))


def test_a_client_that_left_keeps_nothing_of_its_connection_alive() -> None:
    connection = Connection()
    state = connection.client
    alive = weakref.ref(connection)
    state.left()
    gc.disable()  # freed by reference counts alone, not by a collection
    try:
        del connection
        assert alive() is None
    finally:
        gc.enable()
    assert not state.body_arrived()
    state.drop()  # nothing left to close
    state.on_leave(lambda: None)  # nor to resume


# ---- the uvicorn this protocol needs ------------------------------------------------


def test_the_installed_uvicorn_has_what_the_protocol_subclasses() -> None:
    assert uvicorn_problem() is None


def test_a_uvicorn_without_it_is_named_in_one_line_with_the_supported_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Lacking:  # an httptools protocol of another uvicorn: no shutdown() to override
        def connection_made(self) -> None: ...
        def connection_lost(self) -> None: ...
        def on_message_begin(self) -> None: ...
        def on_headers_complete(self) -> None: ...

    module = ModuleType("fake_httptools_impl")
    module.HttpToolsProtocol = Lacking  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_httptools_impl", module)
    installed = uvicorn.__version__
    assert uvicorn_problem("fake_httptools_impl") == (
        f"switchd needs uvicorn>=0.30,<0.56; the installed uvicorn {installed} has an "
        "HttpToolsProtocol without shutdown"
    )
    assert uvicorn_problem("no_such_uvicorn_module") == (
        f"switchd needs uvicorn>=0.30,<0.56; the installed uvicorn {installed} has no "
        "no_such_uvicorn_module (No module named 'no_such_uvicorn_module')"
    )


def test_the_supported_range_is_the_one_pyproject_pins() -> None:
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    assert f"uvicorn[standard]{UVICORN_SUPPORTED}" in dependencies
