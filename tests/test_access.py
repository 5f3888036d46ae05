"""The request line: credentials in a query string are refused and never logged."""

from __future__ import annotations

import logging

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from switchd.access import RequestLine, credential_names, masked_query


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
