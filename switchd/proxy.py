"""OpenAI-compatible forwarding: `POST /v1/...` to the engine named by `model`.

A pure ASGI app rather than a Starlette endpoint, so the bytes of a streamed
answer go out as they come in, and a client that leaves closes the upstream
request at once (and frees its in-flight slot) instead of when the next chunk
fails to send.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from starlette.types import Message, Receive, Scope, Send

from switchd.config import ModelSpec
from switchd.jobs import SwitchError
from switchd.metrics import Metrics
from switchd.runtime.base import EngineInfo
from switchd.scheduler import Scheduler

_T = TypeVar("_T")

# RFC 9110 hop-by-hop fields, plus what httpx and the server set themselves.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)
# The server in front sets its own; the engine's copies would be duplicates.
SERVER_SET = frozenset({b"date", b"server"})
# switchd's key is not the engine's; the body is read already, so no 100-continue.
NOT_FORWARDED = HOP_BY_HOP | {b"authorization", b"expect"}


def named_in_connection(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Headers a `Connection` field names: hop-by-hop too (RFC 9110, 7.6.1)."""
    return {
        name.strip().lower()
        for key, value in headers
        if key.lower() == b"connection"
        for name in value.split(b",")
    }


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


class ProxyError(Exception):
    """An OpenAI-shaped error answer."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        kind: str = "invalid_request_error",
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.kind = kind
        self.retry_after = retry_after

    @classmethod
    def from_switch(cls, error: SwitchError) -> ProxyError:
        kind = "invalid_request_error" if error.http_status < 500 else "server_error"
        return cls(error.http_status, error.code, error.message, kind, error.retry_after_seconds)

    async def send(self, send: Send) -> None:
        body = json.dumps(
            {"error": {"message": self.message, "type": self.kind, "code": self.code}}
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if self.retry_after is not None:
            headers.append((b"retry-after", str(self.retry_after).encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@dataclass(frozen=True)
class ProxyContext:
    scheduler: Scheduler
    upstream: aiohttp.ClientSession
    metrics: Metrics
    max_body_bytes: int


async def read_body(receive: Receive, limit: int) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        body += message.get("body", b"")
        if len(body) > limit:
            raise ProxyError(413, "request_too_large", f"Request body over {limit} bytes")
        if not message.get("more_body", False):
            return bytes(body)


def requested_model(body: bytes) -> tuple[str, dict[str, Any]]:
    try:
        data = json.loads(body)
    except ValueError:
        raise ProxyError(400, "invalid_json", "The request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ProxyError(400, "invalid_json", "The request body must be a JSON object")
    model = data.get("model")
    if model is None:
        raise ProxyError(400, "missing_model", "The request body has no `model` field")
    if not isinstance(model, str) or not model:
        raise ProxyError(400, "invalid_model", "`model` must be a non-empty string")
    return model, data


LARGE_BODY = 1 << 20  # parsing more than this on the loop would stall every stream


async def off_loop_if(large: bool, work: Callable[..., _T], *args: Any) -> _T:
    return await asyncio.to_thread(work, *args) if large else work(*args)


def encode(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


def upstream_headers(scope: Scope, api_key: str | None) -> list[tuple[str, str]]:
    dropped = NOT_FORWARDED | named_in_connection(scope["headers"])
    headers = [
        (k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k not in dropped
    ]
    if api_key:
        headers.append(("authorization", f"Bearer {api_key}"))
    return headers


def event_boundary(buffer: bytes) -> int:
    """Where the last complete Server-Sent Event in `buffer` ends (0: none yet)."""
    return max(
        buffer.rfind(b"\n\n") + 2 if b"\n\n" in buffer else 0,
        buffer.rfind(b"\r\n\r\n") + 4 if b"\r\n\r\n" in buffer else 0,
    )


async def until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def first_of(work: Awaitable[None], receive: Receive) -> bool:
    """Run `work` until it ends or the client goes away; True if it ended."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            pending.cancel()
        # Let cancelled work close what it holds (the upstream response) before we go.
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task in done and not task.cancelled():
        task.result()  # re-raise what the work raised
        return True
    return False


class Proxy:
    """The ASGI app behind every proxied route."""

    def __init__(self, context: Callable[[Scope], ProxyContext]) -> None:
        self._context = context

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _Call(self._context(scope), scope, receive, send).run()


class _Call:
    """One proxied request, from its body to the last byte of the answer."""

    def __init__(self, context: ProxyContext, scope: Scope, receive: Receive, send: Send) -> None:
        self.context = context
        self.scope = scope
        self.receive = receive
        self.send = send

    async def run(self) -> None:
        started = time.perf_counter()
        model = "unknown"
        status = 500
        try:
            body = await read_body(self.receive, self.context.max_body_bytes)
            large = len(body) > LARGE_BODY
            name, data = await off_loop_if(large, requested_model, body)
            spec = self._model(name)
            model = spec.name
            if name != spec.name:  # an alias: the engine knows the model by its own name
                body = await off_loop_if(large, encode, {**data, "model": spec.name})
            status = await self._forward(spec, body)
        except ProxyError as error:
            status = error.status
            await error.send(self.send)
        except SwitchError as error:
            status = error.http_status
            await ProxyError.from_switch(error).send(self.send)
        except ClientGone:
            status = 499  # the client went away first (nginx's figure)
        finally:
            self.context.metrics.request_done(model, status, time.perf_counter() - started)

    def _model(self, name: str) -> ModelSpec:
        """The one resolution of the request's model name (aliases included)."""
        try:
            return self.context.scheduler.known(name)
        except SwitchError as unknown:
            known = ", ".join(unknown.fields.get("available_models", []))
            message = f"The model '{name}' does not exist; known models: {known}"
            raise ProxyError(404, "model_not_found", message) from None

    async def _forward(self, spec: ModelSpec, body: bytes) -> int:
        outcome: dict[str, int] = {}

        async def serve() -> None:
            async with self.context.scheduler.serving(spec) as engine:
                outcome["status"] = await self._relay(spec, engine, body)

        # Waiting for a load or streaming: either way a client that leaves stops it.
        if not await first_of(serve(), self.receive):
            raise ClientGone
        return outcome["status"]

    async def _relay(self, spec: ModelSpec, engine: EngineInfo, body: bytes) -> int:
        query = self.scope.get("query_string", b"").decode("latin-1")
        url = engine.url + self.scope["path"] + (f"?{query}" if query else "")
        headers = upstream_headers(self.scope, spec.api_key)
        try:
            upstream = await self.context.upstream.request(
                self.scope["method"], url, data=body, headers=headers
            )
        except (aiohttp.ClientError, OSError) as exc:
            message = f"{engine.model} did not answer: {exc!r}"
            raise ProxyError(502, "engine_unreachable", message, "server_error") from None
        try:
            await relay_response(self.send, upstream)
        finally:
            # An answer read to its end returns its connection to the pool; one cut
            # short (client gone, engine died) closes it, so nothing leaks.
            upstream.close() if not upstream.content.at_eof() else upstream.release()
        return upstream.status


async def relay_response(send: Send, upstream: aiohttp.ClientResponse) -> None:
    """The engine's answer as it comes: status, headers, then each chunk."""
    dropped = HOP_BY_HOP | SERVER_SET | named_in_connection(upstream.raw_headers)
    headers = [(k.lower(), v) for k, v in upstream.raw_headers if k.lower() not in dropped]
    if length := upstream.headers.get("content-length"):
        headers.append((b"content-length", length.encode()))
    events = upstream.headers.get("content-type", "").startswith("text/event-stream")
    if events and "x-accel-buffering" not in upstream.headers:
        headers.append((b"x-accel-buffering", b"no"))  # nginx in front: do not buffer
    start: Message = {"type": "http.response.start", "status": upstream.status}
    await send({**start, "headers": headers})
    pending = b""
    try:
        async for chunk in upstream.content.iter_any():
            if not events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                continue
            # Whole events only, so an engine dying mid-event leaves no half event.
            pending += chunk
            if end := event_boundary(pending):
                complete, pending = pending[:end], pending[end:]
                await send({"type": "http.response.body", "body": complete, "more_body": True})
    except (aiohttp.ClientError, OSError):
        pass  # the engine died mid-answer: end what was sent cleanly
    await send({"type": "http.response.body", "body": b"", "more_body": False})
