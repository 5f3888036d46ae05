"""The event contract: every event name and the fields of each stage's payload.

What the UI, the CLI, `/metrics` and log collectors read is defined here and
nowhere else. Every job event carries the common fields (`job`, `kind`,
`cause`, `seq`, `stage`, `model`, `progress`, `ts`, `message`); the dataclass
of its stage adds the rest. `model` is always the job's target; the model
being unloaded is `victim`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from switchd.states import Stage

# Events that are not stages of a job.
SNAPSHOT = "snapshot"  # the status body and `reason` (connect | gap), first on /v1/events
GAP = "gap"  # asked, oldest: a resume that could not be served, just before its snapshot
MODEL_STATE = "model_state"  # model, from, to[, error]
LOG = "log"  # line, source[, skipped]: an engine output line while it loads, or a count
CONFIG_RELOADED = "config_reloaded"  # status ok|error and the diff, or why (switchd.reload)
RESULT = "result"  # the JSON-mode answer, last on success
ERROR = "error"  # error, message and that error's fields, last on failure

COMMON_FIELDS = ("job", "kind", "cause", "seq", "stage", "model", "progress", "ts", "message")
JOB_END = frozenset({RESULT, ERROR})
NOT_STAGES = frozenset({LOG, MODEL_STATE, SNAPSHOT, GAP, CONFIG_RELOADED})


@dataclass(frozen=True)
class Payload:
    """The stage-specific fields of one job event."""

    STAGE: ClassVar[Stage]

    @property
    def name(self) -> str:
        return self.STAGE.value

    def fields(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Queued(Payload):
    STAGE = Stage.QUEUED
    position: int  # 1 = next
    behind: str  # the target of the job that runs now
    ahead: list[str]  # targets of every job before this one, the running one first


@dataclass(frozen=True)
class MemoryCheck(Payload):
    STAGE = Stage.MEMORY_CHECK
    required_gb: float
    available_gb: float
    total_gb: float
    to_unload: list[str]
    enough: bool
    devices: list[int]  # where the target goes
    short_device: int | None  # when not enough: the device that lacks memory
    to_sleep: list[str] = dataclasses.field(default_factory=list)  # of to_unload: asleep


@dataclass(frozen=True)
class Drain(Payload):
    STAGE = Stage.DRAIN
    victim: str
    in_flight: int


@dataclass(frozen=True)
class Unload(Payload):
    STAGE = Stage.UNLOAD
    victim: str
    expected_gb: float


@dataclass(frozen=True)
class Unloaded(Payload):
    STAGE = Stage.UNLOADED
    victim: str
    freed_gb: float
    seconds: float
    verified: bool


@dataclass(frozen=True)
class Sleep(Payload):
    """A victim put to sleep instead of stopped: which tier, and why."""

    STAGE = Stage.SLEEP
    victim: str
    tier: str  # sleep1 | sleep2 | release
    expected_gb: float  # what it holds now
    estimated_wake_seconds: float
    reason: str


@dataclass(frozen=True)
class Slept(Payload):
    STAGE = Stage.SLEPT
    victim: str
    tier: str
    freed_gb: float  # measured
    residue_gb: float  # what it still holds asleep, measured
    seconds: float
    verified: bool  # at least 75% of what it held came back


@dataclass(frozen=True)
class Freed(Payload):
    STAGE = Stage.FREED
    freed_gb: float
    available_gb: float


@dataclass(frozen=True)
class Start(Payload):
    STAGE = Stage.START
    estimated_load_time_seconds: float
    container: str | None = None
    pid: int | None = None
    adopted: bool | None = None  # found still loading after a restart

    def fields(self) -> dict[str, Any]:
        # Where it runs (a container or a pid) and `adopted` only where they apply.
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Wake(Payload):
    """The target sleeps: it is woken instead of started."""

    STAGE = Stage.WAKE
    tier: str
    estimated_wake_seconds: float
    estimated_load_time_seconds: float  # what a cold start would have cost


@dataclass(frozen=True)
class Woken(Payload):
    STAGE = Stage.WOKEN
    wake_seconds: float
    taken_gb: float | None  # memory it took back, measured; None when not attributable


@dataclass(frozen=True)
class Loading(Payload):
    STAGE = Stage.LOADING
    elapsed_seconds: float
    estimated_load_time_seconds: float


@dataclass(frozen=True)
class Ready(Payload):
    STAGE = Stage.READY
    load_seconds: float
    gpu_memory_used_gb: float | None


@dataclass(frozen=True)
class Result(Payload):
    """Last on success: the JSON-mode body (`status`, `model`, `job`, …)."""

    STAGE = Stage.DONE
    body: dict[str, Any]

    @property
    def name(self) -> str:
        return RESULT

    def fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.body.items() if k != "message"}


@dataclass(frozen=True)
class Error(Payload):
    """Last on failure: the error code and the figures behind it."""

    STAGE = Stage.FAILED
    error: str
    details: dict[str, Any]

    @property
    def name(self) -> str:
        return ERROR

    def fields(self) -> dict[str, Any]:
        return {"error": self.error, **self.details}
