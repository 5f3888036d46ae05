"""HTTP handlers only: parse the request, ask the scheduler, respond.

Bad requests (unknown model, missing parameter) are answered with their HTTP
error before any event stream starts, so `curl -N` sees a plain status code.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Scope

from switchd import __version__, errors, sse, wire
from switchd.config import Settings
from switchd.events import EventBus, opening
from switchd.fanout import EventStream, JobEvents, Shutdown, Source, never, nothing
from switchd.jobs import Job, SwitchError
from switchd.journal import Journal
from switchd.journal import missed_since as journal_missed_since
from switchd.limits import BodyBudget
from switchd.metadata import model_object
from switchd.metrics import Metrics
from switchd.proxy import ProxyContext
from switchd.reload import Reloader, ReloadError
from switchd.scheduler import JOB_HISTORY, Scheduler
from switchd.units import iso_timestamp
from switchd.upstream import Upstream

PING_SECONDS = 15
RETRY_MILLISECONDS = 3000
SEND_TIMEOUT_SECONDS = 30  # a client that stops reading is let go
MAX_CONTROL_BODY = 64 * 1024


@dataclass(frozen=True)
class Services:
    """What the handlers use; built and owned by the app's lifespan."""

    settings: Settings
    scheduler: Scheduler
    bus: EventBus
    metrics: Metrics
    upstream: Upstream
    bodies: BodyBudget
    shutdown: Shutdown  # set when the server is asked to stop: watchers' streams end
    journal: Journal | None = None  # events on disk: resumes across restarts

    @functools.cached_property
    def proxy_context(self) -> ProxyContext:
        return ProxyContext(
            self.scheduler,
            self.upstream,
            self.metrics,
            self.settings.max_body_bytes,
            self.bodies,
            self.settings.body_read_timeout_seconds,
            self.bus,
            self.settings.load_progress_in_stream,
        )


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


def proxy_context(scope: Scope) -> ProxyContext:
    found: Services = scope["app"].state.services
    return found.proxy_context


def wants_stream(request: Request) -> bool:
    flag = request.query_params.get("stream", "").lower()
    if flag in ("1", "true", "yes"):
        return True
    if flag in ("0", "false", "no"):
        return False
    return "text/event-stream" in request.headers.get("accept", "")


class BadRequest(Exception):
    """A request refused before anything happened: its status, code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.response = errors.switchd_error(status, code, message)


async def read_capped(request: Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes without reading it all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large()
    return bytes(body)


def too_large() -> BadRequest:
    return BadRequest(413, "body_too_large", f"Request body over {MAX_CONTROL_BODY} bytes")


async def parameter(request: Request, *names: str) -> str | None:
    """A parameter from the query string, else from a small JSON body."""
    for name in names:
        if value := request.query_params.get(name):
            return value
    if request.method != "POST" or "json" not in request.headers.get("content-type", ""):
        return None
    body = await read_capped(request, MAX_CONTROL_BODY)
    if not body:
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: `[[[[…` nested too deep
        raise BadRequest(400, "invalid_json", "The request body is not valid JSON") from None
    if isinstance(data, dict):
        for name in names:
            value = data.get(name)
            if isinstance(value, str) and value:
                return value
    return None


def event_stream(
    request: Request,
    source: Source,
    first: bytes = b"",
    finished: Callable[[], bool] = never,
    last_words: Callable[[], bytes] = nothing,
) -> EventStream:
    """`source` as an event stream, as every stream of switchd's is written."""
    found = services(request)
    return EventStream(
        source,
        first,
        retry_milliseconds=RETRY_MILLISECONDS,
        shutdown=found.shutdown,
        streams=found.metrics.sse_streams,
        ping_seconds=PING_SECONDS,
        send_timeout_seconds=SEND_TIMEOUT_SECONDS,
        finished=finished,
        last_words=last_words,
    )


MAX_EVENT_ID_DIGITS = 19  # ids are microseconds since 1970 and a counter: 16-17 digits


def last_event_id(request: Request) -> int | None:
    """Last-Event-ID (header or `last_event_id`), or None; BadRequest if not an id.

    Only ASCII digits: `str.isdigit` also accepts '¹' and '²', which int() refuses.
    Blanks around it, a trailing `\r` among them (an id cut out of a `\r\n` stream by
    a shell), are no part of it.
    """
    value = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    text = (value or "").strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= MAX_EVENT_ID_DIGITS):
        shown = text if len(text) <= 24 else text[:20] + "…"
        raise BadRequest(
            400, "invalid_last_event_id", f"Last-Event-ID must be an event id, got {shown!r}"
        )
    return int(text)


def job_stream(request: Request, job: Job, after: int) -> Response:
    """The job's events from its first, or after Last-Event-ID; 204 once all were seen."""
    if job.finished is not None and all(event.id <= after for event in job.events):
        return Response(status_code=204)  # tells an EventSource to stop reconnecting

    def shutting_down() -> bytes:
        """A job cut by switchd's shutdown: its followers hear it, not just a closed stream.
        The scheduler ended it as the server began to stop: its `error` is among them."""
        if job.finished is not None:
            return b"".join(event.sse() for event in events.unsent())
        data = {
            "job": job.id,
            "kind": job.kind.value,
            "cause": job.cause.value,
            "stage": wire.ERROR,
            "model": job.target,
            "progress": round(job.progress, 3),
            "ts": iso_timestamp(time.time()),
            "error": "shutting_down",
            "message": "switchd is shutting down; this job did not finish",
        }
        return sse.block(None, wire.ERROR, json.dumps(data, separators=(",", ":")))

    events = JobEvents(job, after)
    return event_stream(request, events, finished=events.finished, last_words=shutting_down)


# ---- routes -------------------------------------------------------------------


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok", "version": __version__})


async def list_models(request: Request) -> Response:
    status = await services(request).scheduler.status()
    data = [model_object(name, model) for name, model in status["models"].items()]
    return JSONResponse({"object": "list", "data": data})


async def one_model(request: Request) -> Response:
    """`GET /v1/models/{id}`, as the openai SDK's `client.models.retrieve` asks it."""
    found = services(request)
    name = request.path_params["model_id"]
    if name in CONTROL_ROUTES:  # `GET /v1/models/switch`: a control route, POST only
        raise HTTPException(405, headers={"Allow": "POST"})
    try:
        spec = found.scheduler.known(name)
    except SwitchError as unknown:  # the same 404 as every route's for an unknown model
        return errors.from_switch(unknown, openai=True)
    model = found.scheduler.catalog.model_json(found.scheduler.records[spec.name])
    model["load_requested"] = found.scheduler.load_requested(spec.name)
    return JSONResponse(model_object(spec.name, model))


async def models_status(request: Request) -> Response:
    return JSONResponse(await services(request).scheduler.status())


async def switch(request: Request) -> Response:
    try:
        target = await parameter(request, "target_model", "model")
        after = last_event_id(request) if wants_stream(request) else None
    except BadRequest as bad:
        return bad.response
    if target is None:
        return errors.switchd_error(
            400, "missing_parameter", "target_model is required (?target_model=NAME)"
        )
    scheduler = services(request).scheduler
    try:
        # Refused before any stream starts when it could never fit: a plain 409.
        await scheduler.check_fits(target)
        job = scheduler.request_switch(target)
    except SwitchError as error:
        return errors.from_switch(error, openai=False)
    if wants_stream(request):
        return job_stream(request, job, after or 0)
    # The job runs in the scheduler's worker: this client leaving does not cancel it.
    wait_ready = request.query_params.get("wait") == "ready"
    await (job.done if wait_ready else job.started).wait()
    if job.error is not None:
        return errors.from_switch(job.error, openai=False)
    if job.result is not None:
        return JSONResponse(job.result)
    return JSONResponse(job.success_body(ready=False))


async def unload(request: Request) -> Response:
    try:
        name = await parameter(request, "model", "target_model")
        after = last_event_id(request) if wants_stream(request) else None
    except BadRequest as bad:
        return bad.response
    if name is None:
        return errors.switchd_error(
            400, "missing_parameter", "model is required (?model=NAME or all)"
        )
    try:
        job = services(request).scheduler.request_unload(name)
    except SwitchError as error:
        return errors.from_switch(error, openai=False)
    if wants_stream(request):
        return job_stream(request, job, after or 0)
    await job.done.wait()
    if job.error is not None:
        return errors.from_switch(job.error, openai=False)
    return JSONResponse(job.result)


async def reload_config(request: Request) -> Response:
    """Read the config file again and apply it (`?now=true`: restart changed models at
    once); 422 with the reason, nothing changed, when it does not parse or validate."""
    reloader: Reloader = request.app.state.reloader
    now = request.query_params.get("now", "").lower() in ("1", "true", "yes")
    try:
        change = await reloader.reload(now=now)
    except ReloadError as exc:
        return errors.switchd_error(422, "invalid_config", exc.problem)
    return JSONResponse({"status": "ok", **change.as_json()})


def _job(request: Request) -> Job | Response:
    job_id = request.path_params["job_id"]
    job = services(request).scheduler.job(job_id)
    if job is None:
        message = f"No switch job {job_id!r} (switchd keeps the last 200)"
        return errors.switchd_error(404, "job_not_found", message)
    return job


HISTORY_LIMIT = 50


async def list_jobs(request: Request) -> Response:
    """The latest switch and unload jobs, newest first, with when each stage began."""
    raw = request.query_params.get("limit", str(HISTORY_LIMIT))
    if not raw.isdigit() or not 1 <= int(raw) <= JOB_HISTORY:
        message = f"limit must be a whole number from 1 to {JOB_HISTORY}, got {raw!r}"
        return errors.switchd_error(400, "invalid_parameter", message)
    jobs = services(request).scheduler.recent_jobs(int(raw))
    return JSONResponse({"switches": [job.as_json() for job in jobs]})


async def job_status(request: Request) -> Response:
    job = _job(request)
    return job if isinstance(job, Response) else JSONResponse(job.as_json())


async def job_events(request: Request) -> Response:
    job = _job(request)
    if isinstance(job, Response):
        return job
    try:
        after = last_event_id(request)
    except BadRequest as bad:
        return bad.response
    return job_stream(request, job, after or 0)


async def server_events(request: Request) -> Response:
    found = services(request)
    bus = found.bus
    try:
        last_id = last_event_id(request)
    except BadRequest as bad:
        return bad.response
    journal = found.journal
    missed = None
    if last_id is not None:
        missed = await journal_missed_since(bus, journal, last_id)
    # Subscribe before reading the status, so nothing between the two is lost.
    subscription = bus.subscribe(missed)
    snapshot = b""
    if missed is None:
        snapshot_id = bus.last_id
        oldest = bus.oldest_id
        if journal is not None and journal.covered_after is not None:
            oldest = journal.covered_after + 1
        try:
            status = await found.scheduler.status()
        except BaseException:
            subscription.close()
            raise
        snapshot = opening(snapshot_id, status, last_id, oldest)
    return event_stream(request, subscription, snapshot)


async def metrics(request: Request) -> Response:
    found = services(request)
    snapshot = await found.scheduler.gpu_snapshot()
    status = await found.scheduler.status(snapshot)
    body = found.metrics.render(status, snapshot, found.bus.subscriber_count)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


CONTROL_ROUTES = frozenset({"switch", "unload"})


async def not_an_engine_call(request: Request) -> Response:
    raise HTTPException(405)


async def http_error(request: Request, exc: Exception) -> Response:
    """Routing's own errors (404, 405) as JSON, like every other error."""
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    code = codes.get(exc.status_code, "http_error")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return errors.switchd_error(exc.status_code, code, message, exc.headers)


ROUTES = [
    Route("/health", health),
    Route("/metrics", metrics),
    Route("/v1/models", list_models),
    Route("/v1/models/status", models_status),
    Route("/v1/models/{model_id:path}", one_model),
    Route("/v1/models/switch", switch, methods=["POST"]),
    Route("/v1/models/unload", unload, methods=["POST"]),
    Route("/v1/switches", list_jobs),
    Route("/v1/switches/{job_id}", job_status),
    Route("/v1/switches/{job_id}/events", job_events),
    Route("/v1/events", server_events),
    Route("/v1/config/reload", reload_config, methods=["POST"]),
    # Last. Engine calls (every other POST under /v1) never reach the router:
    # app.Switchd sends them to the proxy. This answers the rest with 405: another
    # method on an engine's path, and a POST to one of switchd's own that takes none.
    Route("/v1/{path:path}", not_an_engine_call, methods=["POST"]),
]
