"""OpenAI-compatible forwarding: `POST /v1/...` to the engine named by `model`.

A pure ASGI app rather than a Starlette endpoint, so the bytes of a streamed
answer go out as they come in, and a client that leaves closes the upstream
request at once (and frees its in-flight slot) instead of when the next chunk
fails to send.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

from starlette.types import Receive, Scope, Send

from switchd import errors, progress
from switchd.chunks import WholeEvents, cut_short_event
from switchd.config import ModelSpec
from switchd.events import EventBus
from switchd.jobs import SwitchError
from switchd.limits import BodyBudget, BodyHold, BodyTimeout, next_chunk
from switchd.metrics import Metrics
from switchd.protocol import client_state, watch_leaving, watch_stopping
from switchd.runtime.base import EngineInfo
from switchd.scheduler import Scheduler
from switchd.upstream import Response, Upstream, UpstreamError

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
NOT_RELAYED = HOP_BY_HOP | SERVER_SET
# switchd's key is not the engine's; the body is read already, so no 100-continue;
# the progress switch is switchd's own.
NOT_FORWARDED = HOP_BY_HOP | {b"authorization", b"expect", progress.HEADER}


def without_hop_by_hop(
    headers: Iterable[tuple[bytes, bytes]], dropped: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    """`headers` (names in lower case, as ASGI and upstream.py give them) less those
    in `dropped` and those a `Connection` field names: hop-by-hop too (RFC 9110,
    7.6.1)."""
    kept = [(name, value) for name, value in headers if name not in dropped]
    named = {
        token.strip().lower()
        for name, value in headers
        if name == b"connection"
        for token in value.split(b",")
    }
    return [(name, value) for name, value in kept if name not in named] if named else kept


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


class EngineCutOff(Exception):
    """The engine died in the middle of an answer that is not an event stream.

    Raised out of the app on purpose: the server then closes the connection
    without the final chunk, so the client sees the answer cut short instead of
    half a JSON body that looks complete.
    """


def one_line_for_cut_offs(record: logging.LogRecord) -> bool:
    """A logging filter for the server's error log: an EngineCutOff is a fact about an
    engine, said in one warning line, not a traceback of switchd's."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, EngineCutOff):
        record.msg, record.args, record.exc_info, record.exc_text = str(exc), (), None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


class ProxyError(Exception):
    """An OpenAI-shaped error answer."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        kind: str = errors.INVALID_REQUEST,
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
        kind = errors.kind_of(error.http_status)
        return cls(error.http_status, error.code, error.message, kind, error.retry_after_seconds)

    def response(self) -> errors.ErrorResponse:
        headers = errors.retry_after(self.retry_after)
        return errors.openai_error(self.status, self.code, self.message, self.kind, headers)


@dataclass(frozen=True)
class ProxyContext:
    scheduler: Scheduler
    upstream: Upstream
    metrics: Metrics
    max_body_bytes: int
    bodies: BodyBudget
    body_timeout_seconds: float
    bus: EventBus
    progress_in_stream: bool  # the default of load_progress_in_stream


def declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def read_body(
    scope: Scope, receive: Receive, limit: int, hold: BodyHold, idle_seconds: float
) -> bytes:
    """The whole body, within `limit`, the shared budget, and `idle_seconds` per chunk."""
    declared = declared_length(scope)
    if declared is not None and declared > limit:
        raise too_large(limit)  # at once, before reading any of it
    client = client_state(scope)
    # All of it here already (most bodies come with their headers): `receive()` gives
    # it at once, so no timer is set and cancelled for it (a few µs each).
    arrived = client is not None and client.body_arrived()
    body = bytearray()
    while True:
        if arrived:
            message = await receive()
        else:
            try:
                message = await next_chunk(receive, idle_seconds)
            except BodyTimeout:
                why = f"The request body did not arrive: nothing came for {idle_seconds:g} s"
                raise ProxyError(408, "request_timeout", why) from None
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if len(body) + len(chunk) > limit:
            raise too_large(limit)
        if not hold.take(len(chunk)):
            raise ProxyError(
                503,
                "server_busy",
                "switchd holds too many request bodies at once; try again shortly",
                errors.SERVER_ERROR,
                retry_after=1,
            )
        if not message.get("more_body", False):
            return chunk if not body else bytes(body + chunk)
        body += chunk


def too_large(limit: int) -> ProxyError:
    return ProxyError(413, "request_too_large", f"Request body over {limit} bytes")


# Characters an engine could read as leaving the path, or that a path never needs.
FORBIDDEN_IN_PATH = frozenset("\\?#%") | {chr(c) for c in range(32)} | {chr(127)}
RESERVED_PATHS = ("/v1/models", "/v1/events", "/v1/switches", "/v1/config")


def checked_path(path: str) -> str:
    """The decoded request path, if it stays under /v1/ for the engine; else 400.

    Engines have admin routes (vLLM /sleep, llama.cpp /slots): `/v1/../admin`,
    `/v1/%2e%2e/admin` or `/v1/a%3Fb` must never reach them.
    """
    if (
        not path.startswith("/v1/")
        or ("/." in path and any(segment in (".", "..") for segment in path.split("/")))
        or not FORBIDDEN_IN_PATH.isdisjoint(path)
    ):
        raise ProxyError(
            400, "invalid_path", "The path must stay under /v1/ (no '..', encoded or not)"
        )
    return path


def requested_model(body: bytes) -> tuple[str, dict[str, Any]]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: `[[[[…` nested too deep
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


def upstream_headers(scope: Scope, api_key: str | None) -> list[tuple[bytes, bytes]]:
    headers = without_hop_by_hop(scope["headers"], NOT_FORWARDED)
    if api_key:
        headers.append((b"authorization", b"Bearer " + api_key.encode("latin-1")))
    return headers


async def first_of(work: Coroutine[Any, Any, None], scope: Scope, receive: Receive) -> bool:
    """Run `work` until it ends or the client goes away; True if it ended.

    The work runs in the caller's task, which is cancelled if the client leaves
    (`protocol.watch_leaving`): that costs less, request by request, than running
    the work as a task of its own (bench/proxy.py).
    """
    caller = asyncio.current_task()
    assert caller is not None
    gone = False

    def left() -> None:
        nonlocal gone
        gone = True
        caller.cancel()

    stop_watching = watch_leaving(scope, receive, left)
    if stop_watching is None:  # it left already (while its body was parsed, say)
        work.close()
        return False
    try:
        await work
    except asyncio.CancelledError:
        # Our own cancel, and no one else's: the work was stopped because the client
        # left. Any other cancel (the server shutting down) goes on up.
        if gone and caller.uncancel() == 0:
            return False
        raise
    finally:
        stop_watching()
    if gone:  # the client left as the work ended, and the work swallowed our cancel
        caller.uncancel()
        return False
    return True


class Proxy:
    """The ASGI app behind every proxied route."""

    def __init__(self, context: Callable[[Scope], ProxyContext]) -> None:
        self._context = context

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _Call(self._context(scope), scope, receive, send).run()


def is_engine_call(scope: Scope) -> bool:
    """A POST under /v1/ that is none of switchd's own routes: an engine's."""
    path: str = scope["path"]
    return (
        scope["method"] == "POST"
        and path.startswith("/v1/")
        and not path.startswith(RESERVED_PATHS)
    )


class _Call:
    """One proxied request, from its body to the last byte of the answer."""

    def __init__(self, context: ProxyContext, scope: Scope, receive: Receive, send: Send) -> None:
        self.context = context
        self.scope = scope
        self.receive = receive
        self.send = send
        self.model = "unknown"  # for the metrics, once known

    async def run(self) -> None:
        started = time.perf_counter()
        status = 500
        context = self.context
        try:
            path = checked_path(self.scope["path"])
            try:
                progress_asked = progress.asked(self.scope)
            except progress.BadProgressHeader as bad:
                raise ProxyError(400, "invalid_header", str(bad)) from None
            with context.bodies.hold() as hold:
                body = await read_body(
                    self.scope,
                    self.receive,
                    context.max_body_bytes,
                    hold,
                    context.body_timeout_seconds,
                )
                large = len(body) > LARGE_BODY
                name, data = await off_loop_if(large, requested_model, body)
                spec = self._model(name)
                self.model = spec.name
                if name != spec.name:  # an alias: the engine knows the model by its own name
                    body = await off_loop_if(large, encode, {**data, "model": spec.name})
                streamed = data.get("stream") is True
                if context.scheduler.serves_now(spec):
                    status = await self._forward(spec, path, body)
                else:
                    # It will wait for a load: if the server stops meanwhile, every
                    # waiting request is answered, not cut when the server gives up.
                    stop_hearing = watch_stopping(self.scope, context.scheduler.stop_waiting)
                    try:
                        if progress.wanted(
                            path, streamed, progress_asked, spec, context.progress_in_stream
                        ):
                            status = await self._forward_with_progress(spec, path, body)
                        else:
                            status = await self._forward(spec, path, body)
                    finally:
                        if stop_hearing is not None:
                            stop_hearing()
        except ProxyError as error:
            status = error.status
            await error.response()(self.scope, self.receive, self.send)
        except SwitchError as error:
            status = error.http_status
            await errors.from_switch(error, openai=True)(self.scope, self.receive, self.send)
        except ClientGone:
            status = 499  # the client went away first (nginx's figure)
        except EngineCutOff:
            status = 502
            raise
        finally:
            context.metrics.request_done(self.model, status, time.perf_counter() - started)

    def _model(self, name: str) -> ModelSpec:
        """The one resolution of the request's model name (aliases included); an
        unknown one gets the 404 of every route (a SwitchError, answered in run)."""
        return self.context.scheduler.known(name)

    async def _forward(self, spec: ModelSpec, path: str, body: bytes) -> int:
        outcome: dict[str, int] = {}

        async def serve() -> None:
            async with self.context.scheduler.serving(spec) as engine:
                outcome["status"] = await self._relay(spec, engine, path, body)

        # Waiting for a load or streaming: either way a client that leaves stops it.
        if not await first_of(serve(), self.scope, self.receive):
            raise ClientGone
        return outcome["status"]

    async def _forward_with_progress(self, spec: ModelSpec, path: str, body: bytes) -> int:
        """A streamed chat answer that must wait for a load: switchd starts the stream,
        says how the load goes (switchd.progress), then relays the engine's answer."""
        scheduler = self.context.scheduler
        stream = progress.stream_for(path, self.send, spec.name)
        subscription = self.context.bus.subscribe()
        await stream.start()
        await stream.say(progress.describe(await scheduler.standing(spec.name)))
        follower = asyncio.create_task(
            progress.follow(stream, subscription, lambda: scheduler.standing(spec.name))
        )
        outcome = {"status": 200}

        async def quiet() -> None:
            async with stream.lock:  # never in the middle of a progress line
                follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
            await progress.say_queued(stream, subscription)

        async def serve() -> None:
            try:
                async with scheduler.serving(spec) as engine:
                    await quiet()
                    outcome["status"] = await self._relay(spec, engine, path, body, stream)
            except SwitchError as error:
                await quiet()
                outcome["status"] = error.http_status
                failed = ProxyError.from_switch(error)
                await stream.fail(failed.message, failed.code, failed.kind)
            except ProxyError as error:  # the engine did not answer
                await quiet()
                outcome["status"] = error.status
                await stream.fail(error.message, error.code, error.kind)

        try:
            if not await first_of(serve(), self.scope, self.receive):
                raise ClientGone
        finally:
            follower.cancel()
            subscription.close()
            await asyncio.gather(follower, return_exceptions=True)
        return outcome["status"]

    async def _relay(
        self,
        spec: ModelSpec,
        engine: EngineInfo,
        path: str,
        body: bytes,
        into: progress.ProgressStream | None = None,
    ) -> int:
        query = self.scope.get("query_string", b"").decode("latin-1")
        # The checked path, encoded once: nothing re-normalises it on the way.
        target = quote(path, safe=PATH_SAFE) + (f"?{query}" if query else "")
        headers = upstream_headers(self.scope, spec.api_key)
        try:
            upstream = await self.context.upstream.request(
                self.scope["method"], engine.url, target, headers, body
            )
        except (UpstreamError, OSError) as exc:
            message = f"{engine.model} did not answer: {exc}"
            raise ProxyError(502, "engine_unreachable", message, errors.SERVER_ERROR) from None
        try:
            if into is None:
                await relay_response(self.send, upstream, engine.model)
            else:
                await into.relay(upstream)
        finally:
            # An answer read to its end returns its connection to the pool; one cut
            # short (client gone, engine died) closes it, so nothing leaks.
            upstream.release()
        return upstream.status


PATH_SAFE = "/:@!$&'()*+,;=-._~"


async def relay_response(send: Send, upstream: Response, model: str) -> None:
    """The engine's answer as it comes: status, headers, then each chunk."""
    headers = without_hop_by_hop(upstream.raw_headers, NOT_RELAYED)
    if length := upstream.header(b"content-length"):
        headers.append((b"content-length", length))
    events = upstream.is_event_stream()
    if events and upstream.header(b"x-accel-buffering") is None:
        headers.append((b"x-accel-buffering", b"no"))  # nginx in front: do not buffer
    first = b""
    if not events:
        # The headers leave with the first piece of the body, in one write
        # (protocol.ResponseTransport): one packet, and the client woken once.
        try:
            first = await upstream.next_piece()
        except (UpstreamError, OSError) as exc:
            message = f"{model} stopped before the body of its answer: {exc}"
            raise ProxyError(502, "engine_died", message, errors.SERVER_ERROR) from None
    await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
    if upstream.at_eof:  # all of it came at once (most answers that are not streams)
        await send({"type": "http.response.body", "body": first, "more_body": False})
        return
    if first:
        await send({"type": "http.response.body", "body": first, "more_body": True})
    whole = WholeEvents()
    try:
        while chunk := await upstream.next_piece():
            if events and not (chunk := whole.feed(chunk)):
                continue
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except (UpstreamError, OSError) as exc:
        if not events:
            raise EngineCutOff(f"{model} died in the middle of an answer: {exc!r}") from None
        # A stream ends with an error event a client recognises, then ends properly.
        await send(
            {"type": "http.response.body", "body": cut_short_event(model), "more_body": True}
        )
    await send({"type": "http.response.body", "body": b"", "more_body": False})
