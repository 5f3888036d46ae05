"""Bearer-key authentication as pure ASGI middleware.

Pure ASGI rather than BaseHTTPMiddleware, which buffers responses and hides
disconnects: event streams must pass through untouched.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

PUBLIC_PATHS = frozenset({"/health", "/", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)


def is_public(path: str) -> bool:
    """/health and the UI's files: reachable before the UI has a key to send."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class BearerAuth:
    def __init__(
        self,
        app: ASGIApp,
        keys: Sequence[str],
        exempt: Callable[[str], bool] = is_public,
    ) -> None:
        self.app = app
        self._keys = [key.encode() for key in keys]
        self._exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._keys or self._exempt(scope["path"]):
            await self.app(scope, receive, send)
            return
        if self._authorized(scope):
            await self.app(scope, receive, send)
            return
        await self._refuse(send)

    def _authorized(self, scope: Scope) -> bool:
        presented = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    presented = token.strip()
                break
        # Compare with every key, without stopping early, so timing reveals nothing.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        return matched and bool(presented)

    @staticmethod
    async def _refuse(send: Send) -> None:
        body = json.dumps(
            {
                "error": {
                    "message": "Missing or invalid API key: send 'Authorization: Bearer KEY'",
                    "type": "authentication_error",
                    "code": "invalid_api_key",
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="switchd"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
