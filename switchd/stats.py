"""What switchd learned about each model: load time and memory footprint.

A footprint sample is only recorded when it could be attributed to the engine
(the steps decide; see Steps.load). The learned figure moves smoothly (half
the way to each new sample), and the planner plans with the largest of the
recent good samples (`planned_gb`), never less: an engine that once needed 80
GB is not squeezed into 70 because a later sample came out low.

Persisted as JSON in `state_dir` so estimates survive a restart; written
atomically (temp file + rename) in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FILE_NAME = "learned.json"
RECENT_SAMPLES = 5
SMOOTHING = 0.5  # how far the learned footprint moves towards each new sample


@dataclass(frozen=True)
class Learned:
    load_seconds: float | None = None
    footprint_gb: float | None = None  # smoothed
    loads: int = 0
    samples: tuple[float, ...] = ()  # the latest good footprint samples, oldest first
    # Of the same loads, what the fullest of its devices held: an engine does not
    # always split itself evenly, and each device must have room for its share.
    device_samples: tuple[float, ...] = ()

    @property
    def planned_gb(self) -> float | None:
        """What to plan with: the largest recent good sample, else the smoothed figure."""
        return max(self.samples) if self.samples else self.footprint_gb

    @property
    def planned_per_device_gb(self) -> float | None:
        """What its fullest device held, at most, in the recent good samples."""
        return max(self.device_samples) if self.device_samples else None


class LearnedStats:
    def __init__(self, state_dir: Path) -> None:
        self._path = state_dir / FILE_NAME
        self._by_model: dict[str, Learned] = {}

    @property
    def path(self) -> Path:
        return self._path

    def get(self, model: str) -> Learned:
        return self._by_model.get(model, Learned())

    async def load(self) -> None:
        self._by_model = await asyncio.to_thread(self._read)

    def _read(self) -> dict[str, Learned]:
        try:
            raw = json.loads(self._path.read_text(encoding="utf-8"))
            return {
                str(name): Learned(
                    load_seconds=_number(entry.get("load_seconds")),
                    footprint_gb=_number(entry.get("footprint_gb")),
                    loads=int(entry.get("loads", 0)),
                    samples=_numbers(entry.get("samples", [])),
                    device_samples=_numbers(entry.get("device_samples", [])),
                )
                for name, entry in raw.items()
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            # A damaged file costs only the estimates, never the start-up.
            log.warning("ignoring unreadable %s: %s", self._path, exc)
            return {}

    async def record(
        self,
        model: str,
        load_seconds: float,
        footprint_gb: float | None,
        fullest_device_gb: float | None = None,
    ) -> None:
        """A load: its time, and its footprint when one could be attributed (with what
        the fullest of its devices held)."""
        previous = self.get(model)
        samples, device_samples = previous.samples, previous.device_samples
        smoothed = previous.footprint_gb
        if footprint_gb is not None and footprint_gb > 0:
            samples = (*samples, round(footprint_gb, 2))[-RECENT_SAMPLES:]
            if fullest_device_gb is not None and fullest_device_gb > 0:
                device_samples = (*device_samples, round(fullest_device_gb, 2))[-RECENT_SAMPLES:]
            smoothed = round(
                footprint_gb
                if smoothed is None
                else smoothed + SMOOTHING * (footprint_gb - smoothed),
                2,
            )
        # else: nothing attributable was measured: keep what was learned.
        self._by_model[model] = Learned(
            load_seconds=round(load_seconds, 2),
            footprint_gb=smoothed,
            loads=previous.loads + 1,
            samples=samples,
            device_samples=device_samples,
        )
        snapshot = {name: asdict(entry) for name, entry in self._by_model.items()}
        try:
            await asyncio.to_thread(self._write, snapshot)
        except OSError as exc:
            log.warning("cannot save learned figures to %s: %s", self._path, exc)

    def _write(self, snapshot: dict[str, dict[str, object]]) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self._path.with_suffix(".tmp")
        temporary.write_text(json.dumps(snapshot, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(temporary, self._path)


def _numbers(values: object) -> tuple[float, ...]:
    found = [v for v in map(_number, values if isinstance(values, list) else []) if v is not None]
    return tuple(found[-RECENT_SAMPLES:])


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
