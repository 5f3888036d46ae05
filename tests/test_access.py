"""The request line: credentials in a query string are refused and never logged."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from switchd.access import RequestLine, credential_names, masked_query
from switchd.app import middleware
from tests.fakes import make_settings


async def echo(request: Request) -> Response:
    return PlainTextResponse(f"ok {request.url.query}")


def client() -> httpx.AsyncClient:
    app = Starlette(
        routes=[
            Route("/v1/models/status", echo),
            Route("/v1/chat/completions", echo, methods=["POST"]),
            Route("/v1/models/switch", echo, methods=["POST"]),
        ]
    )
    transport = httpx.ASGITransport(app=RequestLine(app))
    return httpx.AsyncClient(transport=transport, base_url="http://switchd.test")


@pytest.mark.parametrize(
    ("query", "names"),
    [
        (b"api_key=s", ["api_key"]),
        (b"API_KEY=s&stream=true", ["API_KEY"]),
        (b"access_token=s&token=t", ["access_token", "token"]),
        (b"key=", ["key"]),
        (b"target_model=m&stream=true&last_event_id=5", []),
        (b"api-version=2024-02-01", []),
    ],
)
def test_credential_names(query: bytes, names: list[str]) -> None:
    assert credential_names(query) == names


def test_masked_query() -> None:
    assert masked_query(b"api_key=sk-123&stream=true") == "api_key=***&stream=true"


async def test_a_key_in_the_query_is_refused_and_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="switchd.access"):
        async with client() as http:
            proxied = await http.post("/v1/chat/completions?api_key=sk-secret", json={})
            control = await http.get("/v1/models/status?token=sk-secret")
            fine = await http.get("/v1/models/status?stream=true")
    assert proxied.status_code == 400
    assert proxied.json()["error"]["code"] == "credentials_in_query"
    assert proxied.json()["error"]["type"] == "invalid_request_error"
    assert control.status_code == 400
    assert control.json()["error"] == "credentials_in_query"
    assert (fine.status_code, fine.text) == (200, "ok stream=true")
    assert "sk-secret" not in caplog.text
    lines = [r.getMessage() for r in caplog.records if r.name == "switchd.access"]
    assert len(lines) == 3
    assert '"POST /v1/chat/completions?api_key=***" 400' in lines[0]
    assert '"GET /v1/models/status?stream=true" 200' in lines[2]


@pytest.mark.parametrize(
    "query",
    [
        b"api_token=s",
        b"x-api-key=s",
        b"access-token=s",
        b"client_secret=s",
        b"sk=s",
        b"apiKey=s",
        b"authToken=s",
        b"user.password=s",
        b"X-Auth=s",
    ],
)
def test_names_that_look_like_secrets_are_credentials(query: bytes) -> None:
    assert credential_names(query) == [query.decode().split("=")[0]]


@pytest.mark.parametrize(
    "query",
    [b"max_tokens=5", b"monkey=1", b"skip=1", b"task=s", b"keyboard=1", b"author=me", b"passage=1"],
)
def test_names_that_only_contain_a_secret_word_are_not(query: bytes) -> None:
    assert credential_names(query) == []


def test_a_secret_looking_name_is_masked_in_the_log_line() -> None:
    assert (
        masked_query(b"x-api-key=sk-1&client_secret=c&n=2") == "x-api-key=***&client_secret=***&n=2"
    )


def keyed_client(secrets: frozenset[str]) -> httpx.AsyncClient:
    app = Starlette(
        routes=[
            Route("/v1/models/status", echo),
            Route("/v1/chat/completions", echo, methods=["POST"]),
        ]
    )
    transport = httpx.ASGITransport(app=RequestLine(app, secrets=secrets))
    return httpx.AsyncClient(transport=transport, base_url="http://switchd.test")


@pytest.mark.parametrize("name", ["q", "api_tokn", "x", "filter"])
async def test_a_configured_key_under_any_name_is_refused_and_never_logged(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="switchd.access"):
        async with keyed_client(frozenset({"sk-secret-1"})) as http:
            proxied = await http.post(f"/v1/chat/completions?{name}=sk-secret-1", json={})
            control = await http.get(f"/v1/models/status?{name}=Bearer%20sk-secret-1")
            fine = await http.get(f"/v1/models/status?{name}=other")
    assert proxied.status_code == 400
    assert proxied.json()["error"]["code"] == "credentials_in_query"
    assert control.status_code == 400
    assert fine.status_code == 200
    assert fine.text == f"ok {name}=other"
    assert "sk-secret-1" not in caplog.text
    assert f"{name}=***" in caplog.text


def test_the_app_refuses_its_own_keys_in_any_parameter(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        api_keys=["admin-k"],
        inference_keys=["infer-k"],
        read_keys=["read-k"],
        models={"m": {"cmd": "engine", "size_gb": 1, "api_key": "engine-k"}},
    )
    outermost = middleware(settings)[0]
    assert getattr(outermost.cls, "__name__", None) == "RequestLine"
    assert outermost.kwargs["secrets"] == frozenset({"admin-k", "infer-k", "read-k", "engine-k"})
