"""A switch or unload job: its stage, progress and the events it emitted.

The job keeps every event it emitted, so any number of clients can follow it
from its first event, whenever they arrive, while it runs on regardless of
them (a switch changes the server, not the client).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from switchd.events import Event
from switchd.states import Stage
from switchd.units import iso_timestamp

# Repeating or chatty events: the timeline keeps when each stage began, not these.
TIMELINE_SKIPS = frozenset({"log", "loading"})


class JobKind(StrEnum):
    SWITCH = "switch"
    UNLOAD = "unload"


class Cause(StrEnum):
    """Why a job runs: an operator's call, requests waiting for a model, its TTL, the
    config's `preload` at start, a config reload (a model removed or changed), or a
    client's call of llama.cpp's model-management API (`/models/load|unload`)."""

    EXPLICIT = "explicit"
    API = "api"
    DEMAND = "demand"
    TTL = "ttl"
    PRELOAD = "preload"
    RELOAD = "reload"


@dataclass
class SwitchError(Exception):
    """Why a job failed: an error code, its HTTP status and the figures behind it."""

    code: str
    http_status: int
    message: str
    fields: dict[str, Any] = field(default_factory=dict)
    retry_after_seconds: int | None = None  # for a 503: when trying again makes sense

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def as_json(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.fields}

    def copy(self) -> SwitchError:
        """A copy for each waiter: one exception object raised in many tasks would
        collect every task's traceback."""
        return dataclasses.replace(self)


class Job:
    def __init__(self, kind: JobKind, target: str, cause: Cause = Cause.EXPLICIT) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.kind = kind
        self.target = target
        self.cause = cause
        self.stage = Stage.QUEUED
        self.progress = 0.0
        self.events: list[Event] = []
        self.log_lines = 0
        self.created = time.time()
        self.finished: float | None = None
        self.result: dict[str, Any] | None = None
        self.error: SwitchError | None = None
        # What the success body reports, filled in as the stages pass.
        self.unloaded_models: list[str] = []  # stopped
        self.slept_models: list[str] = []  # put to sleep instead
        self.woken: bool = False  # the target was woken, not started
        self.memory_info: dict[str, float] = {}
        self.estimated_load_time_seconds: float | None = None
        # A switch's placement and victims, once its memory check decided them.
        self.placed: tuple[int, ...] | None = None
        self.victims: tuple[str, ...] = ()
        self.timeline: list[tuple[str, float]] = []  # (stage, seconds since created)
        self.started = asyncio.Event()  # the engine runs (or the job ended first)
        self.done = asyncio.Event()
        self._wakeup = asyncio.Event()

    def record(self, event: Event) -> None:
        self.events.append(event)
        if event.name not in TIMELINE_SKIPS and (
            not self.timeline or self.timeline[-1][0] != event.name
        ):
            # When each stage began, for the history: seconds since the job was created.
            self.timeline.append((event.name, round(time.time() - self.created, 3)))
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    def finish(self, result: dict[str, Any] | None, error: SwitchError | None) -> None:
        self.result = result
        self.error = error
        self.finished = time.time()
        self.started.set()
        self.done.set()
        self._wakeup.set()

    async def follow(self) -> AsyncIterator[Event]:
        """Every event from the first, then live ones until the job ends."""
        index = 0
        while True:
            wakeup = self._wakeup
            while index < len(self.events):
                yield self.events[index]
                index += 1
            if self.finished is not None:
                return
            await wakeup.wait()

    def success_body(self, *, ready: bool) -> dict[str, Any]:
        """The seed-compatible JSON answer of a switch that succeeded so far."""
        return {
            "status": "success",
            "model": self.target,
            "job": self.id,
            "unloaded_models": list(self.unloaded_models),
            "slept_models": list(self.slept_models),
            "woken": self.woken,
            "start_result": {
                "message": f"Model '{self.target}' "
                + (
                    "is ready"
                    if ready
                    else "is waking up"
                    if self.woken
                    else "started successfully"
                ),
                "status": "ready" if ready else "starting",
            },
            "estimated_load_time_seconds": self.estimated_load_time_seconds,
            "memory_info": dict(self.memory_info),
        }

    def as_json(self) -> dict[str, Any]:
        if self.error is not None:
            outcome = "failed"
        elif self.finished is not None:
            outcome = "succeeded"
        else:
            outcome = "queued" if self.stage is Stage.QUEUED else "running"
        return {
            "id": self.id,
            "kind": self.kind.value,
            "cause": self.cause.value,
            "target": self.target,
            "status": outcome,
            "stage": self.stage.value,
            "progress": round(self.progress, 3),
            "created": iso_timestamp(self.created),
            "finished": iso_timestamp(self.finished) if self.finished else None,
            "result": self.result,
            "error": self.error.as_json() if self.error else None,
            "events": len(self.events),
            "unloaded_models": list(self.unloaded_models),
            "slept_models": list(self.slept_models),
            "woken": self.woken,
            "timeline": [{"stage": stage, "at_seconds": at} for stage, at in self.timeline],
        }
