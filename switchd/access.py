"""The request line: credentials never travel in it, and the access log is switchd's.

A key sent as `?api_key=` would be written to every access log on its way and
forwarded to an engine in the URL; switchd takes keys only in the
Authorization header, so such a request is refused (400) before it reaches
anything. A parameter is a credential when its name looks like one (a word of
it, split at `-`, `_`, `.` and camelCase, is `key`, `token`, `secret`, `sk`,
`auth`, `password`…: `x-api-key`, `client_secret`, `authToken`), or when its
value is one of the keys switchd is configured with, whatever its name.
uvicorn's own access log is off (`switchd serve` turns it off): this
middleware writes one line per request instead, with credential query values
masked, so not even the refused request puts a key in the log.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Collection
from urllib.parse import parse_qsl, urlencode

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from switchd import errors
from switchd.config import Settings
from switchd.errors import ErrorResponse
from switchd.proxy import is_engine_call

log = logging.getLogger("switchd.access")

CREDENTIAL_PARAMETERS = frozenset(
    {
        "api_key",
        "api-key",
        "apikey",
        "key",
        "access_token",
        "token",
        "auth",
        "authorization",
        "password",
        "secret",
        "bearer",
    }
)
# Words that make a parameter's name a credential's, wherever they stand in it.
SECRET_WORDS = frozenset(
    {
        "key",
        "apikey",
        "token",
        "secret",
        "password",
        "passwd",
        "pwd",
        "sk",
        "auth",
        "authorization",
        "bearer",
        "credential",
        "credentials",
    }
)
MASK = "***"
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")


def looks_secret(name: str) -> bool:
    """A name of the credential kind: `api_key`, or any with a secret word in it."""
    if name.lower() in CREDENTIAL_PARAMETERS:
        return True
    return any(word.lower() in SECRET_WORDS for word in _WORD.findall(name))


def _is_key(value: str, secrets: Collection[str]) -> bool:
    value = value.strip()
    if value[:7].lower() == "bearer ":
        value = value[7:].strip()
    return value in secrets


def credential_names(query: bytes, secrets: Collection[str] = ()) -> list[str]:
    """The names of the query's credentials: by their name, or by a value that is one
    of `secrets` (switchd's configured keys)."""
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    return sorted(
        {
            name
            for name, value in pairs
            if looks_secret(name) or (secrets and value and _is_key(value, secrets))
        }
    )


def masked_query(query: bytes, secrets: Collection[str] = ()) -> str:
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    return urlencode(
        [
            (name, MASK if looks_secret(name) or _is_key(value, secrets) else value)
            for name, value in pairs
        ],
        safe="*",
    )


def configured_secrets(settings: Settings) -> frozenset[str]:
    """Every key switchd knows: its own roles' and the engines'."""
    engines = (spec.api_key for spec in settings.models.values() if spec.api_key)
    return frozenset({*settings.api_keys, *settings.inference_keys, *settings.read_keys, *engines})


class RequestLine:
    """Pure ASGI: refuse credentials in the query; log each request, masked."""

    def __init__(self, app: ASGIApp, secrets: Collection[str] = frozenset()) -> None:
        self.app = app
        self._secrets = frozenset(secrets)  # keys refused under any name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        query = scope.get("query_string", b"")
        names = credential_names(query, self._secrets) if query else None
        if names:
            await refusal(names, openai=is_engine_call(scope))(scope, receive, send)
            self._log(scope, query, 400, started)
        elif log.isEnabledFor(logging.INFO):
            await self._logged(scope, receive, send, query, started)
        else:  # nothing to log: nothing to wrap every message in
            await self.app(scope, receive, send)

    async def _logged(
        self, scope: Scope, receive: Receive, send: Send, query: bytes, started: float
    ) -> None:
        status = 0

        async def recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording)
        finally:
            self._log(scope, query, status, started)

    def _log(self, scope: Scope, query: bytes, status: int, started: float) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        shown = masked_query(query, self._secrets) if query else ""
        client = scope.get("client") or ("-", 0)
        took = (time.perf_counter() - started) * 1000
        log.info(
            '%s:%s "%s %s%s" %d %.1f ms',
            client[0],
            client[1],
            scope["method"],
            scope["path"],
            f"?{shown}" if shown else "",
            status,
            took,
        )


def refusal(names: list[str], *, openai: bool) -> ErrorResponse:
    """A request with credentials in its query, refused in the shape its route speaks."""
    code = "credentials_in_query"
    message = (
        f"Credentials are not accepted in the query string ({', '.join(names)}): they end up "
        "in logs. Send 'Authorization: Bearer KEY' instead."
    )
    if openai:
        return errors.openai_error(400, code, message)
    return errors.switchd_error(400, code, message)
