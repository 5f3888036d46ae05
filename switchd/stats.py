"""What switchd learned about each model: load time and memory footprint.

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


@dataclass(frozen=True)
class Learned:
    load_seconds: float | None = None
    footprint_gb: float | None = None
    loads: int = 0


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
                )
                for name, entry in raw.items()
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            # A damaged file costs only the estimates, never the start-up.
            log.warning("ignoring unreadable %s: %s", self._path, exc)
            return {}

    async def record(self, model: str, load_seconds: float, footprint_gb: float | None) -> None:
        previous = self.get(model)
        if footprint_gb is None or footprint_gb <= 0:
            # Nothing measurable (another process freed memory meanwhile): keep the old figure.
            footprint_gb = previous.footprint_gb
        self._by_model[model] = Learned(
            load_seconds=round(load_seconds, 2),
            footprint_gb=footprint_gb,
            loads=previous.loads + 1,
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


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
