"""Every error answer switchd gives, in its three shapes, and the one way it is sent.

- OpenAI-shaped, on the routes an OpenAI client calls (the engines' and
  `GET /v1/models/{id}`) and inside their event streams, where the SDKs raise it
  as an APIError: `{"error": {"message", "type", "code"}}`.
- switchd-shaped, on switchd's own routes, with the figures behind the error:
  `{"status": "error", "error": code, "message", ...fields}`.
- llama.cpp-shaped, on llama.cpp's model-management routes (switchd.llamacpp_api),
  whose clients read its HTTP status as `code`: `{"error": {"code": 404, ...}}`.

`ErrorResponse` sends either as a plain ASGI answer (status, JSON, extra headers
such as Retry-After or WWW-Authenticate), from a route as from a middleware.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.responses import Response

from switchd.jobs import SwitchError

ECHOED_CHARACTERS = 200  # of what a client sent, at most, in an error's message
INVALID_REQUEST = "invalid_request_error"  # OpenAI's `type` for the client's mistakes
SERVER_ERROR = "server_error"  # and for switchd's or an engine's


def echoed(text: str, limit: int = ECHOED_CHARACTERS) -> str:
    """What a client sent, as an error may echo it: a 30 MB model name must not come
    back in full (nor fill the log)."""
    return text if len(text) <= limit else text[:limit] + "…"


def openai_body(message: str, code: str, kind: str = INVALID_REQUEST) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": code}}


def switchd_body(code: str, message: str, **fields: Any) -> dict[str, Any]:
    return {"status": "error", "error": code, "message": message, **fields}


def llamacpp_body(status: int, message: str) -> dict[str, Any]:
    kind = "not_found_error" if status == 404 else INVALID_REQUEST
    return {"error": {"code": status, "message": message, "type": kind}}


def kind_of(status: int) -> str:
    """The OpenAI `type` of an answer with this status."""
    return INVALID_REQUEST if status < 500 else SERVER_ERROR


def encode(body: Mapping[str, Any]) -> bytes:
    """json.dumps' defaults, as the OpenAI-shaped bodies always were (a client may
    compare an in-stream error event's bytes)."""
    return json.dumps(body).encode()


def openai_event(message: str, code: str, kind: str = SERVER_ERROR) -> bytes:
    """An OpenAI-shaped error as one event of an OpenAI stream (`data:` only)."""
    return b"data: " + encode(openai_body(message, code, kind)) + b"\n\n"


class ErrorResponse(Response):
    """An error body as a JSON answer; a plain ASGI app, from a route or a middleware
    (`await ErrorResponse(...)(scope, receive, send)`)."""

    def __init__(
        self, status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(encode(body), status, dict(headers or {}), "application/json")


def openai_error(
    status: int,
    code: str,
    message: str,
    kind: str = INVALID_REQUEST,
    headers: Mapping[str, str] | None = None,
) -> ErrorResponse:
    return ErrorResponse(status, openai_body(message, code, kind), headers)


def switchd_error(
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    **fields: Any,
) -> ErrorResponse:
    return ErrorResponse(status, switchd_body(code, message, **fields), headers)


def from_switch(error: SwitchError, *, openai: bool) -> ErrorResponse:
    """A job's or the scheduler's refusal, with its figures (switchd's shape) or as an
    OpenAI client reads it, and its Retry-After when trying again makes sense."""
    headers = retry_after(error.retry_after_seconds)
    if openai:
        kind = kind_of(error.http_status)
        return openai_error(error.http_status, error.code, error.message, kind, headers)
    return switchd_error(error.http_status, error.code, error.message, headers, **error.fields)


def retry_after(seconds: int | None) -> dict[str, str]:
    return {} if seconds is None else {"Retry-After": str(seconds)}
