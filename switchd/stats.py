"""What switchd learned about each model: load and wake times, footprint, sleep residue,
and the context length its engine reported.

A footprint sample is only recorded when it could be attributed to the engine
(the loader decides; see Loader.load). The learned figure moves smoothly (half
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
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
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
    # Standby tiers: seconds from the wake call to answering (per tier), and what
    # the engine still held asleep (latest good samples, GB over all its devices).
    wake_seconds: Mapping[str, float] = field(default_factory=dict)
    residue_samples: tuple[float, ...] = ()
    # What the engine itself said once it ran: its context length in tokens
    # (vLLM's `max_model_len`, llama.cpp's `n_ctx`), for /v1/models while unloaded.
    context_length: int | None = None

    @property
    def residue_gb(self) -> float | None:
        """What it holds asleep, at most, in the recent samples; None: never measured."""
        return max(self.residue_samples) if self.residue_samples else None

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
                    wake_seconds=_wake_seconds(entry.get("wake_seconds")),
                    residue_samples=_numbers(entry.get("residue_samples", [])),
                    context_length=_whole(entry.get("context_length")),
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
        self._by_model[model] = replace(
            previous,
            load_seconds=round(load_seconds, 2),
            footprint_gb=smoothed,
            loads=previous.loads + 1,
            samples=samples,
            device_samples=device_samples,
        )
        await self._save()

    async def record_wake(self, model: str, tier: str, seconds: float) -> None:
        """A wake from `tier` took `seconds`; the learned figure moves halfway to it."""
        previous = self.get(model)
        known = previous.wake_seconds.get(tier)
        learned = seconds if known is None else known + SMOOTHING * (seconds - known)
        wake = {**previous.wake_seconds, tier: round(learned, 3)}
        self._by_model[model] = replace(previous, wake_seconds=wake)
        await self._save()

    async def record_residue(self, model: str, residue_gb: float) -> None:
        """What it still held once asleep, measured."""
        previous = self.get(model)
        samples = (*previous.residue_samples, round(max(0.0, residue_gb), 2))[-RECENT_SAMPLES:]
        self._by_model[model] = replace(previous, residue_samples=samples)
        await self._save()

    async def record_context_length(self, model: str, tokens: int) -> None:
        """The context length its engine reported; saved only when it changed."""
        previous = self.get(model)
        if previous.context_length == tokens:
            return
        self._by_model[model] = replace(previous, context_length=tokens)
        await self._save()

    async def _save(self) -> None:
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


def _wake_seconds(value: object) -> dict[str, float]:
    """Per tier; a damaged entry costs only itself."""
    items = value.items() if isinstance(value, dict) else ()
    return {str(tier): n for tier, raw in items if (n := _number(raw)) is not None}


def _numbers(values: object) -> tuple[float, ...]:
    found = [v for v in map(_number, values if isinstance(values, list) else []) if v is not None]
    return tuple(found[-RECENT_SAMPLES:])


def _whole(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
