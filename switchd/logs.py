"""switchd's own log: text or JSON lines, every line timestamped, uvicorn's too.

`log_config` is one `logging.config.dictConfig` for switchd and for uvicorn
(passed to it as `log_config`, so its lines share the format). JSON lines carry
`ts`, `level`, `logger`, `message` and the fields a line was given (`extra=`),
so a collector needs no pattern to parse them.

`JobLog` listens to the event bus and writes what an operator looks for in
`journalctl` or `docker logs`: one INFO line per finished job (kind, cause,
model, victims, result, seconds, freed GB) and one per model state change that
ends somewhere (running, sleeping, exited, failed: not the steps between).
Credentials never reach it: the access log masks them (switchd/access.py), and
events carry none.
"""

from __future__ import annotations

import json
import logging
import logging.config
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from switchd import wire
from switchd.config import LogFormat
from switchd.events import Event
from switchd.states import ModelState, Stage
from switchd.units import iso_timestamp

log = logging.getLogger("switchd.jobs")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The attributes every LogRecord has: anything else on a record came with `extra=`.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)
WORTH_A_LINE = frozenset(
    {ModelState.RUNNING, ModelState.SLEEPING, ModelState.EXITED, ModelState.FAILED}
)
HANDLER = "switchd"  # the name of switchd's own handler on the root logger
JOBS_TRACKED = 256  # jobs whose end is still to come; the oldest are forgotten past it


class TextFormatter(logging.Formatter):
    """`2026-01-02T03:04:05.678Z INFO switchd.jobs: …`: UTC, like the events' `ts`."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso_timestamp(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, message, then the record's extras."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": iso_timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD and not name.startswith("_") and name not in line:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, separators=(",", ":"))


def log_config(level: str, fmt: LogFormat) -> dict[str, Any]:
    """The dictConfig for switchd and uvicorn: one handler on stderr, at the root."""
    formatter = JsonFormatter if fmt is LogFormat.JSON else TextFormatter
    uvicorn = {"handlers": [], "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"switchd": {"()": f"{formatter.__module__}.{formatter.__qualname__}"}},
        "handlers": {
            HANDLER: {
                "class": "logging.StreamHandler",
                "formatter": "switchd",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level.upper(), "handlers": [HANDLER]},
        "loggers": {
            "uvicorn": {**uvicorn, "level": level.upper()},
            "uvicorn.error": uvicorn,
            "uvicorn.access": uvicorn,
            # One line per health poll drowns what matters; keep httpx to warnings.
            "httpx": {"level": "WARNING"},
        },
    }


def configure(level: str, fmt: LogFormat) -> dict[str, Any] | None:
    """Configure logging as `log_config` says and return that config (for uvicorn),
    unless something else configured the root logger already (a test, an app that
    embeds switchd): then, as `logging.basicConfig`, leave it, and return None."""
    root = logging.getLogger()
    if any(handler.get_name() != HANDLER for handler in root.handlers):
        return None
    config = log_config(level, fmt)
    logging.config.dictConfig(config)
    return config


@dataclass
class _Seen:
    """What a job's events said so far."""

    began: float  # monotonic, at its first event
    victims: list[str] = field(default_factory=list)
    freed_gb: float = 0.0


class JobLog:
    """A bus listener (quick, never blocks): the log lines of finished jobs and of
    model state changes."""

    def __init__(self) -> None:
        self._jobs: OrderedDict[str, _Seen] = OrderedDict()

    def observe(self, event: Event) -> None:
        data = event.data
        if event.name == wire.MODEL_STATE:
            self._state(data)
            return
        job = data.get("job")
        if not isinstance(job, str) or event.name == wire.LOG:
            return
        seen = self._jobs.get(job)
        if seen is None:
            while len(self._jobs) >= JOBS_TRACKED:
                self._jobs.popitem(last=False)
            seen = self._jobs[job] = _Seen(time.monotonic())
        if event.name in (Stage.UNLOADED, Stage.SLEPT):
            victim = data.get("victim")
            if isinstance(victim, str):
                seen.victims.append(victim)
            freed = data.get("freed_gb")
            if isinstance(freed, int | float):
                seen.freed_gb += freed
        if event.name in wire.JOB_END:
            del self._jobs[job]
            self._finished(event, seen)

    @staticmethod
    def _finished(event: Event, seen: _Seen) -> None:
        data = event.data
        result = data.get("status") if event.name == wire.RESULT else data.get("error")
        fields = {
            "job": data.get("job"),
            "kind": data.get("kind"),
            "cause": data.get("cause"),
            "model": data.get("model"),
            "victims": seen.victims,
            "result": result or event.name,
            "seconds": round(time.monotonic() - seen.began, 2),
            "freed_gb": round(seen.freed_gb, 2),
            "event_id": event.id,
        }
        victims = ", ".join(seen.victims) or "none"
        level = logging.INFO if event.name == wire.RESULT else logging.WARNING
        log.log(
            level,
            "%s %s (%s) to %s: %s in %.1f s; unloaded %s, freed %.1f GB",
            fields["kind"],
            fields["job"],
            fields["cause"],
            fields["model"],
            fields["result"],
            fields["seconds"],
            victims,
            fields["freed_gb"],
            extra=fields,
        )

    @staticmethod
    def _state(data: Any) -> None:
        to = data.get("to")
        if to not in WORTH_A_LINE:
            return
        fields = {"model": data.get("model"), "from": data.get("from"), "to": to}
        error = data.get("error")
        if error:
            fields["error"] = error
        level = logging.WARNING if to == ModelState.FAILED else logging.INFO
        tail = f": {error}" if error else ""
        log.log(
            level, "model %s: %s -> %s%s", fields["model"], fields["from"], to, tail, extra=fields
        )
