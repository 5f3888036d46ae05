"""The proxy in-process, for what a real engine cannot easily be made to do.

switchd runs under a real uvicorn on a free port, with a FakeRuntime whose
engines are raw TCP servers in the test: each records the requests it gets
and answers with exactly the bytes a test writes (a 422, a stream cut off
mid-event, a connection dropped). Health checks go through an httpx
MockTransport that follows the FakeRuntime's load times.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.types import Message
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from switchd.app import create_app
from switchd.config import ModelSpec, Settings
from switchd.gpu import SimulatedGpu
from switchd.protocol import CLIENT_STATE, ClientState, server_protocol
from switchd.proxy import first_of
from switchd.routes import Services
from switchd.runtime.base import EngineInfo
from tests import fakes
from tests.fakes import FakeRuntime

CHAT = "/v1/chat/completions"
CLIENT_KEY = "client-key"
ENGINE_KEY = "engine-secret"
MODELS: dict[str, Any] = {
    "gpt-oss-20b": {"cmd": "engine", "size_gb": 24, "aliases": ["20b"], "api_key": ENGINE_KEY},
    "mistral-7b-v0.1": {"cmd": "engine", "size_gb": 18},
}
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def make_settings(tmp_path: Path, **extra: Any) -> Settings:
    return fakes.make_settings(tmp_path, MODELS, **extra)


def chat(model: str, text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def closed_port() -> int:
    """A port that nothing listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# ---- a raw engine ------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """One request as it arrived at the engine, headers in their order."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    @property
    def names(self) -> set[str]:
        return {key.lower() for key, _ in self.headers}


# Writes the whole answer; returns False to close the connection afterwards.
Responder = Callable[[Received, asyncio.StreamWriter], Awaitable[bool]]


def response_bytes(status: str, body: bytes, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"content-length: {len(body)}"]
    lines += [f"{key}: {value}" for key, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def answer_json(received: Received, writer: asyncio.StreamWriter) -> bool:
    """The default engine: 200 with a small JSON answer naming what it got."""
    body = json.dumps({"object": "chat.completion", "path": received.target}).encode()
    writer.write(response_bytes("200 OK", body, (("content-type", "application/json"),)))
    await writer.drain()
    return True


@dataclass
class RawEngines:
    """One raw HTTP server per model, answering with `respond`; every request is kept."""

    respond: Responder = answer_json
    received: list[Received] = field(default_factory=list)
    _servers: dict[str, asyncio.Server] = field(default_factory=dict)

    def port(self, model: str) -> int:
        port: int = self._servers[model].sockets[0].getsockname()[1]
        return port

    async def start(self, model: str) -> str:
        self._servers[model] = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.port(model)}"

    async def close(self) -> None:
        for server in self._servers.values():
            server.close()
        for server in self._servers.values():
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                request_line, *lines = head.removesuffix("\r\n\r\n").split("\r\n")
                method, target, _ = request_line.split(" ", 2)
                headers = tuple(
                    (key.strip(), value.strip())
                    for key, value in (line.split(":", 1) for line in lines)
                )
                length = sum(int(v) for k, v in headers if k.lower() == "content-length")
                received = Received(method, target, headers, await reader.readexactly(length))
                self.received.append(received)
                if not await self.respond(received, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the proxy closed the connection
        finally:
            writer.close()


@dataclass
class EngineRuntime(FakeRuntime):
    """A FakeRuntime whose engines answer at the URLs of test servers."""

    urls: dict[str, str] = field(default_factory=dict)

    async def start(self, spec: ModelSpec, devices: tuple[int, ...] | None = None) -> EngineInfo:
        info = await super().start(spec, devices)
        return dataclasses.replace(info, url=self.urls[spec.name])

    def health(self) -> httpx.MockTransport:
        """200 on /health once a model's load time has passed, else 503."""
        models = {httpx.URL(url).port: model for model, url in self.urls.items()}

        def handle(request: httpx.Request) -> httpx.Response:
            ready_at = self.ready_at.get(models.get(request.url.port, ""))
            if ready_at is not None and time.monotonic() >= ready_at:
                return httpx.Response(200, json={"status": "ok"})
            return httpx.Response(503, json={"status": "loading"})

        return httpx.MockTransport(handle)


@dataclass
class Running:
    http: httpx.AsyncClient
    engine: RawEngines
    runtime: EngineRuntime
    services: Services

    async def in_flight(self, model: str) -> int:
        status = (await self.http.get("/v1/models/status")).json()
        count: int = status["models"][model]["in_flight"]
        return count


@contextlib.asynccontextmanager
async def serve(
    settings: Settings,
    respond: Responder = answer_json,
    runtime: EngineRuntime | None = None,
    unreachable: frozenset[str] = frozenset(),
) -> AsyncIterator[Running]:
    """switchd under a real uvicorn on a free port, each model's engine a raw server,
    except those in `unreachable`, whose URL has nothing listening."""
    engine = RawEngines(respond)
    runtime = runtime or EngineRuntime()
    for model in settings.models:
        if model in unreachable:
            runtime.urls[model] = f"http://127.0.0.1:{closed_port()}"
        else:
            runtime.urls[model] = await engine.start(model)
    app: Starlette = create_app(
        settings,
        runtime=runtime,
        gpu=SimulatedGpu(settings.simulated_gpu),
        http_transport=runtime.health(),
    )
    # The protocol `switchd serve` runs, so its writes are the ones tested.
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", http=server_protocol(30)
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                assert not task.done(), "uvicorn stopped at start"
                await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        services: Services = app.state.services
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            yield Running(http, engine, runtime, services)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        await engine.close()


async def die_mid_answer(
    writer: asyncio.StreamWriter, content_type: str, pieces: tuple[bytes, ...]
) -> bool:
    """An engine that starts a chunked 200 answer, sends `pieces`, then dies."""
    head = f"HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\n"
    writer.write(f"{head}transfer-encoding: chunked\r\n\r\n".encode())
    for piece in pieces:
        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        await writer.drain()
        await asyncio.sleep(0.05)
    writer.transport.abort()
    return False


def openai_error(message: str, kind: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": code}}


# ---- the engine fails ----------------------------------------------------------------------


async def test_engine_unreachable_is_502(tmp_path: Path) -> None:
    unreachable = frozenset({"gpt-oss-20b"})
    async with serve(make_settings(tmp_path), unreachable=unreachable) as running:
        response = await running.http.post(CHAT, json=chat("gpt-oss-20b"))
        assert response.status_code == 502
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert body == openai_error(body["error"]["message"], "server_error", "engine_unreachable")
        assert body["error"]["message"].startswith("gpt-oss-20b did not answer: ")
        assert await running.in_flight("gpt-oss-20b") == 0
        metrics = (await running.http.get("/metrics")).text
        assert 'switchd_requests_total{code="502",model="gpt-oss-20b"} 1.0' in metrics


async def test_engine_dropping_the_connection_unanswered_is_502(tmp_path: Path) -> None:
    async def hang_up(received: Received, writer: asyncio.StreamWriter) -> bool:
        return False  # closes the connection without a byte of answer

    async with serve(make_settings(tmp_path), hang_up) as running:
        response = await running.http.post(CHAT, json=chat("gpt-oss-20b"))
        assert response.status_code == 502
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "engine_unreachable")
        assert await running.in_flight("gpt-oss-20b") == 0


async def test_engine_dying_mid_stream_ends_with_an_error_event_after_the_whole_events(
    tmp_path: Path,
) -> None:
    async def die(received: Received, writer: asyncio.StreamWriter) -> bool:
        if json.loads(received.body).get("stream") is not True:
            return await answer_json(received, writer)
        # Two whole events and half of a third, cut across chunks; then the engine dies.
        pieces = (b'data: {"n": 1}\n\ndata: {"n"', b': 2}\n\ndata: {"n": 3, "te')
        return await die_mid_answer(writer, "text/event-stream", pieces)

    async with serve(make_settings(tmp_path), die) as running:
        body = chat("gpt-oss-20b", stream=True)
        async with asyncio.timeout(5):  # no hang
            async with running.http.stream("POST", CHAT, json=body) as response:
                assert response.status_code == 200
                assert response.headers["content-type"] == "text/event-stream"
                assert response.headers["x-accel-buffering"] == "no"
                chunks = [chunk async for chunk in response.aiter_raw()]
        # Exactly the two whole events, each as soon as it was whole; no half event;
        # then an OpenAI-shaped error, so that no client takes the answer for whole.
        assert chunks[:2] == [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n']
        assert len(chunks) == 3
        assert chunks[2].endswith(b"\n\n")
        assert json.loads(chunks[2].removeprefix(b"data: ")) == openai_error(
            "gpt-oss-20b stopped in the middle of this answer; it is incomplete",
            "server_error",
            "engine_died",
        )
        assert await running.in_flight("gpt-oss-20b") == 0
        # The next request goes through as usual.
        response = await running.http.post(CHAT, json=chat("gpt-oss-20b"))
        assert response.status_code == 200
        assert response.json() == {"object": "chat.completion", "path": CHAT}


async def test_engine_dying_after_its_headers_before_any_body_is_a_502(tmp_path: Path) -> None:
    async def die(received: Received, writer: asyncio.StreamWriter) -> bool:
        if json.loads(received.body)["messages"][0]["content"] != "die":
            return await answer_json(received, writer)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 50\r\n\r\n"
        )
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()
        return False

    async with serve(make_settings(tmp_path), die) as running:
        clients = [chat("gpt-oss-20b", "die"), chat("gpt-oss-20b"), chat("gpt-oss-20b", "die")]
        responses = await asyncio.gather(*(running.http.post(CHAT, json=c) for c in clients))
        # Nothing was sent yet: the client gets a whole error, not a 200 cut short.
        assert [r.status_code for r in responses] == [502, 200, 502]
        for response in (responses[0], responses[2]):
            error = response.json()["error"]
            assert (error["type"], error["code"]) == ("server_error", "engine_died")
            assert error["message"].startswith(
                "gpt-oss-20b stopped before the body of its answer: "
            )
        assert responses[1].json() == {"object": "chat.completion", "path": CHAT}
        assert await running.in_flight("gpt-oss-20b") == 0
        metrics = (await running.http.get("/metrics")).text
        assert 'switchd_requests_total{code="502",model="gpt-oss-20b"} 2.0' in metrics


async def test_engine_dying_mid_json_answer_leaves_it_visibly_cut_short(tmp_path: Path) -> None:
    async def die(received: Received, writer: asyncio.StreamWriter) -> bool:
        if json.loads(received.body)["messages"][0]["content"] != "die":
            return await answer_json(received, writer)
        pieces = (b'{"object": "chat.completion", "choices": [{"mess',)
        return await die_mid_answer(writer, "application/json", pieces)

    async with serve(make_settings(tmp_path), die) as running:
        async with asyncio.timeout(5):
            with pytest.raises(httpx.RemoteProtocolError):
                # Half a JSON body must not end like a whole one: no final chunk.
                await running.http.post(CHAT, json=chat("gpt-oss-20b", "die"))
        assert await running.in_flight("gpt-oss-20b") == 0
        metrics = (await running.http.get("/metrics")).text
        assert 'switchd_requests_total{code="502",model="gpt-oss-20b"} 1.0' in metrics
        response = await running.http.post(CHAT, json=chat("gpt-oss-20b"))
        assert response.status_code == 200


# ---- what is forwarded ----------------------------------------------------------------------


async def test_hop_by_hop_and_client_authorization_stay_behind(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, api_keys=[CLIENT_KEY])
    async with serve(settings) as running:
        headers = {
            "Authorization": f"Bearer {CLIENT_KEY}",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Trailer": "X-Checksum",
            "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
            "Proxy-Connection": "keep-alive",
            "X-Request-Id": "abc-123",
            "OpenAI-Organization": "org-1",
        }
        for model in ("20b", "mistral-7b-v0.1"):
            response = await running.http.post(CHAT, json=chat(model), headers=headers)
            assert response.status_code == 200, response.text

        with_key, without_key = running.engine.received
        for received in (with_key, without_key):
            assert not received.names & HOP_BY_HOP
            assert received.header("x-request-id") == ["abc-123"]
            assert received.header("openai-organization") == ["org-1"]
            assert received.header("content-type") == ["application/json"]
            assert received.header("content-length") == [str(len(received.body))]
            assert received.method == "POST"
        assert with_key.header("host") == [f"127.0.0.1:{running.engine.port('gpt-oss-20b')}"]
        assert without_key.header("host") == [f"127.0.0.1:{running.engine.port('mistral-7b-v0.1')}"]
        # The model's own key replaces the client's; a model without one gets none.
        assert with_key.header("authorization") == [f"Bearer {ENGINE_KEY}"]
        assert without_key.header("authorization") == []


async def test_headers_named_in_connection_stay_behind(tmp_path: Path) -> None:
    async with serve(make_settings(tmp_path)) as running:
        headers = {"Connection": "keep-alive, X-Hop-Secret", "X-Hop-Secret": "for-the-proxy"}
        response = await running.http.post(CHAT, json=chat("gpt-oss-20b"), headers=headers)
        assert response.status_code == 200
        (received,) = running.engine.received
        assert received.header("x-hop-secret") == []


async def test_a_clients_expect_100_continue_does_not_hold_the_body_back(
    tmp_path: Path,
) -> None:
    async with serve(make_settings(tmp_path)) as running:
        # curl sends this for large bodies; the server in front already answered it.
        headers = {"Expect": "100-continue"}
        response = await running.http.post(
            CHAT, json=chat("gpt-oss-20b"), headers=headers, timeout=1.5
        )
        assert response.status_code == 200
        (received,) = running.engine.received
        assert received.header("expect") == []


async def test_alias_rewrites_the_body_and_a_model_name_leaves_it_alone(tmp_path: Path) -> None:
    async with serve(make_settings(tmp_path)) as running:
        body = chat("20b", "x", temperature=0.5)
        response = await running.http.post(CHAT, json=body)
        assert response.status_code == 200
        # A request naming the model itself is passed on byte for byte.
        raw = b'{"model":"gpt-oss-20b",  "input":"keep  my   spacing"}'
        response = await running.http.post("/v1/embeddings", content=raw)
        assert response.status_code == 200
        rewritten, untouched = running.engine.received
        assert json.loads(rewritten.body) == {**body, "model": "gpt-oss-20b"}
        assert rewritten.header("content-length") == [str(len(rewritten.body))]
        assert untouched.body == raw


async def test_path_and_query_string_are_preserved(tmp_path: Path) -> None:
    async with serve(make_settings(tmp_path)) as running:
        target = "/v1/embeddings?x=1&y=a%20b&api-version=2024-02-01"
        response = await running.http.post(target, json={"model": "gpt-oss-20b", "input": "x"})
        assert response.status_code == 200
        response = await running.http.post(
            "/v1/audio/transcriptions", json={"model": "mistral-7b-v0.1"}
        )
        assert response.status_code == 200
        first, second = running.engine.received
        assert first.target == target
        assert second.target == "/v1/audio/transcriptions"


async def test_the_engines_status_headers_and_body_are_passed_through(tmp_path: Path) -> None:
    error = b'{"object":"error","message":"max_tokens is too large","code":422}'

    async def refuse(received: Received, writer: asyncio.StreamWriter) -> bool:
        headers = (
            ("content-type", "application/json"),
            ("x-engine", "vllm"),
            ("server", "engine-server"),
            ("date", "Thu, 01 Jan 1970 00:00:00 GMT"),
        )
        writer.write(response_bytes("422 Unprocessable Entity", error, headers))
        await writer.drain()
        return True

    async with serve(make_settings(tmp_path), refuse) as running:
        response = await running.http.post(CHAT, json=chat("gpt-oss-20b", max_tokens=10**9))
        assert response.status_code == 422
        assert response.content == error
        assert response.headers["content-type"] == "application/json"
        assert response.headers.get_list("content-length") == [str(len(error))]
        assert response.headers["x-engine"] == "vllm"
        # The server in front sets these itself; the engine's copies are not duplicated.
        assert response.headers.get_list("server") == ["uvicorn"]
        assert len(response.headers.get_list("date")) == 1
        assert response.headers["date"] != "Thu, 01 Jan 1970 00:00:00 GMT"
        metrics = (await running.http.get("/metrics")).text
        assert 'switchd_requests_total{code="422",model="gpt-oss-20b"} 1.0' in metrics


async def test_without_the_api_key_a_proxied_request_is_401(tmp_path: Path) -> None:
    runtime = EngineRuntime()
    async with serve(make_settings(tmp_path, api_keys=[CLIENT_KEY]), runtime=runtime) as running:
        expected = openai_error(
            "Missing or invalid API key: send 'Authorization: Bearer KEY'",
            "authentication_error",
            "invalid_api_key",
        )
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": CLIENT_KEY}):
            response = await running.http.post(CHAT, json=chat("gpt-oss-20b"), headers=headers)
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == 'Bearer realm="switchd"'
            assert response.json() == expected
        # Nothing reached an engine, and nothing was loaded for it.
        assert running.engine.received == []
        assert runtime.calls == []
        response = await running.http.post(
            CHAT, json=chat("gpt-oss-20b"), headers={"Authorization": f"Bearer {CLIENT_KEY}"}
        )
        assert response.status_code == 200


# ---- a client that leaves -------------------------------------------------------------------


async def test_of_clients_waiting_for_a_load_those_who_leave_go_and_the_rest_are_served(
    tmp_path: Path,
) -> None:
    runtime = EngineRuntime(load_seconds={"gpt-oss-20b": 1.0})
    async with serve(make_settings(tmp_path), runtime=runtime) as running:

        async def ask(patience: float) -> int | str:
            try:
                response = await running.http.post(CHAT, json=chat("gpt-oss-20b"), timeout=patience)
            except httpx.ReadTimeout:
                return "left"
            return response.status_code

        outcomes = await asyncio.gather(ask(0.3), ask(10), ask(0.3), ask(10), ask(10))
        assert list(outcomes) == ["left", 200, "left", 200, 200]
        assert len(running.engine.received) == 3  # the two who left reached no engine
        assert await running.in_flight("gpt-oss-20b") == 0
        assert running.services.scheduler.waiting == 0
        metrics = (await running.http.get("/metrics")).text
        assert 'switchd_requests_total{code="499",model="gpt-oss-20b"} 2.0' in metrics
        assert 'switchd_requests_total{code="200",model="gpt-oss-20b"} 3.0' in metrics
        assert runtime.calls == ["start gpt-oss-20b"]


async def test_a_client_leaving_while_its_model_loads_frees_its_place(tmp_path: Path) -> None:
    runtime = EngineRuntime(load_seconds={"gpt-oss-20b": 1.5})
    async with serve(make_settings(tmp_path), runtime=runtime) as running:
        scheduler = running.services.scheduler
        with pytest.raises(httpx.ReadTimeout):
            await running.http.post(CHAT, json=chat("gpt-oss-20b"), timeout=0.4)
        async with asyncio.timeout(2):
            while scheduler.waiting:  # noqa: ASYNC110 - a plain counter, no event to wait on
                await asyncio.sleep(0.02)
        metrics = (await running.http.get("/metrics")).text
        assert 'switchd_waiting_requests{model="gpt-oss-20b"} 0.0' in metrics
        assert 'switchd_load_wait_seconds_count{model="gpt-oss-20b",outcome="gone"} 1.0' in metrics
        assert 'switchd_requests_total{code="499",model="gpt-oss-20b"} 1.0' in metrics
        assert running.engine.received == []
        # The load it started goes on, and the next request is served.
        response = await running.http.post(CHAT, json=chat("gpt-oss-20b"), timeout=10)
        assert response.status_code == 200
        assert runtime.calls == ["start gpt-oss-20b"]
        assert await running.in_flight("gpt-oss-20b") == 0


# ---- first_of: the work, or the client leaving, whichever comes first ----------------------


def quiet_protocol() -> HttpToolsProtocol:
    """As much of uvicorn's protocol as a ClientState uses outside a real connection."""
    flow = SimpleNamespace(resume_reading=lambda: None)
    return cast(HttpToolsProtocol, SimpleNamespace(flow=flow))


class Work:
    """Work that ends when told to, noting how it stopped."""

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.outcome = "running"

    async def run(self) -> None:
        try:
            await self.done.wait()
            self.outcome = "ended"
        except asyncio.CancelledError:
            self.outcome = "cancelled"
            raise


async def test_first_of_with_switchds_protocol_stops_the_work_of_clients_that_leave() -> None:
    works = [Work() for _ in range(4)]
    watches = [ClientState(quiet_protocol()) for _ in works]

    async def never() -> Message:
        raise AssertionError("switchd's protocol says when a client leaves, not receive()")

    calls = [
        asyncio.create_task(first_of(work.run(), {"extensions": {CLIENT_STATE: watch}}, never))
        for work, watch in zip(works, watches, strict=True)
    ]
    await asyncio.sleep(0.05)
    watches[1].left()
    watches[3].left()
    works[0].done.set()
    works[2].done.set()
    assert await asyncio.gather(*calls) == [True, False, True, False]
    assert [work.outcome for work in works] == ["ended", "cancelled", "ended", "cancelled"]
    assert all(not call.cancelling() for call in calls), "no cancel left counted"
    gone = ClientState(quiet_protocol())
    gone.left()
    unstarted = Work()
    assert await first_of(unstarted.run(), {"extensions": {CLIENT_STATE: gone}}, never) is False
    assert unstarted.outcome == "running", "a client gone already: the work never starts"


async def test_first_of_under_another_server_learns_of_a_leaving_client_from_receive() -> None:
    left = asyncio.Event()

    async def receive() -> Message:
        await left.wait()
        return {"type": "http.disconnect"}

    staying, leaving = Work(), Work()
    before = len(asyncio.all_tasks())
    stays = asyncio.create_task(first_of(staying.run(), {}, receive))
    leaves = asyncio.create_task(first_of(leaving.run(), {}, receive))
    await asyncio.sleep(0.05)
    staying.done.set()
    assert await stays is True
    left.set()
    assert await leaves is False
    assert (staying.outcome, leaving.outcome) == ("ended", "cancelled")
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == before, "no watcher task left behind"
