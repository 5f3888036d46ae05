"""A job's events: each stage it passes, and its engine's output lines, on the bus.

Both the room-making steps (switchd.steps) and the load (switchd.loading) tell
what they do through one Emitter, so a job's stages follow the stage machine
(switchd.states) and its engine's lines share one allowance, whichever of them
is speaking.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from switchd import wire
from switchd.events import EventBus, LogRate
from switchd.jobs import Job, JobKind
from switchd.states import JOB_TRANSITIONS, Stage, check
from switchd.units import iso_timestamp

MAX_LOG_EVENTS_PER_JOB = 500  # more lines still reach /v1/events, not the job's replay

# Share of the progress bar each phase owns: memory check 5%, unloads up to
# 30%, loading from 30% towards 99% by elapsed over estimated time.
PROGRESS_CHECKED = 0.05
PROGRESS_FREED = 0.30
PROGRESS_LOADING_CAP = 0.99


class Emitter:
    def __init__(self, bus: EventBus, clock: Callable[[], float] = time.monotonic) -> None:
        self._bus = bus
        self._clock = clock
        self._log_rate = LogRate()  # engine lines each load may publish as `log` events

    def emit(
        self, job: Job, payload: wire.Payload, message: str, /, *, progress: float | None = None
    ) -> None:
        stage = payload.STAGE
        if stage is not Stage.QUEUED:
            check(JOB_TRANSITIONS, job.stage, stage)
        job.stage = stage
        if progress is not None:
            job.progress = max(job.progress, min(1.0, progress))
        job.record(
            self._bus.publish(payload.name, _payload(job, payload.name, message, payload.fields()))
        )

    def queued(self, job: Job, ahead: list[str]) -> None:
        """A job that waits for the jobs `ahead` of it, the running one first."""
        noun = "switch" if job.kind is JobKind.SWITCH else "job"
        self.emit(
            job,
            wire.Queued(len(ahead), ahead[0], ahead),
            f"Waiting for the {noun} to {ahead[0]} to finish ({len(ahead)} ahead)",
        )

    def result(self, job: Job, result: dict[str, Any]) -> None:
        """A job's last event on success: its JSON body, and a line on how it ended."""
        message = result.get("message")
        if not message:
            if result.get("unloaded_models") is not None and "model" not in result:
                message = f"Unloaded {', '.join(result['unloaded_models'])}"
            else:
                message = f"Model '{result.get('model')}' is ready"
        self.emit(job, wire.Result(result), str(message), progress=1.0)

    def emit_log(self, job: Job, model: str, line: str, *, skipped: int = 0) -> None:
        """Publish one engine output line, within the job's allowance of log events.

        Lines over it (`LogRate`: a burst, then so many a second) are counted,
        not published, and the count goes out as one `log` event ("N more lines from
        <model>", with `skipped`: N) on the first line a second after they began, or
        at `flush_logs`. `skipped` > 0 publishes such a summary as `line`, unmetered.
        Error reports take the engine's last lines from the runtime, not from here."""
        if not skipped:
            admitted, held = self._log_rate.admit(job.id, model, self._clock())
            if held:
                self.emit_log(job, model, f"{held} more lines from {model}", skipped=held)
            if not admitted:
                return
        fields: dict[str, Any] = {"line": line, "source": model}
        if skipped:
            fields["skipped"] = skipped
        event = self._bus.publish(wire.LOG, _payload(job, wire.LOG, line, fields))
        if job.log_lines < MAX_LOG_EVENTS_PER_JOB:
            job.log_lines += 1
            job.record(event)

    def flush_logs(self, job: Job) -> None:
        """At the end of a load: publish the count of lines still held back, if any."""
        model, held = self._log_rate.flush(job.id)
        if held:
            self.emit_log(job, model, f"{held} more lines from {model}", skipped=held)


def _payload(job: Job, name: str, message: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "job": job.id,
        "kind": job.kind.value,
        "cause": job.cause.value,
        "seq": len(job.events) + 1,
        "stage": name,
        "model": job.target,
        "progress": round(job.progress, 3),
        "ts": iso_timestamp(time.time()),
        "message": message,
        **fields,
    }
