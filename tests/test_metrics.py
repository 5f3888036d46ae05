"""Metrics directly: stage and switch durations from events, request counts, gauges."""

from __future__ import annotations

import types
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from switchd import metrics as metrics_module
from switchd.events import Event
from switchd.gpu import DeviceMemory, GpuSnapshot
from switchd.metrics import Metrics
from switchd.units import gib_to_bytes


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The time Metrics reads, set by the test (only inside switchd.metrics)."""
    fake = Clock()
    monkeypatch.setattr(metrics_module, "time", types.SimpleNamespace(monotonic=fake))
    return fake


class Feed:
    """Events for Metrics.observe, each at a time the test chooses."""

    def __init__(self, metrics: Metrics, clock: Clock) -> None:
        self.metrics = metrics
        self.clock = clock
        self.next_id = 0

    def at(self, when: float, name: str, job: str | None, **data: Any) -> None:
        self.clock.now = 1000.0 + when
        self.next_id += 1
        payload = {"stage": name, **data} if job is None else {"job": job, "stage": name, **data}
        self.metrics.observe(Event(self.next_id, name, payload))


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def stage(metrics: Metrics, which: str) -> tuple[float | None, float | None]:
    """(count, sum) of one stage's duration histogram."""
    return (
        value(metrics, "switchd_stage_duration_seconds_count", stage=which),
        value(metrics, "switchd_stage_duration_seconds_sum", stage=which),
    )


def switch(metrics: Metrics, result: str) -> tuple[float | None, float | None]:
    return (
        value(metrics, "switchd_switch_duration_seconds_count", result=result),
        value(metrics, "switchd_switch_duration_seconds_sum", result=result),
    )


def test_a_switch_records_each_stage_once_and_its_duration(clock: Clock) -> None:
    metrics = Metrics()
    feed = Feed(metrics, clock)
    feed.at(0.0, "memory_check", "j1")
    feed.at(1.0, "start", "j1")
    feed.at(1.5, "loading", "j1")
    feed.at(2.0, "log", "j1", line="Loading safetensors")  # not a stage
    feed.at(2.2, "model_state", None, model="gpt-oss-20b")  # not a job's
    feed.at(2.5, "loading", "j1")  # the same stage going on
    feed.at(4.0, "ready", "j1")
    feed.at(4.25, "result", "j1", status="success")

    assert stage(metrics, "memory_check") == (1.0, 1.0)
    assert stage(metrics, "start") == (1.0, 0.5)
    assert stage(metrics, "loading") == (1.0, 2.5)  # once, from its first tick to `ready`
    assert stage(metrics, "ready") == (1.0, 0.25)
    for never in ("log", "model_state", "result", "drain"):
        assert stage(metrics, never) == (None, None)
    assert switch(metrics, "success") == (1.0, 4.25)
    bucket = value(metrics, "switchd_switch_duration_seconds_bucket", result="success", le="5.0")
    assert bucket == 1.0
    below = value(metrics, "switchd_switch_duration_seconds_bucket", result="success", le="2.5")
    assert below == 0.0


def test_a_failed_job_records_under_its_error_code(clock: Clock) -> None:
    metrics = Metrics()
    feed = Feed(metrics, clock)
    feed.at(10.0, "memory_check", "j2")
    feed.at(10.5, "error", "j2", error="insufficient_memory", required_gb=120.0)
    assert switch(metrics, "insufficient_memory") == (1.0, 0.5)
    assert stage(metrics, "memory_check") == (1.0, 0.5)
    assert switch(metrics, "success") == (None, None)
    assert stage(metrics, "error") == (None, None)


def test_interleaved_jobs_are_timed_apart(clock: Clock) -> None:
    metrics = Metrics()
    feed = Feed(metrics, clock)
    feed.at(0.0, "memory_check", "a")
    feed.at(0.5, "queued", "b")  # b waits behind a
    feed.at(1.0, "drain", "a", victim="gpt-oss-120b", in_flight=1)
    feed.at(3.0, "unload", "a", victim="gpt-oss-120b")
    feed.at(3.5, "unloaded", "a", victim="gpt-oss-120b")
    feed.at(4.0, "result", "a", status="success")
    feed.at(4.0, "memory_check", "b")
    feed.at(4.5, "result", "b", status="already_loaded")

    assert stage(metrics, "drain") == (1.0, 2.0)
    assert stage(metrics, "unload") == (1.0, 0.5)
    assert stage(metrics, "unloaded") == (1.0, 0.5)
    assert stage(metrics, "queued") == (1.0, 3.5)
    assert stage(metrics, "memory_check") == (2.0, 1.0 + 0.5)
    assert switch(metrics, "success") == (1.0, 4.0)
    assert switch(metrics, "already_loaded") == (1.0, 4.0)
    # A job that ended is forgotten: the same id later starts afresh.
    feed.at(20.0, "memory_check", "a")
    feed.at(21.0, "result", "a", status="success")
    assert switch(metrics, "success") == (2.0, 5.0)


def test_requests_are_counted_by_model_and_status() -> None:
    metrics = Metrics()
    metrics.request_done("gpt-oss-20b", 200, 0.02)
    metrics.request_done("gpt-oss-20b", 200, 3.0)
    metrics.request_done("gpt-oss-20b", 503, 0.6)
    metrics.request_done("unknown", 404, 0.001)

    requests = "switchd_requests_total"
    assert value(metrics, requests, model="gpt-oss-20b", code="200") == 2.0
    assert value(metrics, requests, model="gpt-oss-20b", code="503") == 1.0
    assert value(metrics, requests, model="unknown", code="404") == 1.0
    assert value(metrics, requests, model="unknown", code="200") is None
    duration = "switchd_request_duration_seconds"
    assert value(metrics, f"{duration}_count", model="gpt-oss-20b") == 3.0
    assert value(metrics, f"{duration}_sum", model="gpt-oss-20b") == pytest.approx(3.62)
    assert value(metrics, f"{duration}_bucket", model="gpt-oss-20b", le="0.025") == 1.0
    assert value(metrics, f"{duration}_bucket", model="gpt-oss-20b", le="1.0") == 2.0
    assert value(metrics, f"{duration}_count", model="unknown") == 1.0


def model_status(state: str, in_flight: int = 0) -> dict[str, Any]:
    return {"status": state, "in_flight": in_flight}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_render_sets_the_gauges_from_status_and_gpu() -> None:
    metrics = Metrics()
    status: dict[str, Any] = {
        "models": {
            "gpt-oss-20b": model_status("running", in_flight=3),
            "gpt-oss-120b": {**model_status("exited"), "waiting": 5},
            "mistral-7b-v0.1": model_status("loading"),
        },
        "gpu": {"devices": [{"index": 0, "models": {"gpt-oss-20b": 24.0}}, {"index": 1}]},
    }
    total = gib_to_bytes(95.59)
    snapshot = GpuSnapshot(
        "simulated",
        (
            DeviceMemory(0, "GPU 0", total, gib_to_bytes(24)),
            DeviceMemory(1, "GPU 1", total, 0),
        ),
    )
    text = metrics.render(status, snapshot).decode()
    found = samples(text)

    def at(name: str, **labels: str) -> float:
        return found[(name, frozenset(labels.items()))]

    assert at("switchd_in_flight_requests", model="gpt-oss-20b") == 3.0
    assert at("switchd_in_flight_requests", model="gpt-oss-120b") == 0.0
    states = ("running", "loading", "stopping", "exited", "failed")
    for model, current in (
        ("gpt-oss-20b", "running"),
        ("gpt-oss-120b", "exited"),
        ("mistral-7b-v0.1", "loading"),
    ):
        for state in states:
            expected = 1.0 if state == current else 0.0
            assert at("switchd_model_state", model=model, state=state) == expected
    assert at("switchd_gpu_memory_bytes", device="0", kind="total") == round(95.59 * 2**30)
    assert at("switchd_gpu_memory_bytes", device="0", kind="used") == 24 * 2**30
    assert at("switchd_gpu_memory_bytes", device="0", kind="free") == total - 24 * 2**30
    assert at("switchd_gpu_memory_bytes", device="1", kind="used") == 0.0
    assert at("switchd_gpu_memory_bytes", device="1", kind="free") == total
    assert at("switchd_waiting_requests", model="gpt-oss-120b") == 5.0
    assert at("switchd_waiting_requests", model="gpt-oss-20b") == 0.0
    assert at("switchd_sse_streams") == 0.0
    assert at("switchd_model_memory_bytes", model="gpt-oss-20b", device="0") == 24 * 2**30
    assert 'switchd_model_state{model="gpt-oss-20b",state="running"} 1.0' in text

    # Gauges follow the status at each scrape; they never accumulate.
    status["models"]["gpt-oss-20b"] = model_status("stopping")
    found = samples(metrics.render(status, snapshot).decode())
    assert at("switchd_in_flight_requests", model="gpt-oss-20b") == 0.0
    assert at("switchd_model_state", model="gpt-oss-20b", state="running") == 0.0
    assert at("switchd_model_state", model="gpt-oss-20b", state="stopping") == 1.0
    assert at("switchd_waiting_requests", model="gpt-oss-20b") == 0.0


def test_each_metrics_has_a_registry_of_its_own() -> None:
    first, second = Metrics(), Metrics()
    first.request_done("gpt-oss-20b", 200, 0.1)
    assert value(first, "switchd_requests_total", model="gpt-oss-20b", code="200") == 1.0
    assert value(second, "switchd_requests_total", model="gpt-oss-20b", code="200") is None
