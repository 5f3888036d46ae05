"""switchd's own log: formats, and one line per finished job and settled state."""

from __future__ import annotations

import json
import logging
import re

import pytest

from switchd.config import LogFormat
from switchd.events import Event
from switchd.logs import JobLog, JsonFormatter, TextFormatter, log_config


def record(message: str, **extra: object) -> logging.LogRecord:
    entry = logging.LogRecord("switchd.jobs", logging.INFO, "f", 1, message, (), None)
    entry.__dict__.update(extra)
    return entry


def test_json_lines_carry_time_level_logger_message_and_fields() -> None:
    line = json.loads(JsonFormatter().format(record("switch done", model="m", seconds=1.5)))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line.pop("ts"))
    assert line == {
        "level": "INFO",
        "logger": "switchd.jobs",
        "message": "switch done",
        "model": "m",
        "seconds": 1.5,
    }


def test_text_lines_start_with_a_timestamp() -> None:
    line = TextFormatter().format(record("hello"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO switchd.jobs: hello", line)


def test_uvicorn_logs_through_switchds_handler() -> None:
    config = log_config("info", LogFormat.JSON)
    assert config["formatters"]["switchd"]["()"] == "switchd.logs.JsonFormatter"
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        assert config["loggers"][name]["handlers"] == []
        assert config["loggers"][name]["propagate"] is True
    assert config["root"]["handlers"] == ["switchd"]


def test_one_line_per_finished_job_and_per_settled_state(
    caplog: pytest.LogCaptureFixture,
) -> None:
    jobs = JobLog()
    common = {"job": "j1", "kind": "switch", "cause": "explicit", "model": "big"}
    caplog.set_level(logging.INFO, "switchd.jobs")
    jobs.observe(Event(1, "memory_check", common))
    jobs.observe(Event(2, "model_state", {"model": "small", "from": "running", "to": "stopping"}))
    jobs.observe(Event(3, "unloaded", {**common, "victim": "small", "freed_gb": 18.0}))
    jobs.observe(Event(4, "model_state", {"model": "small", "from": "stopping", "to": "exited"}))
    jobs.observe(Event(5, "log", {**common, "line": "weights"}))
    jobs.observe(Event(6, "result", {**common, "status": "success"}))
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines[0] == ("INFO", "model small: stopping -> exited")
    level, message = lines[1]
    assert level == "INFO"
    assert re.fullmatch(
        r"switch j1 \(explicit\) to big: success in \d+\.\d s; unloaded small, freed 18\.0 GB",
        message,
    )
    assert len(lines) == 2
    done = caplog.records[1].__dict__
    assert (done["victims"], done["result"], done["freed_gb"], done["event_id"]) == (
        ["small"],
        "success",
        18.0,
        6,
    )
    jobs.observe(Event(7, "error", {**common, "job": "j2", "error": "shutting_down"}))
    assert caplog.records[2].levelname == "WARNING"
    assert caplog.records[2].__dict__["result"] == "shutting_down"
