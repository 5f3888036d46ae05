"""The catalog: each model's record, its state changes and the figures derived from it.

`transition` is the only code that changes a model's state, and only the
scheduler's tasks call it (asserted): its worker and the jobs it starts, each
job on its own models. Runtime reports and requests reach the state as messages
to them, never as another writer. Every change names the states it expects
(compare-and-set); finding another one raises StateConflict, which the caller
handles on purpose.

A load started beside a running job reserves what it will take until its engine
holds it (`reserve`): no other plan may count that memory as free meanwhile.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from switchd import footprint, metadata, planner, standby, wire
from switchd.config import ModelSpec, Settings, Tier
from switchd.events import EventBus
from switchd.gpu import GpuLedger, GpuSnapshot
from switchd.runtime.base import EngineInfo
from switchd.states import MODEL_TRANSITIONS, ModelState, check
from switchd.stats import LearnedStats
from switchd.units import gib, gib_to_bytes, iso_timestamp

ACTIVE = (ModelState.RUNNING, ModelState.LOADING)
# An engine runs (it may be asleep); and it holds GPU memory (asleep: its residue).
ENGINE = (ModelState.RUNNING, ModelState.LOADING, ModelState.SLEEPING)
HOLDING = (ModelState.RUNNING, ModelState.LOADING, ModelState.STOPPING, ModelState.SLEEPING)
# A reservation counts until the engine takes its memory: a sleeper's only as it wakes.
NOT_TAKEN = (ModelState.EXITED, ModelState.FAILED, ModelState.SLEEPING)
TAKES_KEPT = 64  # engine starts remembered for release windows (a window sees a few)


@dataclass(frozen=True)
class _Release:
    """An engine gone whose memory the driver may not have handed back yet."""

    until: float  # time.monotonic(): past it, whatever is missing is not coming
    by_device: dict[int, float] | None  # what it held there; None: spread over every device
    gb: float


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
    # SLEEPING: its tier, when it fell asleep (epoch), the host RAM it is charged
    # (level 1) and what it still holds on each device, measured.
    asleep: Tier | None = None
    asleep_since: float = 0.0
    host_ram_gb: float = 0.0
    residue_by_device: dict[int, float] | None = None
    ready_cost_seconds: float | None = None  # what its last load or wake took
    put_away_seconds: float | None = None  # what its last stop or sleep took
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
        self, settings: Settings, stats: LearnedStats, ledger: GpuLedger | None, bus: EventBus
    ) -> None:
        self._stats = stats
        self._ledger = ledger  # the simulated card's, told of every memory move
        self._bus = bus
        self.records = {name: ModelRecord(spec) for name, spec in settings.models.items()}
        # The tasks allowed to change states: the scheduler's worker and its jobs
        # (empty: any, for a catalog used without a scheduler).
        self.writers: set[asyncio.Task[Any]] = set()
        # Models a job brings up beside another, and what each will take, per device.
        self._reserved: dict[str, dict[int, float]] = {}
        # (memory_moves after it, GB per device): engines that began taking memory.
        self._takes: deque[tuple[int, dict[int, float]]] = deque(maxlen=TAKES_KEPT)
        # Counts every engine start, stop and death: a footprint measured as "free
        # before minus free after" is only attributable if this did not move meanwhile.
        self.memory_moves = 0
        # Engines gone whose memory may not be back yet, and what they held.
        self._releasing: dict[str, _Release] = {}
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
        tier: Tier | None = None,
    ) -> ModelState:
        """Move `record` to `new` if it is in `expected`; returns the state it left.

        `engine` is the engine of a LOADING, RUNNING or SLEEPING model (kept when
        not given), `devices` where it runs (else the engine's, if it knows them);
        leaving those states drops both. `tier`: how a SLEEPING model sleeps.
        """
        self._check_writer()
        allowed = {expected} if isinstance(expected, ModelState) else set(expected)
        old = record.state
        if old not in allowed:
            raise StateConflict(record.spec.name, old, allowed)
        check(MODEL_TRANSITIONS, old, new)
        spec = record.spec
        gone: _Release | None = None
        if new not in HOLDING and old in HOLDING:  # what it held, before it is forgotten
            gone = self._release_of(record)
        awake: _Release | None = None
        if new is ModelState.SLEEPING and old is ModelState.RUNNING:
            awake = self._release_of(record)  # what it held awake: most of it is coming back
        if old is ModelState.SLEEPING and new is ModelState.STOPPING:
            # Stopping a sleeper: it still holds its residue, not its full size.
            record.residue_by_device = self._residue_or_guess(record)
        kept: dict[int, float] = {}
        if old is ModelState.SLEEPING and new is ModelState.LOADING:
            placed = record.devices or spec.gpus  # what it keeps asleep, read while it sleeps
            kept = self.held_by_device(record, placed) if placed else {}
        record.state = new
        record.error = error
        if new in ENGINE:
            record.engine = engine or record.engine
            found = record.engine.devices if record.engine is not None else None
            record.devices = devices or found or record.devices
        elif new is not ModelState.STOPPING:
            record.engine = None
            record.devices = None
        if old is ModelState.SLEEPING:
            record.asleep, record.host_ram_gb = None, 0.0
            if new is not ModelState.STOPPING:
                record.residue_by_device = None
        if new not in HOLDING:
            record.residue_by_device = None
        if new is ModelState.RUNNING:
            record.ready_at = time.time()
            record.resident_since = record.last_active = time.monotonic()
        if new is ModelState.LOADING:
            record.last_exit = None
        if new in ENGINE and old not in HOLDING:
            # What the engine will really hold: the simulated card's truth is the
            # configured size (NVML sees real allocations and keeps no ledger).
            if self._ledger is not None:
                self._ledger.engine_started(
                    spec.name, gib_to_bytes(spec.size_gb), record.devices or spec.gpus
                )
            self.memory_moves += 1
            self._takes.append((self.memory_moves, self._taking(record)))
        if new is ModelState.SLEEPING:  # from RUNNING, or adopted asleep
            if self._ledger is not None:
                self._ledger.engine_slept(spec.name)
            record.asleep, record.asleep_since = tier, time.time()
            self.memory_moves += 1
            if awake is not None:
                self._sleep_releases(record, awake)
        if old is ModelState.SLEEPING and new is ModelState.LOADING:
            if self._ledger is not None:
                self._ledger.engine_woken(spec.name)
            record.measured_gb = record.measured_by_device = None  # measured again once awake
            self.memory_moves += 1
            waking = {d: max(0.0, gb - kept.get(d, 0.0)) for d, gb in self._taking(record).items()}
            self._takes.append((self.memory_moves, waking))
        if new not in HOLDING and old in HOLDING:
            if self._ledger is not None:
                self._ledger.engine_stopped(spec.name)
            record.measured_gb = record.measured_by_device = None
            self.memory_moves += 1
            assert gone is not None
            self._releasing[spec.name] = gone
        data: dict[str, Any] = {"model": spec.name, "from": old.value, "to": new.value}
        if tier is not None and new is ModelState.SLEEPING:
            data["tier"] = tier.value
        if error:
            data["error"] = error
        self._bus.publish(wire.MODEL_STATE, data)
        return old

    def _check_writer(self) -> None:
        assert not self.writers or asyncio.current_task() in self.writers, (
            "model state changed outside the scheduler's tasks"
        )

    def _taking(self, record: ModelRecord) -> dict[int, float]:
        """What an engine that begins to load will take on each of its devices."""
        devices = record.devices or record.spec.gpus or ()
        if not devices:  # where it runs is not known (an engine found at start): not counted
            return {}
        share = self.expected_gb(record.spec) / len(devices)
        return dict.fromkeys(devices, share)

    def taken_since(self, moves: int) -> dict[int, float]:
        """Per device, what engines that began to load (or wake) after `memory_moves`
        was `moves` were expected to take: memory a release window sees go that is
        not the released engine's."""
        taken: dict[int, float] = {}
        for seq, by_device in self._takes:
            if seq > moves:
                for device, gb in by_device.items():
                    taken[device] = taken.get(device, 0.0) + gb
        return taken

    def engine_starting(self, devices: Collection[int], besides: ModelRecord | None = None) -> bool:
        """Whether an engine (other than `besides`'s) is starting (loading or waking) on
        any of `devices`, or is about to (a load beside, reserved there); one whose
        devices are not known counts on every device."""
        wanted = set(devices)
        for record in self.records.values():
            name = record.spec.name
            about_to = name in self._reserved and record.state in NOT_TAKEN
            if record is besides or not (record.state is ModelState.LOADING or about_to):
                continue
            placed = self._reserved[name] if about_to else record.devices or record.spec.gpus
            if not placed or wanted & set(placed):
                return True
        return False

    def reserve(self, model: str, by_device: dict[int, float]) -> None:
        """`model` is being brought up beside another job: what it will take on each
        device is not free for any plan (but its own) until its engine holds it."""
        self._reserved[model] = dict(by_device)

    def unreserve(self, model: str) -> None:
        self._reserved.pop(model, None)

    def add(self, spec: ModelSpec) -> ModelRecord:
        """A model new to the catalog (a config reload), not loaded."""
        self._check_writer()
        record = self.records[spec.name] = ModelRecord(spec)
        return record

    def remove(self, model: str) -> None:
        """A model gone from the config, once its engine is gone (a config reload)."""
        self._check_writer()
        record = self.records[model]
        if record.state in HOLDING:
            raise StateConflict(model, record.state, (ModelState.EXITED, ModelState.FAILED))
        del self.records[model]

    def configure(self, settings: Settings) -> None:
        """The settings a config reload brought (the catalog's records change one by one)."""
        self._release_seconds = settings.memory_release_timeout_seconds

    def released(self, model: str) -> None:
        """The memory of `model`'s engine was seen back (an unload verified it)."""
        self._releasing.pop(model, None)

    def release_pending(self) -> bool:
        """Whether an engine gone lately may still be handing its memory back."""
        now = time.monotonic()
        for model, gone in list(self._releasing.items()):
            if gone.until <= now:
                del self._releasing[model]
        return bool(self._releasing)

    def _release_of(self, record: ModelRecord) -> _Release:
        """What `record`'s engine holds, to be counted as coming back once it is gone."""
        devices = record.devices or record.spec.gpus
        by_device = self.held_by_device(record, devices) if devices else None
        gb = math.fsum(by_device.values()) if by_device is not None else self.held_gb(record)
        return _Release(time.monotonic() + self._release_seconds, by_device, gb)

    def _sleep_releases(self, record: ModelRecord, awake: _Release) -> None:
        """A model fell asleep: what it held awake beyond what it keeps asleep (learned;
        unknown: nothing counted) is on its way back until the sleep's release is seen."""
        if awake.by_device is None:  # its devices unknown: spread over every device
            learned = self._stats.get(record.spec.name).residue_gb
            kept = learned if learned is not None else self.expected_gb(record.spec)
            if awake.gb > kept:
                self._releasing[record.spec.name] = _Release(awake.until, None, awake.gb - kept)
            return
        asleep = self.held_by_device(record, tuple(awake.by_device))
        coming = {d: max(0.0, gb - asleep.get(d, 0.0)) for d, gb in awake.by_device.items()}
        if any(coming.values()):
            self._releasing[record.spec.name] = _Release(
                awake.until, coming, math.fsum(coming.values())
            )

    def _residue_or_guess(self, record: ModelRecord) -> dict[int, float] | None:
        """A sleeper's residue, measured or (where its devices are known) as planned."""
        devices = record.devices or record.spec.gpus
        if record.residue_by_device is not None or not devices:
            return record.residue_by_device
        return self.held_by_device(record, devices)

    def releasing_by_device(self, snapshot: GpuSnapshot) -> dict[int, float]:
        """Per device, the memory on its way back: engines stopping now, and engines
        gone lately whose release was not seen yet. Never more than the driver shows
        used beyond what the engines still there hold: what is back is not coming."""
        every = snapshot.indexes()
        coming: dict[int, float] = dict.fromkeys(every, 0.0)
        for record in self.records.values():
            if record.state is ModelState.STOPPING:
                for device, gb in self.held_by_device(record, every).items():
                    coming[device] = coming.get(device, 0.0) + gb
        if self.release_pending():
            for gone in self._releasing.values():
                spread = dict.fromkeys(every, gone.gb / max(1, len(every)))
                for device, gb in (gone.by_device or spread).items():
                    coming[device] = coming.get(device, 0.0) + gb
        staying: dict[int, float] = dict.fromkeys(every, 0.0)
        for record in self.records.values():
            # A loading engine not yet measured may not show in the driver's figure yet:
            # it must not hide memory that is coming.
            counted = record.state in (ModelState.RUNNING, ModelState.SLEEPING) or (
                record.state is ModelState.LOADING and record.measured_gb is not None
            )
            if counted:
                for device, gb in self.held_by_device(record, every).items():
                    staying[device] = staying.get(device, 0.0) + gb
        return {
            d.index: max(
                0.0,
                min(
                    coming.get(d.index, 0.0),
                    gib(d.total_bytes - d.free_bytes) - staying.get(d.index, 0.0),
                ),
            )
            for d in snapshot.devices
        }

    def check_learned(self, snapshot: GpuSnapshot) -> None:
        """Drop learned figures that no device of this host could hold, or that are
        below a plausible share of a model's size (a damaged learned.json)."""
        totals = {d.index: gib(d.total_bytes) for d in snapshot.devices}
        for record in self.records.values():
            spec = record.spec
            devices = [d for d in (spec.gpus or totals) if d in totals] or list(totals)
            self._stats.keep_within(
                spec.name,
                math.fsum(totals[d] for d in devices),
                max(totals[d] for d in devices),
                footprint.PLAUSIBLE_SHARE * spec.size_gb,
            )

    def attach(self, record: ModelRecord, engine: EngineInfo) -> None:
        """The engine that a LOADING model's start produced."""
        self._check_writer()
        if record.state is not ModelState.LOADING:
            raise StateConflict(record.spec.name, record.state, (ModelState.LOADING,))
        record.engine = engine
        record.devices = engine.devices or record.devices  # a container keeps compose's

    def estimated_load_seconds(self, spec: ModelSpec) -> float:
        learned = self._stats.get(spec.name).load_seconds
        return round(learned if learned is not None else spec.load_time_seconds, 2)

    def estimated_wake_seconds(self, spec: ModelSpec, tier: Tier) -> float:
        """Learned for this tier, else the documented typical figure, at most a tenth
        of a cold load (vLLM measures 18-200x faster) until a wake is measured."""
        wakes = self._stats.get(spec.name).wake_seconds
        learned = wakes.get(tier.value)
        if learned is not None:
            return round(learned, 2)
        cold = self.estimated_load_seconds(spec)
        guess = min(standby.DEFAULT_WAKE_SECONDS[tier], cold * standby.UNMEASURED_WAKE_SHARE)
        if tier is Tier.SLEEP2:  # it reloads what level 1 kept: never guessed faster
            guess = max(guess, wakes.get(Tier.SLEEP1.value, 0.0))
        return round(guess, 2)

    def estimated_ready_seconds(self, record: ModelRecord) -> float:
        """How long until it could serve: a wake if it sleeps, else a cold load."""
        if record.state is ModelState.SLEEPING and record.asleep is not None:
            return self.estimated_wake_seconds(record.spec, record.asleep)
        return self.estimated_load_seconds(record.spec)

    def host_ram_in_use_gb(self) -> float:
        """What level-1 sleepers hold in host RAM, charged at their weights."""
        return math.fsum(r.host_ram_gb for r in self.records.values())

    def standby_victim(self, record: ModelRecord, held: dict[int, float]) -> standby.Victim:
        """What `standby.choose` needs to know of a victim."""
        spec = record.spec
        learned = self._stats.get(spec.name)
        tiers = spec.standby if record.state is ModelState.RUNNING else ()
        return standby.Victim(
            spec.name,
            tiers,
            held,
            learned.residue_gb,
            {tier: self.estimated_wake_seconds(spec, tier) for tier in tiers},
            self.estimated_load_seconds(spec),
            spec.weights_gb if spec.weights_gb is not None else math.fsum(held.values()),
        )

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
        devices = record.devices or record.spec.gpus or tuple(every)
        if record.state is ModelState.STOPPING and record.residue_by_device is not None:
            return dict(record.residue_by_device)  # a sleeper being stopped
        if record.state is ModelState.SLEEPING:
            if record.residue_by_device is not None:
                return dict(record.residue_by_device)
            learned = self._stats.get(record.spec.name).residue_gb
            held = learned if learned is not None else self.expected_gb(record.spec)
            return dict.fromkeys(devices, held / len(devices))  # unmeasured: assume the worst
        if record.measured_by_device:
            return dict(record.measured_by_device)
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
        record = self.records[spec.name]
        if record.state is ModelState.SLEEPING and record.devices:
            # It wakes where it sleeps, and its residue is already there.
            # Its need is the same on each device; the residue may not be: count the
            # smallest, so that no device is promised more than it has.
            residue = self.held_by_device(record, every)
            kept = min(residue.values(), default=0.0)
            return planner.Need(max(0.0, per_device - kept), record.devices, len(record.devices))
        return planner.Need(per_device, spec.gpus, count)

    def available_by_device(
        self, snapshot: GpuSnapshot, for_model: str | None = None
    ) -> dict[int, float]:
        """Per device, the smaller of the driver's free figure and total minus reservations,
        less what loads started beside another job will take (`for_model`'s own aside).

        The driver's figure lags behind an engine that is still allocating, so
        models loading and not yet measured count at their expected share.
        """
        every = snapshot.indexes()
        reserved: dict[int, float] = dict.fromkeys(every, 0.0)
        for record in self.records.values():
            if record.state in ACTIVE and record.measured_gb is None:
                for device, gb in self.held_by_device(record, every).items():
                    reserved[device] = reserved.get(device, 0.0) + gb
        coming: dict[int, float] = dict.fromkeys(every, 0.0)
        for model, by_device in self._reserved.items():
            starting = self.records.get(model)
            if model != for_model and starting is not None and starting.state in NOT_TAKEN:
                for device, gb in by_device.items():
                    coming[device] = coming.get(device, 0.0) + gb
        return {
            d.index: max(
                0.0,
                gib(max(0, min(d.free_bytes, d.total_bytes - gib_to_bytes(reserved[d.index]))))
                - coming[d.index],
            )
            for d in snapshot.devices
        }

    def available_gb(
        self, snapshot: GpuSnapshot, devices: Sequence[int] | None, for_model: str | None = None
    ) -> float:
        """Available on `devices` (None: all) together, for messages."""
        available = self.available_by_device(snapshot, for_model)
        return round(sum(gb for d, gb in available.items() if devices is None or d in devices), 2)

    def candidates(
        self, target: ModelSpec, every: Sequence[int], *, busy_pinned: bool = True
    ) -> list[planner.Candidate]:
        """The loaded models that could be unloaded to make room for `target`. One
        brought up beside another job counts as pinned until its load is over, its
        load not to be undone (`busy_pinned` False: as it will be after)."""
        return [
            planner.Candidate(
                r.spec.name,
                self.held_by_device(r, every),
                r.last_used,
                r.spec.pinned or (busy_pinned and r.spec.name in self._reserved),
            )
            for r in self.records.values()
            if r.spec.name != target.name and r.state in ENGINE
        ]

    def models_json(self) -> dict[str, Any]:
        return {name: self.model_json(record) for name, record in self.records.items()}

    def model_json(self, record: ModelRecord) -> dict[str, Any]:
        spec = record.spec
        body: dict[str, Any] = {
            "status": record.state.value,
            "size_gb": spec.size_gb,
            "estimated_load_time_seconds": self.estimated_load_seconds(spec),
            "gpu_memory_used_gb": record.measured_gb
            if record.state in ACTIVE
            else _rounded_total(record.residue_by_device),
            "pinned": spec.pinned,
            "last_used": iso_timestamp(record.last_used) if record.last_used else None,
            "in_flight": record.in_flight,
            "gpus": list(spec.gpus) if spec.gpus is not None else "all",
            "devices": list(record.devices) if record.devices and record.state in ENGINE else None,
            "aliases": list(spec.aliases),
            "failures": record.failures,
            "cooldown_until": iso_timestamp(record.cooldown_until)
            if record.cooldown_until > time.time()
            else None,
            "standby_tiers": [tier.value for tier in spec.standby],
            "metadata": metadata.describe(spec, self._stats.get(spec.name)),
        }
        if record.state is ModelState.SLEEPING and record.asleep is not None:
            body["sleep"] = {
                "tier": record.asleep.value,
                "level": standby.label(record.asleep),
                "since": iso_timestamp(record.asleep_since),
                "residue_gb": _rounded_total(record.residue_by_device),
                "host_ram_gb": round(record.host_ram_gb, 2),
                "estimated_wake_seconds": self.estimated_wake_seconds(spec, record.asleep),
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


def _rounded_total(by_device: dict[int, float] | None) -> float | None:
    return round(math.fsum(by_device.values()), 2) if by_device is not None else None
