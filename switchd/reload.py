"""Live config: what a reloaded file changes (`diff`, pure) and reading it (`read`).

A reload is a diff between the Settings switchd runs with and the file's: models
added, removed, changed (an engine setting differs: its engine restarts) and
unchanged (the same engine settings: the engine is kept; switchd-only fields
such as `ttl_seconds` or `aliases` take effect at once). Top-level keys that were
read once at start (the listening socket, the runtime, the GPU probe, the
state_dir, the auth and proxy layers) cannot change live: they are refused with
the reason and keep their value; the rest of the file applies. The scheduler
applies a diff in its worker once no job runs (`Scheduler.reload`).

Which Settings are current: the scheduler's (`Scheduler.settings`); the objects
that read it while working (the loader, the steps, the catalog) are handed the
new one by the worker. What was built from the start-up Settings (the app's
Services, middleware, uvicorn) keeps it: those are the refused keys.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from switchd.config import ConfigError, Settings, engine_digest, load_settings
from switchd.events import EventBus
from switchd.wire import CONFIG_RELOADED

log = logging.getLogger(__name__)


_RESTART = "is read once at start: restart switchd to change it"
# Top-level fields that cannot change live, and why (a field not named here may).
FIXED: Mapping[str, str] = {
    "host": "the listening socket is open: restart switchd to move it",
    "port": "the listening socket is open: restart switchd to move it",
    "runtime": "engines run under the runtime opened at start: restart switchd to change it",
    "gpu": "the GPU probe was opened at start: restart switchd to change it",
    "simulated_gpu": "the GPU probe was opened at start: restart switchd to change it",
    "state_dir": "learned figures and pid files live there: restart switchd to move it",
    "api_keys": "the auth layer was built at start: " + _RESTART,
    "inference_keys": "the auth layer was built at start: " + _RESTART,
    "read_keys": "the auth layer was built at start: " + _RESTART,
    "cors_allow_origins": "the CORS layer was built at start: " + _RESTART,
    "max_connections": "the HTTP server was configured at start: " + _RESTART,
    "header_read_timeout_seconds": "the HTTP server was configured at start: " + _RESTART,
    "max_buffered_body_bytes": "the body budget was made at start: " + _RESTART,
    "max_body_bytes": "the proxy was built at start: " + _RESTART,
    "body_read_timeout_seconds": "the proxy was built at start: " + _RESTART,
    "load_progress_in_stream": "the proxy was built at start: " + _RESTART,
    "keep_engines_on_exit": "the runtime was opened at start: " + _RESTART,
    "standby_host_ram_gb": "the sleep budget was set at start: " + _RESTART,
    "journal_max_bytes": "the event journal was opened at start: " + _RESTART,
    "log_format": "logging was set up at start: " + _RESTART,
}


_FILE_KEYS = {"host": "listen", "port": "listen"}  # fields the file writes as one key


class ReloadError(Exception):
    """The file cannot be applied: nothing changed. `problem` says why."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


@dataclass(frozen=True)
class Diff:
    """What a reload changes. `settings`: the Settings to run with (the new file's,
    with the refused keys kept as they were)."""

    settings: Settings
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()  # engine settings differ: restarted when next idle
    unchanged: tuple[str, ...] = ()  # same engine settings: the engine is kept
    refused: Mapping[str, str] = field(default_factory=dict)  # top-level key: why

    def as_json(self) -> dict[str, Any]:
        return {
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": list(self.changed),
            "unchanged": list(self.unchanged),
            "refused": dict(self.refused),
        }


def diff(old: Settings, new: Settings) -> Diff:
    """What going from `old` to `new` changes (pure)."""
    fixed = [name for name in FIXED if getattr(old, name) != getattr(new, name)]
    refused = {_FILE_KEYS.get(name, name): FIXED[name] for name in fixed}
    kept = {name: getattr(old, name) for name in fixed}
    settings = dataclasses.replace(new, **kept) if kept else new
    added = tuple(name for name in new.models if name not in old.models)
    removed = tuple(name for name in old.models if name not in new.models)
    changed: list[str] = []
    unchanged: list[str] = []
    for name, spec in new.models.items():
        if name in old.models:
            same = engine_digest(old.models[name]) == engine_digest(spec)
            (unchanged if same else changed).append(name)
    return Diff(settings, added, removed, tuple(changed), tuple(unchanged), refused)


def read(path: Path) -> Settings:
    """The config file again (blocking: call it in a worker thread); ReloadError
    saying why when it does not parse or validate."""
    try:
        return load_settings(path)
    except ConfigError as exc:
        raise ReloadError(str(exc)) from None


async def read_again(current: Settings) -> Settings:
    """The file `current` was read from, read again off the event loop."""
    if current.source.startswith("<"):
        raise ReloadError(f"switchd was not started from a config file ({current.source})")
    return await asyncio.to_thread(read, Path(current.source))


Apply = Callable[[Diff, bool], Awaitable[None]]  # the scheduler's: in its worker
Validate = Callable[[Settings], Awaitable[None]]  # raises ConfigError (the runtime, the GPU)


class Reloader:
    """Reads the file again and has the diff applied; one reload at a time.

    SIGHUP, `POST /v1/config/reload` and `switchd reload` all come here. Either
    outcome is published as a `config_reloaded` event and logged.
    """

    def __init__(
        self, current: Callable[[], Settings], apply: Apply, validate: Validate, bus: EventBus
    ) -> None:
        self._current = current
        self._apply = apply
        self._validate = validate
        self._bus = bus
        self._lock = asyncio.Lock()

    async def reload(self, *, now: bool = False) -> Diff:
        """The diff applied; ReloadError (nothing changed) when the file is not valid."""
        async with self._lock:
            old = self._current()
            try:
                change = diff(old, await read_again(old))
                await self._validate(change.settings)  # as it would run: refused keys kept
            except ReloadError as exc:
                self._failed(exc.problem)
                raise
            except ConfigError as exc:
                self._failed(str(exc))
                raise ReloadError(str(exc)) from None
            await self._apply(change, now)
        for key, why in change.refused.items():
            log.warning("config reload: %s not changed: %s", key, why)
        log.info(
            "config reloaded: %d added, %d removed, %d changed, %d unchanged",
            len(change.added),
            len(change.removed),
            len(change.changed),
            len(change.unchanged),
        )
        self._bus.publish(CONFIG_RELOADED, {"status": "ok", **change.as_json()})
        return change

    def _failed(self, problem: str) -> None:
        log.error("config reload refused, nothing changed: %s", problem)
        self._bus.publish(CONFIG_RELOADED, {"status": "error", "error": problem})
