"""llama.cpp's model-management API (its "router mode"), served by switchd's jobs.

The shapes, as llama.cpp documents and serves them (tools/server/README.md,
"Using multiple models"; tools/server/server-models.cpp, server_models_routes;
read 2026-12):

- `GET /models`: `{"object": "list", "data": [{"id", "object": "model",
  "owned_by", "created", "aliases", "status": {"value": "unloaded|loading|
  loaded|sleeping"[, "failed": true, "exit_code": N]}, "architecture":
  {"input_modalities", "output_modalities"}, ...}]}`. switchd lists the same
  objects on `/v1/models` (switchd.metadata), with its own state and metadata.
- `POST /models/load {"model"}`: `{"success": true}` at once, the load runs
  on. Unknown: 404 `model is not found` (not_found_error); loaded, loading or
  sleeping (llama.cpp's is_running()): 400 `model is already running`.
- `POST /models/unload {"model"}`: `{"success": true}`. Unknown: 400 `model is
  not found`; not running: 400 `model is not running` (both
  invalid_request_error: llama.cpp answers an unknown model 400 here, 404 on load).
- Errors: `{"error": {"code": <HTTP status>, "message", "type"}}`.
- `GET /models/sse`: `data: {"model", "event": "model_status", "data":
  {"status": "loading", "progress": {"stages", "current", "value"}}}` blocks,
  no `event:` or `id:` field; `loaded` on ready, `sleeping`, and `unloaded`
  with `exit_code` (the README's name; its source names the later ones
  `status_change`: switchd follows the README, which clients are written from).

Where switchd differs, on purpose: a sleeping model (switchd put it aside
itself) is woken by a load (`{"success": true}`) rather than refused, since
its clients cannot wake it otherwise without a request; a load that could
never fit in GPU memory is refused at once (400, switchd's message) instead
of failing later. Loads and unloads are switchd jobs with cause `api`
(`jobs.Cause.API`), seen in `/v1/switches` and `/v1/events` like any other.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from switchd import errors, metadata, sse, wire
from switchd.catalog import ModelRecord
from switchd.errors import ErrorResponse
from switchd.events import Event, Subscription
from switchd.jobs import Cause, SwitchError
from switchd.routes import (
    MAX_CONTROL_BODY,
    BadRequest,
    event_stream,
    list_models,
    read_capped,
    services,
)
from switchd.scheduler import Scheduler
from switchd.states import Stage

STATUS_EVENT = "model_status"
# switchd's load has one part; llama.cpp names the parts of its own.
LOAD_STAGES = ("text_model",)
PROGRESS_CAP = 0.99  # elapsed over estimated: never 100% before it is ready


def llama_error(status: int, message: str) -> ErrorResponse:
    """An error as llama.cpp's server answers one: its HTTP status as `code`."""
    return ErrorResponse(status, errors.llamacpp_body(status, message))


async def model_named(request: Request) -> str:
    """The body's `model`, as llama.cpp reads it; BadRequest without one."""
    body = await read_capped(request, MAX_CONTROL_BODY)
    try:
        data = json.loads(body) if body else {}
    except (ValueError, RecursionError):
        raise BadRequest(400, "invalid_json", "The request body is not valid JSON") from None
    name = data.get("model") if isinstance(data, dict) else None
    if not isinstance(name, str) or not name:
        raise BadRequest(400, "missing_parameter", "model must be a non-empty string")
    return name


def _value(scheduler: Scheduler, record: ModelRecord) -> str:
    name = record.spec.name
    return metadata.requested_value(record.state.value, scheduler.load_requested(name))


class Refused(Exception):
    """A model-management call refused, with llama.cpp's answer for it."""

    def __init__(self, answer: ErrorResponse) -> None:
        self.answer = answer


async def asked_for(request: Request, unknown_status: int) -> tuple[Scheduler, ModelRecord]:
    """The scheduler and the record of the body's model; Refused as llama.cpp refuses a
    bad body (400) or an unknown model (`unknown_status`: 404 on load, 400 on unload,
    as its server answers)."""
    try:
        name = await model_named(request)
    except BadRequest as bad:
        raise Refused(llama_error(400, str(bad))) from None
    scheduler = services(request).scheduler
    spec = scheduler.resolve(name)
    if spec is None:
        raise Refused(llama_error(unknown_status, "model is not found"))
    return scheduler, scheduler.records[spec.name]


async def load(request: Request) -> Response:
    try:
        scheduler, record = await asked_for(request, 404)
        if _value(scheduler, record) in (metadata.LOADED, metadata.LOADING):
            return llama_error(400, "model is already running")
        await scheduler.check_fits(record.spec.name)
        scheduler.request_switch(record.spec.name, Cause.API)
    except Refused as refused:
        return refused.answer
    except SwitchError as error:
        return llama_error(400, error.message)
    return JSONResponse({"success": True})


async def unload(request: Request) -> Response:
    try:
        scheduler, record = await asked_for(request, 400)
        if _value(scheduler, record) not in metadata.RUNNING_VALUES:
            return llama_error(400, "model is not running")
        scheduler.request_unload(record.spec.name, Cause.API)
    except Refused as refused:
        return refused.answer
    except SwitchError as error:
        return llama_error(400, error.message)
    return JSONResponse({"success": True})


@dataclass(frozen=True)
class StatusEvent(Event):
    """A `/models/sse` event: llama.cpp's `data:`-only block, encoded once."""

    def json(self) -> str:
        """llama.cpp's shape alone: `model`, `event`, `data` (switchd's events carry their
        `id` too; llama.cpp's clients know none)."""
        encoded = self._json
        if encoded is None:
            shaped = {"model": self.data["model"], "event": self.name, **self.data}
            encoded = json.dumps(shaped, separators=(",", ":"))
            object.__setattr__(self, "_json", encoded)
        return encoded

    def sse(self) -> bytes:
        block = self._sse
        if block is None:
            block = sse.data_only(self.json())
            object.__setattr__(self, "_sse", block)
        return block


def translate(event: Event, records: Mapping[str, ModelRecord]) -> StatusEvent | None:
    """One of switchd's bus events as llama.cpp's status event, or None: state changes
    that change llama.cpp's status value, and the load progress of a job."""
    data = event.data
    model = data.get("model")
    if not isinstance(model, str):
        return None
    status: dict[str, Any]
    if event.name == wire.MODEL_STATE:
        before, after = metadata.status_value(data["from"]), metadata.status_value(data["to"])
        if before == after:
            return None  # stopping -> exited: unloaded already
        status = {"status": after}
        if after == metadata.UNLOADED:
            record = records.get(model)
            body = {"status": data["to"], "last_exit": record.last_exit if record else None}
            if data.get("error"):
                body["error"] = data["error"]
            described = metadata.llama_status(body)
            status["exit_code"] = described.get("exit_code", 0)
            if described.get("failed"):
                status["failed"] = True
    elif event.name == Stage.LOADING.value:
        elapsed, estimate = data["elapsed_seconds"], data["estimated_load_time_seconds"]
        share = min(PROGRESS_CAP, elapsed / estimate) if estimate > 0 else 0.0
        progress = {
            "stages": list(LOAD_STAGES),
            "current": LOAD_STAGES[0],
            "value": round(share, 3),
        }
        status = {"status": metadata.LOADING, "progress": progress}
    else:
        return None
    return StatusEvent(
        event.id, STATUS_EVENT, {"model": model, "event": STATUS_EVENT, "data": status}
    )


class StatusEvents:
    """The bus, as `/models/sse` readers see it: a stream source of StatusEvents."""

    def __init__(self, subscription: Subscription, records: Mapping[str, ModelRecord]) -> None:
        self._subscription = subscription
        self._records = records

    @property
    def dropped(self) -> bool:
        return self._subscription.dropped

    def queued(self) -> list[Event]:
        found = (translate(event, self._records) for event in self._subscription.queued())
        return [event for event in found if event is not None]

    async def wait(self) -> None:
        await self._subscription.wait()

    def wake(self) -> None:
        self._subscription.wake()

    def close(self) -> None:
        self._subscription.close()


async def events(request: Request) -> Response:
    found = services(request)
    source = StatusEvents(found.bus.subscribe(), found.scheduler.records)
    return event_stream(request, source)


ROUTES = [
    Route("/models", list_models),
    Route("/models/load", load, methods=["POST"]),
    Route("/models/unload", unload, methods=["POST"]),
    Route("/models/sse", events),
]
