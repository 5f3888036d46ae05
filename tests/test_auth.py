"""BearerAuth: which requests pass, what a refusal looks like, and unbuffered streams."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from switchd.auth import BearerAuth, is_public

KEYS = ("key-one", "key-two")
TIMEOUT = 2.0

REFUSAL = {
    "error": {
        "message": "Missing or invalid API key: send 'Authorization: Bearer KEY'",
        "type": "authentication_error",
        "code": "invalid_api_key",
    }
}


async def echo(request: Request) -> Response:
    return PlainTextResponse(f"ok {request.url.path}")


def make_app(keys: Sequence[str]) -> BearerAuth:
    inner = Starlette(
        routes=[
            Route("/health", echo),
            Route("/", echo),
            Route("/favicon.ico", echo),
            Route("/static/{name:path}", echo),
            Route("/v1/models", echo),
            Route("/v1/chat/completions", echo, methods=["POST"]),
            Route("/healthz", echo),
        ]
    )
    return BearerAuth(inner, keys)


def client(app: ASGIApp) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url="http://switchd.test")


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/json"
    assert response.headers["www-authenticate"] == 'Bearer realm="switchd"'
    assert response.json() == REFUSAL
    assert int(response.headers["content-length"]) == len(response.content)


async def test_no_keys_lets_everything_through() -> None:
    async with client(make_app([])) as http:
        for path in ("/v1/models", "/health", "/static/app.js"):
            response = await http.get(path)
            assert (response.status_code, response.text) == (200, f"ok {path}")
        wrong = await http.get("/v1/models", headers={"Authorization": "Bearer nonsense"})
        assert wrong.status_code == 200


@pytest.mark.parametrize("path", ["/health", "/", "/favicon.ico", "/static/x", "/static/js/app.js"])
async def test_public_paths_need_no_key(path: str) -> None:
    async with client(make_app(KEYS)) as http:
        response = await http.get(path)
    assert (response.status_code, response.text) == (200, f"ok {path}")


@pytest.mark.parametrize("path", ["/v1/models", "/healthz", "/static"])
async def test_other_paths_need_a_key(path: str) -> None:
    async with client(make_app(KEYS)) as http:
        assert_refused(await http.get(path))


@pytest.mark.parametrize(
    "authorization",
    [
        None,  # no header at all
        "Bearer wrong-key",
        "Bearer key-one-and-more",
        "Bearer key-on",
        "Basic a2V5LW9uZTo=",
        "Basic key-one",
        "key-one",  # the key without the scheme
        "Token key-one",
        "Bearer",
        "Bearer ",
        "Bearerkey-one",
    ],
)
async def test_refused(authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with client(make_app(KEYS)) as http:
        assert_refused(await http.get("/v1/models", headers=headers))


@pytest.mark.parametrize(
    "authorization",
    ["Bearer key-one", "Bearer key-two", "bearer key-two", "BEARER key-one", "Bearer  key-one"],
)
async def test_any_configured_key_passes(authorization: str) -> None:
    async with client(make_app(KEYS)) as http:
        response = await http.get("/v1/models", headers={"Authorization": authorization})
    assert (response.status_code, response.text) == (200, "ok /v1/models")


async def test_post_with_a_body_is_refused_without_reaching_the_app() -> None:
    reached: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append(scope["path"])

    async with client(BearerAuth(app, KEYS)) as http:
        response = await http.post("/v1/chat/completions", json={"model": "m"})
    assert_refused(response)
    assert reached == []


async def test_only_the_first_authorization_header_counts() -> None:
    headers = [("Authorization", "Bearer wrong"), ("Authorization", "Bearer key-one")]
    async with client(make_app(KEYS)) as http:
        assert_refused(await http.get("/v1/models", headers=headers))


async def test_lifespan_passes_through_with_keys() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    middleware = BearerAuth(app, KEYS)

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        raise AssertionError(f"nothing should be sent: {message}")

    await middleware({"type": "lifespan"}, receive, send)
    assert seen == ["lifespan"]


def test_is_public() -> None:
    assert [is_public(p) for p in ("/health", "/", "/favicon.ico", "/static/a.css")] == [
        True,
        True,
        True,
        True,
    ]
    assert [is_public(p) for p in ("/health/", "/v1/events", "/static", "/statics/x")] == [
        False,
        False,
        False,
        False,
    ]


async def test_custom_exempt_rule() -> None:
    app = BearerAuth(make_app([]), KEYS, exempt=lambda path: path == "/v1/models")
    async with client(app) as http:
        assert (await http.get("/v1/models")).status_code == 200
        assert_refused(await http.get("/health"))


# --- streaming ---------------------------------------------------------------------------


async def test_streamed_response_passes_unbuffered() -> None:
    """The first chunk reaches the client before the second one is even produced."""
    second_may_go = asyncio.Event()
    produced: list[bytes] = []

    async def chunks() -> AsyncIterator[bytes]:
        produced.append(b"data: one\n\n")
        yield b"data: one\n\n"
        await second_may_go.wait()
        produced.append(b"data: two\n\n")
        yield b"data: two\n\n"

    async def stream(request: Request) -> Response:
        return StreamingResponse(chunks(), media_type="text/event-stream")

    app = BearerAuth(Starlette(routes=[Route("/v1/events", stream)]), KEYS)

    sent: asyncio.Queue[Message] = asyncio.Queue()
    disconnect = asyncio.Event()
    requested = False

    async def receive() -> Message:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await sent.put(message)

    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/v1/events",
        "raw_path": b"/v1/events",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"switchd.test"), (b"authorization", b"Bearer key-two")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }
    task = asyncio.create_task(app(scope, receive, send))
    try:
        start = await asyncio.wait_for(sent.get(), TIMEOUT)
        assert start["type"] == "http.response.start"
        assert start["status"] == 200

        first = await asyncio.wait_for(sent.get(), TIMEOUT)
        assert first == {"type": "http.response.body", "body": b"data: one\n\n", "more_body": True}
        assert produced == [b"data: one\n\n"]  # the second chunk does not exist yet
        assert sent.empty()

        second_may_go.set()
        second = await asyncio.wait_for(sent.get(), TIMEOUT)
        assert second == {"type": "http.response.body", "body": b"data: two\n\n", "more_body": True}
        end = await asyncio.wait_for(sent.get(), TIMEOUT)
        assert end == {"type": "http.response.body", "body": b"", "more_body": False}
        disconnect.set()
        await asyncio.wait_for(task, TIMEOUT)
    finally:
        disconnect.set()
        second_may_go.set()
        if not task.done():
            task.cancel()


async def test_refusal_body_is_one_json_message() -> None:
    sent: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("the app must not run")

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "path": "/v1/models", "headers": [(b"authorization", b"Basic x")]}
    await BearerAuth(app, KEYS)(scope, receive, send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 401
    assert json.loads(sent[1]["body"]) == REFUSAL
    assert sent[1].get("more_body", False) is False


@pytest.mark.parametrize("authorization", ["Bearer ", "Bearer", "Bearer    "])
async def test_an_empty_token_fails_even_against_an_empty_key(authorization: str) -> None:
    # The config refuses empty keys; the middleware must not rely on that.
    async with client(make_app(["", "key-one"])) as http:
        assert_refused(await http.get("/v1/models", headers={"Authorization": authorization}))
        assert_refused(await http.get("/v1/models"))
        ok = await http.get("/v1/models", headers={"Authorization": "Bearer key-one"})
        assert ok.status_code == 200


# ---- roles -------------------------------------------------------------------------------

ADMIN, INFERENCE, READ = "admin-key", "inference-key", "read-key"
ROLE_ROUTES = [
    ("GET", "/v1/models/status"),
    ("GET", "/v1/models"),
    ("GET", "/v1/events"),
    ("GET", "/metrics"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/models/switch"),
    ("POST", "/v1/models/unload"),
    # llama.cpp's model-management API: listing and events read, loads admin.
    ("GET", "/models"),
    ("GET", "/models/sse"),
    ("POST", "/models/load"),
    ("POST", "/models/unload"),
]
# What each role may do, route by route (in ROLE_ROUTES' order).
ALLOWED = {
    READ: [True, True, True, True, False, False, False, False, True, True, False, False],
    INFERENCE: [True, True, True, True, True, True, False, False, True, True, False, False],
    ADMIN: [True] * 12,
}


def role_app() -> BearerAuth:
    routes = [Route(path, echo, methods=[method]) for method, path in ROLE_ROUTES]
    return BearerAuth(
        Starlette(routes=routes), [ADMIN], inference_keys=[INFERENCE], read_keys=[READ]
    )


@pytest.mark.parametrize("key", [READ, INFERENCE, ADMIN])
async def test_each_role_may_do_what_it_is_for_and_no_more(key: str) -> None:
    async with client(role_app()) as http:
        for (method, path), allowed in zip(ROLE_ROUTES, ALLOWED[key], strict=True):
            response = await http.request(method, path, headers={"Authorization": f"Bearer {key}"})
            if allowed:
                assert (response.status_code, response.text) == (200, f"ok {path}"), (key, path)
            else:
                assert response.status_code == 403, (key, path)
                error = response.json()["error"]
                assert (error["type"], error["code"]) == (
                    "permission_error",
                    "insufficient_permissions",
                )
                assert "needs a key with the" in error["message"]


async def test_an_unknown_key_is_401_whatever_the_roles() -> None:
    async with client(role_app()) as http:
        response = await http.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert_refused(response)
