"""Bearer-key authentication and roles, as pure ASGI middleware.

Three kinds of key, each allowing what the one before it does and more:
read-only keys (status, models, events, metrics: a monitoring tool, a UI
viewer), inference keys (the OpenAI routes too), and admin keys (`api_keys`:
switch and unload too). Without any key configured everything is open, and
`switchd serve` refuses to listen beyond loopback.

Pure ASGI rather than BaseHTTPMiddleware, which buffers responses and hides
disconnects: event streams must pass through untouched.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from enum import IntEnum

from starlette.types import ASGIApp, Receive, Scope, Send

from switchd.errors import ErrorResponse, openai_error

PUBLIC_PATHS = frozenset({"/health", "/", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)
# llama.cpp's /models/load and /models/unload (switchd.llamacpp_api) switch models too.
ADMIN_PATHS = frozenset(
    {
        "/v1/models/switch",
        "/v1/models/unload",
        "/v1/config/reload",
        "/models/load",
        "/models/unload",
    }
)


class Role(IntEnum):
    """What a key may do; a higher role may do everything a lower one may."""

    READ = 1
    INFERENCE = 2
    ADMIN = 3


def required_role(method: str, path: str) -> Role:
    if path in ADMIN_PATHS:
        return Role.ADMIN
    if method == "POST" and path.startswith("/v1/"):
        return Role.INFERENCE  # an OpenAI call for an engine
    return Role.READ


def is_public(path: str) -> bool:
    """/health and the UI's files: reachable before the UI has a key to send."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class BearerAuth:
    def __init__(
        self,
        app: ASGIApp,
        keys: Sequence[str],
        exempt: Callable[[str], bool] = is_public,
        *,
        inference_keys: Sequence[str] = (),
        read_keys: Sequence[str] = (),
    ) -> None:
        """`keys` are admin keys; the others are the narrower roles."""
        self.app = app
        self._keys = [
            (key.encode(), role)
            for role, group in (
                (Role.ADMIN, keys),
                (Role.INFERENCE, inference_keys),
                (Role.READ, read_keys),
            )
            for key in group
        ]
        self._exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._keys or self._exempt(scope["path"]):
            await self.app(scope, receive, send)
            return
        role = self._role(scope)
        if role is None:
            await refused()(scope, receive, send)
            return
        needed = required_role(scope["method"], scope["path"])
        if role < needed:
            await forbidden(needed)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _role(self, scope: Scope) -> Role | None:
        presented = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    presented = token.strip()
                break
        # Compare with every key, without stopping early, so timing reveals nothing.
        found: Role | None = None
        for key, role in self._keys:
            if hmac.compare_digest(presented, key) and presented and found is None:
                found = role
        return found


def refused() -> ErrorResponse:
    return openai_error(
        401,
        "invalid_api_key",
        "Missing or invalid API key: send 'Authorization: Bearer KEY'",
        "authentication_error",
        {"WWW-Authenticate": 'Bearer realm="switchd"'},
    )


def forbidden(needed: Role) -> ErrorResponse:
    return openai_error(
        403,
        "insufficient_permissions",
        f"This key may not do this: it needs a key with the {needed.name.lower()} role",
        "permission_error",
    )
