"""What switchd learned about each model: load and wake times, footprint, sleep residue,
and the context length its engine reported.

A footprint sample is only recorded when it could be attributed to the engine
(the loader decides; see Loader.load). The learned figure moves smoothly (half
the way to each new sample), and the planner plans with the largest of the
recent good samples (`planned_gb`), never less: an engine that once needed 80
GB is not squeezed into 70 because a later sample came out low.

Persisted as JSON in `state_dir` so estimates survive a restart; written
atomically (temp file + rename) in a worker thread. A damaged file costs only
the figures it damages: every figure read back is checked (finite, positive, no
load or wake a week long) and, once the card is known (`keep_within`), within
what the model's devices hold and no less than a plausible share of its size;
a bad one is dropped, with one warning per model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

log = logging.getLogger(__name__)

FILE_NAME = "learned.json"
RECENT_SAMPLES = 5
SMOOTHING = 0.5  # how far the learned footprint moves towards each new sample
MAX_SECONDS = 7 * 24 * 3600.0  # no load or wake takes a week: a figure past it is damage


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
        # One write at a time: loads beside a switch, and metadata, learn at once.
        self._saving = asyncio.Lock()

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
            learned: dict[str, Learned] = {}
            for name, entry in raw.items():
                dropped: list[str] = []
                learned[str(name)] = _checked(str(name), entry, dropped)
                self._warn(str(name), dropped)
            return learned
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, AttributeError, RecursionError) as exc:
            # A damaged file costs only the estimates, never the start-up. RecursionError:
            # `[[[[…` nested too deep for the parser.
            log.warning("ignoring unreadable %s: %s", self._path, exc)
            return {}

    def keep_within(self, model: str, max_gb: float, max_device_gb: float, min_gb: float) -> None:
        """Drop what was read of `model` that its devices could not hold (`max_gb` in
        all, `max_device_gb` on one), or that is below a plausible share of its size
        (`min_gb`): figures the loader would never have learned."""
        previous = self._by_model.get(model)
        if previous is None:
            return
        dropped: list[str] = []

        def within(low: float, high: float) -> Callable[[float], bool]:
            return lambda gb: low <= gb <= high

        footprint = within(min_gb, max_gb)
        footprint_gb = previous.footprint_gb
        if footprint_gb is not None and not footprint(footprint_gb):
            dropped.append(f"{model}.footprint_gb ({footprint_gb:g})")
            footprint_gb = None
        self._by_model[model] = replace(
            previous,
            footprint_gb=footprint_gb,
            samples=_kept(f"{model}.samples", previous.samples, footprint, dropped),
            device_samples=_kept(
                f"{model}.device_samples",
                previous.device_samples,
                within(min_gb / 64, max_device_gb),
                dropped,
            ),
            residue_samples=_kept(
                f"{model}.residue_samples", previous.residue_samples, within(0.0, max_gb), dropped
            ),
        )
        if dropped:
            log.warning(
                "%s: dropping figures beyond what %s's devices hold (%.2f GB) or below %.2f GB: %s",
                self._path,
                model,
                max_gb,
                min_gb,
                ", ".join(dropped),
            )

    def _warn(self, model: str, dropped: list[str]) -> None:
        if dropped:
            log.warning("%s: dropping damaged figures: %s", self._path, ", ".join(dropped))

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
        try:
            async with self._saving:  # the latest figures, taken once it is our turn
                snapshot = {name: asdict(entry) for name, entry in self._by_model.items()}
                await asyncio.to_thread(self._write, snapshot)
        except OSError as exc:
            log.warning("cannot save learned figures to %s: %s", self._path, exc)

    def _write(self, snapshot: dict[str, dict[str, object]]) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self._path.with_suffix(".tmp")
        temporary.write_text(json.dumps(snapshot, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(temporary, self._path)


def _checked(model: str, entry: object, dropped: list[str]) -> Learned:
    """One model's entry, each figure checked; what is dropped is named in `dropped`.
    An entry that is not an object, or a count that is not a number, spoils the file
    (as ever): what else it says cannot be trusted."""
    if not isinstance(entry, dict):
        raise TypeError(f"the entry of {model} is not an object")

    def seconds(seconds: float) -> bool:
        return 0 < seconds <= MAX_SECONDS

    def positive(gb: float) -> bool:
        return gb > 0

    def some(gb: float) -> bool:
        return gb >= 0

    return Learned(
        load_seconds=_figure(f"{model}.load_seconds", entry.get("load_seconds"), seconds, dropped),
        footprint_gb=_figure(f"{model}.footprint_gb", entry.get("footprint_gb"), positive, dropped),
        loads=_count(f"{model}.loads", entry.get("loads", 0), dropped),
        samples=_numbers(f"{model}.samples", entry.get("samples", []), positive, dropped),
        device_samples=_numbers(
            f"{model}.device_samples", entry.get("device_samples", []), positive, dropped
        ),
        wake_seconds=_wake_seconds(f"{model}.wake_seconds", entry.get("wake_seconds"), dropped),
        residue_samples=_numbers(
            f"{model}.residue_samples", entry.get("residue_samples", []), some, dropped
        ),
        context_length=_whole(entry.get("context_length")),
    )


def _count(where: str, value: object, dropped: list[str]) -> int:
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            dropped.append(f"{where} ({value!r})")
            return 0
        return int(value)
    if not isinstance(value, int | str):
        raise TypeError(f"{where} is not a count")
    count = int(value)  # a string that is no number raises: damage
    if count < 0:
        dropped.append(f"{where} ({count})")
        return 0
    return count


def _figure(
    where: str, value: object, good: Callable[[float], bool], dropped: list[str]
) -> float | None:
    """A figure if it is a finite number that `good` accepts; a wrongly typed one is
    dropped silently (as ever), a bad number with a word in `dropped`."""
    number = _number(value)
    if number is None:
        return None
    if not math.isfinite(number) or not good(number):
        dropped.append(f"{where} ({number!r})")
        return None
    return number


def _kept(
    where: str, values: tuple[float, ...], good: Callable[[float], bool], dropped: list[str]
) -> tuple[float, ...]:
    kept = tuple(v for v in values if good(v))
    if len(kept) != len(values):
        bad = [v for v in values if not good(v)]
        dropped.append(f"{where} ({', '.join(f'{v:g}' for v in bad[:3])})")
    return kept


def _wake_seconds(where: str, value: object, dropped: list[str]) -> dict[str, float]:
    """Per tier; a damaged entry costs only itself."""
    items = value.items() if isinstance(value, dict) else ()
    wakes: dict[str, float] = {}
    bad: list[str] = []
    for tier, raw in items:
        number = _number(raw)
        if number is None:
            continue
        if math.isfinite(number) and 0 < number <= MAX_SECONDS:
            wakes[str(tier)] = number
        else:
            bad.append(f"{tier}={number!r}")
    if bad:
        dropped.append(f"{where} ({', '.join(bad[:3])})")
    return wakes


def _numbers(
    where: str, values: object, good: Callable[[float], bool], dropped: list[str]
) -> tuple[float, ...]:
    numbers = [v for v in map(_number, values if isinstance(values, list) else []) if v is not None]
    found = [v for v in numbers if math.isfinite(v) and good(v)]
    if len(found) != len(numbers):
        bad = [v for v in numbers if not (math.isfinite(v) and good(v))]
        dropped.append(f"{where} ({', '.join(repr(v) for v in bad[:3])})")
    return tuple(found[-RECENT_SAMPLES:])


MAX_CONTEXT_TOKENS = 1 << 24  # far past any engine's window: a larger figure is damage


def _whole(value: object) -> int | None:
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    return value if 0 < value <= MAX_CONTEXT_TOKENS else None


def _number(value: object) -> float | None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        return float(value)
    except OverflowError:  # an integer of 400 digits: as damaged as 1e999
        return math.inf
