"""The catalog: what switchd knows about each model, and the figures derived from it.

The Switcher alone changes a ModelRecord; this module only reads them, to plan
(held and available memory, load estimates) and to report (the status body).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from switchd import planner
from switchd.config import ModelSpec, Settings
from switchd.gpu import GpuSnapshot
from switchd.runtime.base import EngineInfo
from switchd.states import ModelState
from switchd.stats import LearnedStats
from switchd.units import gib, gib_to_bytes, iso_timestamp

ACTIVE = (ModelState.RUNNING, ModelState.LOADING)


@dataclass
class ModelRecord:
    """What switchd knows about one model right now; changed by the Switcher only."""

    spec: ModelSpec
    state: ModelState = ModelState.EXITED
    engine: EngineInfo | None = None
    error: str | None = None
    measured_gb: float | None = None
    last_used: float = 0.0
    ready_at: float = 0.0
    last_exit: dict[str, Any] | None = None  # how its engine last ended, if not by switchd
    in_flight: int = 0
    draining: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()  # nothing in flight yet


def overlaps(a: ModelSpec, b: ModelSpec) -> bool:
    """Whether two models share a GPU (no list: every device)."""
    return a.gpus is None or b.gpus is None or bool(set(a.gpus) & set(b.gpus))


class Catalog:
    def __init__(self, settings: Settings, stats: LearnedStats) -> None:
        self._stats = stats
        self.records = {name: ModelRecord(spec) for name, spec in settings.models.items()}

    def estimated_load_seconds(self, spec: ModelSpec) -> float:
        learned = self._stats.get(spec.name).load_seconds
        return round(learned if learned is not None else spec.load_time_seconds, 2)

    def expected_gb(self, spec: ModelSpec) -> float:
        """What a load of it will hold: learned, else configured."""
        return self._stats.get(spec.name).footprint_gb or spec.size_gb

    def held_gb(self, record: ModelRecord) -> float:
        """What it holds now: measured at its load, else expected."""
        if record.measured_gb is not None:
            return record.measured_gb
        return self.expected_gb(record.spec)

    def available_gb(self, snapshot: GpuSnapshot, spec: ModelSpec) -> float:
        """The smaller of the driver's free figure and total minus reservations.

        The driver's figure lags behind an engine that is still allocating, so
        models loading and not yet measured count at their expected size.
        """
        free = snapshot.free_bytes(spec.gpus)
        reserved = sum(
            gib_to_bytes(self.held_gb(r))
            for r in self.records.values()
            if r.state in ACTIVE and r.measured_gb is None and overlaps(r.spec, spec)
        )
        by_ledger = snapshot.total_bytes(spec.gpus) - reserved
        return gib(max(0, min(free, by_ledger)))

    def candidates(self, target: ModelSpec) -> list[planner.Candidate]:
        """The models that could be unloaded to make room for `target`."""
        return [
            planner.Candidate(r.spec.name, self.held_gb(r), r.last_used, r.spec.pinned)
            for r in self.records.values()
            if r.spec.name != target.name and r.state in ACTIVE and overlaps(r.spec, target)
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
            "aliases": list(spec.aliases),
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
