"""The proxy's client for engines, against raw servers that answer as engines can:
keep-alive, chunked, without a length, cut short, closing idle connections."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from switchd.upstream import HIGH_WATER, Origin, Upstream, UpstreamError

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
Answer = Callable[[bytes, Reader, Writer], Awaitable[bool]]


@dataclass
class RawServer:
    """Each connection: read a request (head and content-length body), `answer` it;
    the answer says whether the connection stays open for the next one."""

    answer: Answer
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def handle(self, reader: Reader, writer: Writer) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                if not await self.answer(request, reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.closed.set()


@contextlib.asynccontextmanager
async def raw_server(answer: Answer) -> AsyncIterator[tuple[RawServer, str]]:
    server = RawServer(answer)
    listening = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        listening.close()
        # The client has closed its connections: each handler ends on its own.
        _, stuck = await asyncio.wait(server.handlers, timeout=2) if server.handlers else ((), ())
        for handler in stuck:
            handler.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)


@contextlib.asynccontextmanager
async def client(idle_seconds: float = 4.0) -> AsyncIterator[Upstream]:
    upstream = Upstream(idle_seconds=idle_seconds, connect_seconds=2.0)
    try:
        yield upstream
    finally:
        await upstream.close()


def json_answer(body: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    return head % len(body) + body


def sends(data: bytes, *, keep: bool) -> Answer:
    """An answer of exactly `data`; the connection kept open or not."""

    async def answer(request: bytes, reader: Reader, writer: Writer) -> bool:
        writer.write(data)
        await writer.drain()
        return keep

    return answer


async def echo(request: bytes, reader: Reader, writer: Writer) -> bool:
    """The request's body back, with a length; the connection kept."""
    writer.write(json_answer(request.split(b"\r\n\r\n", 1)[1]))
    await writer.drain()
    return True


async def ask(upstream: Upstream, url: str, body: bytes = b'{"n": 1}') -> tuple[int, bytes]:
    response = await upstream.request(
        "POST", url, "/v1/chat/completions", [(b"content-type", b"application/json")], body
    )
    try:
        return response.status, await response.read()
    finally:
        response.release()


async def test_a_request_is_one_http11_message_and_its_answer_is_read_whole() -> None:
    async with raw_server(echo) as (server, url), client() as upstream:
        response = await upstream.request(
            "POST", url, "/v1/a%20b?x=1", [(b"x-request-id", b"abc")], b'{"model": "m"}'
        )
        assert response.status == 200
        assert response.header(b"content-type") == b"application/json"
        assert response.header(b"x-missing") is None
        assert await response.read() == b'{"model": "m"}'
        assert response.at_eof
        response.release()
    port = url.rsplit(":", 1)[1]
    assert server.requests == [
        b"POST /v1/a%20b?x=1 HTTP/1.1\r\nhost: 127.0.0.1:" + port.encode() + b"\r\n"
        b"x-request-id: abc\r\ncontent-length: 14\r\n\r\n"
        b'{"model": "m"}'
    ]


async def test_connections_are_kept_and_reused_by_many_requests_at_once() -> None:
    async with raw_server(echo) as (server, url), client() as upstream:
        for _ in range(3):  # rounds: the second and third reuse the first's connections
            bodies = [b'{"n": %d}' % n for n in range(20)]
            answers = await asyncio.gather(*(ask(upstream, url, body) for body in bodies))
            assert answers == [(200, body) for body in bodies]
        assert server.connections <= 20
        assert len(server.requests) == 60


async def test_a_chunked_answer_arrives_piece_by_piece_decoded() -> None:
    async def chunked(request: bytes, reader: Reader, writer: Writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
        writer.write(b"transfer-encoding: chunked\r\n\r\n")
        for n in range(3):
            piece = b"data: %d\n\n" % n
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.02)
        writer.write(b"0\r\n\r\n")
        return True

    async with raw_server(chunked) as (server, url), client() as upstream:
        for _ in range(2):
            response = await upstream.request("POST", url, "/v1/x", [], b"{}")
            assert response.is_event_stream()
            pieces = [piece async for piece in response.chunks()]
            response.release()
            assert b"".join(pieces) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
            assert len(pieces) == 3  # as they came, not gathered into one
        assert server.connections == 1


async def test_an_answer_without_a_length_ends_when_the_engine_closes() -> None:
    until_close = sends(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it", keep=False)
    async with raw_server(until_close) as (server, url), client() as upstream:
        assert await ask(upstream, url) == (200, b"all of it")
        assert await ask(upstream, url) == (200, b"all of it")
        assert server.connections == 2  # that connection could not be used again


async def test_an_answer_cut_short_raises_and_its_connection_is_not_reused() -> None:
    async def cut(request: bytes, reader: Reader, writer: Writer) -> bool:
        if b"die" not in request:
            return await echo(request, reader, writer)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhalf")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.transport.abort()
        return False

    async with raw_server(cut) as (_, url), client() as upstream:
        response = await upstream.request("POST", url, "/v1/x", [], b"die")
        assert response.status == 200
        pieces = response.chunks()
        assert await anext(pieces) == b"half"
        with pytest.raises(UpstreamError, match="the engine closed the connection"):
            await anext(pieces)
        response.release()
        results = await asyncio.gather(ask(upstream, url, b"ok1"), ask(upstream, url, b"ok2"))
        assert list(results) == [(200, b"ok1"), (200, b"ok2")]


async def test_an_engine_closing_without_answering_is_an_error() -> None:
    async def hang_up(request: bytes, reader: Reader, writer: Writer) -> bool:
        return False

    async with raw_server(hang_up) as (_, url), client() as upstream:
        with pytest.raises(UpstreamError, match="the engine closed the connection"):
            await ask(upstream, url)


async def test_nothing_listening_is_an_error_naming_where() -> None:
    async with raw_server(echo) as (_, url):
        pass  # closed: nothing listens there now
    async with client() as upstream:
        with pytest.raises(UpstreamError, match=r"could not connect to 127\.0\.0\.1:\d+"):
            await ask(upstream, url)


async def test_not_http_is_an_error() -> None:
    async with (
        raw_server(sends(b"SSH-2.0-OpenSSH_9.2\r\n\r\n", keep=True)) as (_, url),
        client() as upstream,
    ):
        with pytest.raises(UpstreamError, match=r"an answer that is not HTTP/1\.1"):
            await ask(upstream, url)


async def test_idle_connections_are_dropped_before_the_engine_would_close_them() -> None:
    async with raw_server(echo) as (server, url), client(idle_seconds=0.1) as upstream:
        assert await ask(upstream, url, b"1") == (200, b"1")
        assert await ask(upstream, url, b"2") == (200, b"2")
        assert server.connections == 1
        await asyncio.sleep(0.2)  # idle longer than idle_seconds
        assert await ask(upstream, url, b"3") == (200, b"3")
        assert server.connections == 2


async def test_a_connection_the_engine_closed_while_idle_is_not_used() -> None:
    async def once(request: bytes, reader: Reader, writer: Writer) -> bool:
        await echo(request, reader, writer)
        return False  # answered with keep-alive, then closed, as at an engine's idle timeout

    async with raw_server(once) as (server, url), client() as upstream:
        assert await ask(upstream, url, b"1") == (200, b"1")
        await server.closed.wait()
        await asyncio.sleep(0.05)  # the close reaches the client
        assert await ask(upstream, url, b"2") == (200, b"2")
        assert server.connections == 2


async def test_a_kept_connection_closed_unanswered_as_it_is_reused_is_tried_once_more() -> None:
    closed_once = False

    async def closes_when_reused(request: bytes, reader: Reader, writer: Writer) -> bool:
        nonlocal closed_once
        if b"second" in request and not closed_once:
            closed_once = True
            return False  # an idle timeout that fired just as the request came
        return await echo(request, reader, writer)

    async with raw_server(closes_when_reused) as (server, url), client() as upstream:
        assert await ask(upstream, url, b"first") == (200, b"first")
        assert await ask(upstream, url, b"second") == (200, b"second")
        assert server.connections == 2
        assert [request.endswith(b"second") for request in server.requests] == [
            False,
            True,
            True,
        ]


async def test_a_response_released_before_its_end_closes_its_connection() -> None:
    big = b"x" * 5_000_000  # more than one read: some of it is never read

    async with (
        raw_server(sends(json_answer(big), keep=True)) as (server, url),
        client() as upstream,
    ):
        response = await upstream.request("POST", url, "/v1/x", [], b"{}")
        await anext(response.chunks())
        assert not response.at_eof
        response.release()  # the client left: the rest is never read
        assert await ask(upstream, url) == (200, big)
        assert server.connections == 2


async def test_a_cancelled_request_closes_its_connection() -> None:
    answered = asyncio.Event()

    async def slow(request: bytes, reader: Reader, writer: Writer) -> bool:
        if b"slow" in request:
            await asyncio.sleep(0.3)
        await echo(request, reader, writer)
        answered.set()
        return True

    async with raw_server(slow) as (server, url), client() as upstream:
        waiting = asyncio.create_task(ask(upstream, url, b"slow"))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await server.closed.wait()  # the engine sees the connection go
        assert await ask(upstream, url, b"next") == (200, b"next")
        assert server.connections == 2


async def test_a_large_answer_read_slowly_pauses_reading_and_arrives_whole() -> None:
    big = bytes(range(256)) * 8192  # 2 MiB

    async with raw_server(sends(json_answer(big), keep=True)) as (_, url), client() as upstream:
        response = await upstream.request("POST", url, "/v1/x", [], b"{}")
        received = bytearray()
        most_held = 0
        async for piece in response.chunks():
            received += piece
            most_held = max(most_held, response._buffered)
            await asyncio.sleep(0.001)
        response.release()
        assert bytes(received) == big
        # Held at most the high-water mark and what arrived in one read past it.
        assert most_held <= HIGH_WATER + 256 * 1024


async def test_an_answer_before_the_engine_read_a_large_body_is_not_waited_past() -> None:
    done = asyncio.Event()

    async def refuse_unread(reader: Reader, writer: Writer) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the head only: the body stays unread
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 2\r\n\r\nno")
        await writer.drain()
        await done.wait()  # the connection stays open, its buffers full
        writer.close()

    listening = await asyncio.start_server(refuse_unread, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}"
    try:
        async with client() as upstream, asyncio.timeout(5):
            assert await ask(upstream, url, b"x" * 20_000_000) == (413, b"no")
    finally:
        done.set()
        listening.close()


def test_origins_from_engine_urls() -> None:
    assert Origin.parse("http://127.0.0.1:8000") == Origin(
        False, "127.0.0.1", 8000, "", b"127.0.0.1:8000"
    )
    assert Origin.parse("http://engine/") == Origin(False, "engine", 80, "", b"engine")
    assert Origin.parse("https://[::1]:9443/base/") == Origin(
        True, "::1", 9443, "/base", b"[::1]:9443"
    )
    with pytest.raises(ValueError, match="not an http"):
        Origin.parse("unix:///run/engine.sock")
