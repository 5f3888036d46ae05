"""The catalog: each model's record, its state changes and the figures derived from it.

`transition` is the only code that changes a model's state, and only the
scheduler's worker calls it (asserted): runtime reports and requests reach the
state as messages to that one owner, never as a second writer. Every change
names the states it expects (compare-and-set); finding another one raises
StateConflict, which the caller handles on purpose.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from switchd import planner, wire
from switchd.config import ModelSpec, Settings
from switchd.events import EventBus
from switchd.gpu import GpuProbe, GpuSnapshot
from switchd.runtime.base import EngineInfo
from switchd.states import MODEL_TRANSITIONS, ModelState, check
from switchd.stats import LearnedStats
from switchd.units import gib, gib_to_bytes, iso_timestamp

ACTIVE = (ModelState.RUNNING, ModelState.LOADING)
HOLDING = (ModelState.RUNNING, ModelState.LOADING, ModelState.STOPPING)


class StateConflict(RuntimeError):
    """A model was not in the state a change expected: the caller decides what it means."""

    def __init__(self, model: str, found: ModelState, expected: Collection[ModelState]) -> None:
        wanted = " or ".join(sorted(s.value for s in expected))
        super().__init__(f"{model} is {found.value}, not {wanted}")
        self.found = found


@dataclass
class ModelRecord:
    """What switchd knows about one model right now.

    `state`, `engine` and `error` change only through Catalog.transition; the
    request counters are kept by the scheduler as requests start and end.
    """

    spec: ModelSpec
    state: ModelState = ModelState.EXITED
    engine: EngineInfo | None = None
    error: str | None = None
    measured_gb: float | None = None  # what its engine holds, measured at its load
    measured_by_device: dict[int, float] | None = None  # the same, device by device
    devices: tuple[int, ...] | None = None  # where its engine runs (placed or found)
    last_used: float = 0.0  # epoch seconds, for status and TTL
    ready_at: float = 0.0  # epoch seconds
    resident_since: float = 0.0  # time.monotonic() when it became ready
    last_active: float = 0.0  # time.monotonic() when its last request ended
    failures: int = 0  # consecutive failed loads
    cooldown_until: float = 0.0  # epoch seconds: no load on demand before then
    last_exit: dict[str, Any] | None = None  # how its engine last ended, if not by switchd
    in_flight: int = 0
    draining: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()  # nothing in flight yet


class Catalog:
    def __init__(
        self, settings: Settings, stats: LearnedStats, gpu: GpuProbe, bus: EventBus
    ) -> None:
        self._stats = stats
        self._gpu = gpu
        self._bus = bus
        self.records = {name: ModelRecord(spec) for name, spec in settings.models.items()}
        self.owner: asyncio.Task[Any] | None = None  # the one task allowed to change states
        # Counts every engine start, stop and death: a footprint measured as "free
        # before minus free after" is only attributable if this did not move meanwhile.
        self.memory_moves = 0
        # Engines gone whose memory may not be back yet: model -> until when (monotonic).
        self._releasing: dict[str, float] = {}
        self._release_seconds = settings.memory_release_timeout_seconds

    def transition(
        self,
        record: ModelRecord,
        expected: ModelState | Collection[ModelState],
        new: ModelState,
        *,
        engine: EngineInfo | None = None,
        error: str | None = None,
        devices: tuple[int, ...] | None = None,
    ) -> ModelState:
        """Move `record` to `new` if it is in `expected`; returns the state it left.

        `engine` is the engine of a LOADING or RUNNING model (kept when not
        given), `devices` where it runs (else the engine's, if it knows them);
        leaving those states drops both.
        """
        assert self.owner is None or asyncio.current_task() is self.owner, (
            "model state changed outside the scheduler's worker"
        )
        allowed = {expected} if isinstance(expected, ModelState) else set(expected)
        old = record.state
        if old not in allowed:
            raise StateConflict(record.spec.name, old, allowed)
        check(MODEL_TRANSITIONS, old, new)
        record.state = new
        record.error = error
        if new in ACTIVE:
            record.engine = engine or record.engine
            found = record.engine.devices if record.engine is not None else None
            record.devices = devices or found or record.devices
        elif new is not ModelState.STOPPING:
            record.engine = None
            record.devices = None
        spec = record.spec
        if new is ModelState.RUNNING:
            record.ready_at = time.time()
            record.resident_since = record.last_active = time.monotonic()
        if new is ModelState.LOADING:
            record.last_exit = None
        if new in ACTIVE and old not in HOLDING:
            # What the engine will really hold: the simulated card's truth is the
            # configured size (NVML sees real allocations and ignores this).
            self._gpu.engine_started(
                spec.name, gib_to_bytes(spec.size_gb), record.devices or spec.gpus
            )
            self.memory_moves += 1
        if new not in HOLDING and old in HOLDING:
            self._gpu.engine_stopped(spec.name)
            record.measured_gb = record.measured_by_device = None
            self.memory_moves += 1
            self._releasing[spec.name] = time.monotonic() + self._release_seconds
        data: dict[str, Any] = {"model": spec.name, "from": old.value, "to": new.value}
        if error:
            data["error"] = error
        self._bus.publish(wire.MODEL_STATE, data)
        return old

    def released(self, model: str) -> None:
        """The memory of `model`'s engine was seen back (an unload verified it)."""
        self._releasing.pop(model, None)

    def release_pending(self) -> bool:
        """Whether an engine gone lately may still be handing its memory back."""
        now = time.monotonic()
        for model, until in list(self._releasing.items()):
            if until <= now:
                del self._releasing[model]
        return bool(self._releasing)

    def attach(self, record: ModelRecord, engine: EngineInfo) -> None:
        """The engine that a LOADING model's start produced."""
        assert self.owner is None or asyncio.current_task() is self.owner
        if record.state is not ModelState.LOADING:
            raise StateConflict(record.spec.name, record.state, (ModelState.LOADING,))
        record.engine = engine
        record.devices = engine.devices or record.devices  # a container keeps compose's

    def estimated_load_seconds(self, spec: ModelSpec) -> float:
        learned = self._stats.get(spec.name).load_seconds
        return round(learned if learned is not None else spec.load_time_seconds, 2)

    def expected_gb(self, spec: ModelSpec) -> float:
        """What a load of it will hold: learned (the largest recent sample), else configured."""
        return self._stats.get(spec.name).planned_gb or spec.size_gb

    def held_gb(self, record: ModelRecord) -> float:
        """What it holds now: measured at its load, else expected."""
        if record.measured_gb is not None:
            return record.measured_gb
        return self.expected_gb(record.spec)

    def held_by_device(self, record: ModelRecord, every: Sequence[int]) -> dict[int, float]:
        """What it holds on each of its devices: measured there, else its share of what
        it holds (tensor-parallel engines split a model evenly over their devices)."""
        if record.measured_by_device:
            return dict(record.measured_by_device)
        devices = record.devices or record.spec.gpus or tuple(every)
        share = self.held_gb(record) / len(devices)
        return {device: share for device in devices}

    def need(self, spec: ModelSpec, every: Sequence[int]) -> planner.Need:
        """Where `spec` may go and what it needs on each of those devices: what its
        fullest device was measured to hold, else the configured `gb_per_device`, else
        its size split evenly (as tensor-parallel engines split a model)."""
        count = len(spec.gpus) if spec.gpus else (spec.docker.gpu_count or len(every))
        per_device = (
            self._stats.get(spec.name).planned_per_device_gb
            or spec.gb_per_device
            or self.expected_gb(spec) / count
        )
        return planner.Need(per_device, spec.gpus, count)

    def available_by_device(self, snapshot: GpuSnapshot) -> dict[int, float]:
        """Per device, the smaller of the driver's free figure and total minus reservations.

        The driver's figure lags behind an engine that is still allocating, so
        models loading and not yet measured count at their expected share.
        """
        every = snapshot.indexes()
        reserved: dict[int, float] = dict.fromkeys(every, 0.0)
        for record in self.records.values():
            if record.state in ACTIVE and record.measured_gb is None:
                for device, gb in self.held_by_device(record, every).items():
                    reserved[device] = reserved.get(device, 0.0) + gb
        return {
            d.index: gib(max(0, min(d.free_bytes, d.total_bytes - gib_to_bytes(reserved[d.index]))))
            for d in snapshot.devices
        }

    def available_gb(self, snapshot: GpuSnapshot, devices: Sequence[int] | None) -> float:
        """Available on `devices` (None: all) together, for messages."""
        available = self.available_by_device(snapshot)
        return round(sum(gb for d, gb in available.items() if devices is None or d in devices), 2)

    def candidates(self, target: ModelSpec, every: Sequence[int]) -> list[planner.Candidate]:
        """The loaded models that could be unloaded to make room for `target`."""
        return [
            planner.Candidate(
                r.spec.name, self.held_by_device(r, every), r.last_used, r.spec.pinned
            )
            for r in self.records.values()
            if r.spec.name != target.name and r.state in ACTIVE
        ]

    def models_json(self) -> dict[str, Any]:
        return {name: self.model_json(record) for name, record in self.records.items()}

    def model_json(self, record: ModelRecord) -> dict[str, Any]:
        spec = record.spec
        body: dict[str, Any] = {
            "status": record.state.value,
            "size_gb": spec.size_gb,
            "estimated_load_time_seconds": self.estimated_load_seconds(spec),
            "gpu_memory_used_gb": record.measured_gb if record.state in ACTIVE else None,
            "pinned": spec.pinned,
            "last_used": iso_timestamp(record.last_used) if record.last_used else None,
            "in_flight": record.in_flight,
            "gpus": list(spec.gpus) if spec.gpus is not None else "all",
            "devices": list(record.devices) if record.devices and record.state in ACTIVE else None,
            "aliases": list(spec.aliases),
            "failures": record.failures,
            "cooldown_until": iso_timestamp(record.cooldown_until)
            if record.cooldown_until > time.time()
            else None,
        }
        if record.state is ModelState.RUNNING:
            body["health"] = "healthy"
        if record.state is ModelState.FAILED:
            body["error"] = record.error
        if record.last_exit is not None and record.state in (ModelState.EXITED, ModelState.FAILED):
            body["last_exit"] = record.last_exit
        if record.engine is not None:
            body["engine"] = {
                "pid": record.engine.pid,
                "container": record.engine.container,
                "url": record.engine.url,
                "started_at": iso_timestamp(record.engine.started_at),
            }
        return body
