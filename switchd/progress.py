"""Load progress inside an OpenAI chat stream, for clients that would hear nothing.

A streamed `/v1/chat/completions` (or `/v1/responses`: ResponsesProgress) whose
model is not serving waits for a load:
a minute of silence on a real box. With progress on (`load_progress_in_stream`
for every model or per model, or per request `X-Switchd-Progress: on|off`),
switchd answers at once and sends, before the engine's stream, chunks that chat
UIs show as reasoning (`choices[0].delta.reasoning_content`): what it waits for,
each stage of the load with its measured figures, and a line every few seconds.
Then the engine's stream, unchanged but for each chunk's `id`, set to the one
the progress chunks used, so the whole answer has one id and one model. Never
a word in `delta.content`; a load that fails ends the stream with an OpenAI
error event, which the SDKs raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from starlette.types import Scope, Send

from switchd import sse, wire
from switchd.chunks import (
    WholeEvents,
    cut_short_event,
    error_event,
    reasoning_chunk,
    with_id,
    with_response_id,
)
from switchd.config import ModelSpec
from switchd.events import Event, Subscription
from switchd.jobs import JobKind
from switchd.states import ModelState
from switchd.upstream import Response, UpstreamError

if TYPE_CHECKING:  # the scheduler's data; this module only words it
    from switchd.scheduler import Standing

HEADER = b"x-switchd-progress"
ON = frozenset({"on", "1", "true", "yes"})
OFF = frozenset({"off", "0", "false", "no"})
CHAT_PATH = "/v1/chat/completions"
RESPONSES_PATH = "/v1/responses"
EVERY_SECONDS = 3.0  # a line at least this often while nothing else happens
# Job events shown; `log` lines are the engine's own chatter, `result` and `error`
# are told by the answer itself.
SHOWN = frozenset(
    {
        "queued",
        "memory_check",
        "drain",
        "unload",
        "unloaded",
        "sleep",
        "slept",
        "freed",
        "wake",
        "woken",
        "start",
        "loading",
        "ready",
    }
)


class BadProgressHeader(ValueError):
    """An X-Switchd-Progress value that is neither on nor off."""


def asked(scope: Scope) -> bool | None:
    """What the request's X-Switchd-Progress header asks; None without one."""
    for name, value in scope["headers"]:
        if name == HEADER:
            said = value.decode("latin-1").strip().lower()
            if said in ON:
                return True
            if said in OFF:
                return False
            raise BadProgressHeader(
                f"X-Switchd-Progress must be on or off, got {value.decode('latin-1')!r}"
            )
    return None


def wanted(path: str, streamed: bool, header: bool | None, spec: ModelSpec, default: bool) -> bool:
    """Whether this request gets progress if its model must load: streamed chat and
    Responses answers only."""
    if path not in (CHAT_PATH, RESPONSES_PATH) or not streamed:
        return False
    if header is not None:
        return header
    return spec.load_progress_in_stream if spec.load_progress_in_stream is not None else default


class ProgressStream:
    """One chat answer that switchd starts itself: progress chunks, then the engine's."""

    def __init__(self, send: Send, model: str) -> None:
        self._send = send
        self.model = model
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._started = time.monotonic()
        self._first = True
        # Progress lines and the engine's relay never interleave: the relay takes
        # this before the follower is stopped, so no chunk is cut in two.
        self.lock = asyncio.Lock()

    async def start(self) -> None:
        await self._send({"type": "http.response.start", "status": 200, "headers": sse.HEADERS})

    async def say(self, text: str, progress: float | None = None) -> None:
        """One progress line; `progress`: the job's share done, where an event gives it."""
        elapsed = time.monotonic() - self._started
        line = f"[{elapsed:4.1f} s] {text}\n"
        chunk = reasoning_chunk(self.id, self.created, self.model, line, first=self._first)
        self._first = False
        await self._body(chunk)

    async def fail(self, message: str, code: str, kind: str = "server_error") -> None:
        await self._body(error_event(message, code, kind))
        await self.end()

    async def relay(self, upstream: Response) -> None:
        """The engine's answer into this stream, its chunks under this stream's id."""
        if upstream.status != 200 or not upstream.is_event_stream():
            try:
                text = (await upstream.read()).decode("utf-8", "replace")
            except UpstreamError as exc:
                text = f"(its answer was cut short: {exc})"
            text = text.strip().replace("\n", " ")[:500]
            await self.fail(
                f"{self.model} answered {upstream.status}: {text}", "engine_error", "server_error"
            )
            return
        whole = WholeEvents()
        try:
            async for chunk in upstream.chunks():
                if complete := whole.feed(chunk):
                    await self._body(self._as_own(complete))
        except (UpstreamError, OSError):
            await self._body(cut_short_event(self.model))
        await self.end()

    def _as_own(self, events: bytes) -> bytes:
        """The engine's events under this stream's id: one answer, one id."""
        return with_id(events, self.id)

    async def end(self) -> None:
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _body(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})


class ResponsesProgress(ProgressStream):
    """A streamed Responses answer that must wait for a load: `response.created` and
    `response.queued` at once (the Responses API's own events for a response not
    started yet, status `queued`), then the progress
    as comment lines (`: loading 42% ...`), which every parser skips and which keep the
    connection alive, then the engine's events, their response's id set to this one's
    (the SDKs refuse a stream whose response changes identity)."""

    def __init__(self, send: Send, model: str) -> None:
        super().__init__(send, model)
        self.id = f"resp_{uuid.uuid4().hex}"

    async def start(self) -> None:
        await super().start()
        response = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": "queued",
            "model": self.model,
            "output": [],
        }
        # `response.created` first, as the SDKs require, then `response.queued`.
        for number, kind in enumerate(("response.created", "response.queued")):
            event = {"type": kind, "sequence_number": number, "response": response}
            await self._body(sse.block(None, kind, json.dumps(event)))

    def _as_own(self, events: bytes) -> bytes:
        return with_response_id(events, self.id)

    async def say(self, text: str, progress: float | None = None) -> None:
        elapsed = time.monotonic() - self._started
        done = f"loading {round(100 * progress)}% " if progress is not None else ""
        await self._body(sse.comment(f"{done}[{elapsed:.1f} s] {text}"))

    async def fail(self, message: str, code: str, kind: str = "server_error") -> None:
        error = {"type": "error", "code": code, "message": message, "param": None}
        await self._body(sse.block(None, "error", json.dumps(error)))
        await self.end()


def stream_for(path: str, send: Send, model: str) -> ProgressStream:
    """The progress stream a waiting request of `path` gets."""
    return ResponsesProgress(send, model) if path == RESPONSES_PATH else ProgressStream(send, model)


def describe(standing: Standing) -> str:
    """One line on what a request for its model waits for: the job under way, the
    demand, its place in line and how long it takes to be ready."""
    model, state = standing.model, standing.state
    parts = [f"{model} is {state.value}"]
    current = standing.under_way
    if current is not None:
        doing = "unloading" if current.kind is JobKind.UNLOAD else "switching to"
        parts.append(
            f"switchd is {doing} {current.target} ({current.stage.value}, {current.progress:.0%})"
        )
        if standing.fits_beside:
            parts.append("it needs no room: it loads beside that now")
    elif state is not ModelState.RUNNING and standing.serving:
        serving = ", ".join(standing.serving)
        if standing.fits_beside:
            parts.append(f"it fits beside {serving}: it loads now")
        else:
            parts.append(f"{serving} serves other requests first")
    if standing.waiting:
        waited = standing.waited_seconds
        since = f", the first for {waited:.0f} s" if waited is not None else ""
        parts.append(f"{standing.waiting} request(s) wait for it{since}")
    if current is None or (current.target != model and not standing.fits_beside):
        parts.append(_place_in_line(standing))
    verb = "waking" if state is ModelState.SLEEPING else "loading"
    parts.append(f"{verb} it takes about {standing.ready_seconds:g} s")
    return "; ".join(parts)


def _place_in_line(standing: Standing) -> str:
    """Where its requests stand: behind the queued switches and the models whose
    requests came first (the policy's order)."""
    model, queued = standing.model, list(standing.queued)
    if model in queued:  # an operator's switch to it: the queue's order is the line
        before = queued[: queued.index(model)]
        if before:
            return f"its switch is queued behind {', '.join(before)}"
        return "its switch is next in the queue"
    line = list(standing.line)
    ahead = line[: line.index(model)] if model in line else []
    said = [f"queued switches first: {', '.join(queued)}"] if queued else []
    if ahead:
        said.append(f"in line behind {', '.join(ahead)}, wanted earlier")
    return "; ".join(said) if said else "next in line"


def line_for(event: Event, model: str) -> str | None:
    """What to tell about `event` in `model`'s stream; None: nothing."""
    if event.name not in SHOWN or event.data.get("model") != model:
        return None
    return str(event.data.get("message", event.name))


async def say_queued(stream: ProgressStream, subscription: Subscription) -> None:
    """The stages that came before the follower stopped (`ready` among them), told
    before the answer; `loading` ticks are old news by then."""
    for event in subscription.queued():
        line = line_for(event, stream.model)
        if line is not None and event.name != wire.Loading.STAGE.value:
            await stream.say(line)


async def follow(
    stream: ProgressStream,
    subscription: Subscription,
    standing: Callable[[], Awaitable[Standing]],
    every: float = EVERY_SECONDS,
) -> None:
    """Say each stage of the model's job as it comes, and where the request stands
    (`standing()`, described) when nothing has been said for `every` seconds; until
    cancelled."""
    events: AsyncIterator[Event] = aiter(subscription)
    upcoming: asyncio.Future[Event] = asyncio.ensure_future(anext(events))
    last_loading = 0.0
    try:
        while True:
            done, _ = await asyncio.wait({upcoming}, timeout=every)
            if not done:
                where = describe(await standing())
                async with stream.lock:
                    await stream.say(where)
                continue
            try:
                event = upcoming.result()
            except StopAsyncIteration:  # the bus let this reader go: the answer goes on
                return
            upcoming = asyncio.ensure_future(anext(events))
            line = line_for(event, stream.model)
            if line is None:
                continue
            if event.name == wire.Loading.STAGE.value:
                now = time.monotonic()
                if now - last_loading < every:
                    continue  # a line every few seconds is progress; every second is noise
                last_loading = now
            share = event.data.get("progress")
            async with stream.lock:
                await stream.say(line, share if isinstance(share, int | float) else None)
    finally:
        upcoming.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await upcoming
