"""Prometheus metrics, in a registry of the app's own (no global state).

Counters and histograms are fed as things happen: the proxy reports each
request, and the event bus hands every stage event to `observe`, which turns
consecutive stages of a job into stage and switch durations. Gauges are read
from the status body at scrape time, so they can never drift from it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from switchd import wire
from switchd.events import Event
from switchd.gpu import GpuSnapshot
from switchd.states import ModelState
from switchd.units import gib_to_bytes

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SWITCH_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 900)
WAIT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


# The scheduler's outcomes of a wait that ended with the request unserved, by its side.
GAVE_UP = frozenset({"gone", "timeout"})


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "switchd_requests",
            "Proxied requests by model and HTTP status",
            ["model", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "switchd_request_duration_seconds",
            "Proxied request duration, load waits included",
            ["model"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.switch_seconds = Histogram(
            "switchd_switch_duration_seconds",
            "Switch and unload jobs, first to last event",
            ["result"],
            buckets=SWITCH_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "switchd_stage_duration_seconds",
            "Time spent in each job stage",
            ["stage"],
            buckets=SWITCH_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "switchd_in_flight_requests", "Requests being served, by model", ["model"], registry=r
        )
        self.waiting = Gauge(
            "switchd_waiting_requests",
            "Requests waiting for their model to serve, by model",
            ["model"],
            registry=r,
        )
        self.switches = Counter(
            "switchd_jobs",
            "Finished jobs by kind (switch, unload), cause (explicit, demand, ttl) and result",
            ["kind", "cause", "result"],
            registry=r,
        )
        self.wait_seconds = Histogram(
            "switchd_load_wait_seconds",
            "Time proxied requests spent waiting for their model, by outcome",
            ["model", "outcome"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.given_up = Counter(
            "switchd_requests_given_up",
            "Proxied requests that gave up waiting for their model (the client left, or "
            "request_timeout_seconds passed): demand that was not met, by model",
            ["model"],
            registry=r,
        )
        self.model_state = Gauge(
            "switchd_model_state",
            "1 for the state each model is in",
            ["model", "state"],
            registry=r,
        )
        self.gpu_memory = Gauge(
            "switchd_gpu_memory_bytes", "GPU memory by device", ["device", "kind"], registry=r
        )
        self.model_memory = Gauge(
            "switchd_model_memory_bytes",
            "GPU memory each loaded model holds, by device (measured, else expected)",
            ["model", "device"],
            registry=r,
        )
        self.sse_streams = Gauge(
            "switchd_sse_streams", "Open Server-Sent Event streams", registry=r
        )
        self.subscribers = Gauge(
            "switchd_event_subscribers", "Readers of the server's event bus", registry=r
        )
        self._jobs: dict[str, tuple[str, float, float]] = {}  # job: (stage, since, started)
        # Bounded: models are the catalog's (or "unknown"), statuses a few codes.
        self._request_counters: dict[tuple[str, int], Counter] = {}
        self._request_timers: dict[str, Histogram] = {}

    def request_done(self, model: str, status: int, seconds: float) -> None:
        # Each labelled child looked up once: labels() takes a lock and builds a key,
        # every request (bench/proxy.py).
        key = (model, status)
        counted = self._request_counters.get(key)
        if counted is None:
            counted = self._request_counters[key] = self.requests.labels(model, str(status))
        timed = self._request_timers.get(model)
        if timed is None:
            timed = self._request_timers[model] = self.request_seconds.labels(model)
        counted.inc()
        timed.observe(seconds)

    def waited(self, model: str, seconds: float, outcome: str) -> None:
        """Called by the scheduler when a request stops waiting for its model."""
        self.wait_seconds.labels(model, outcome).observe(seconds)
        if outcome in GAVE_UP:
            self.given_up.labels(model).inc()

    def observe(self, event: Event) -> None:
        """Called by the event bus for every event it publishes."""
        if event.name in wire.NOT_STAGES:
            return
        job = str(event.data.get("job"))
        now = time.monotonic()
        previous = self._jobs.get(job)
        if previous is not None:
            stage, since, started = previous
            if stage == event.name:
                return  # another tick of the same stage (`loading`): it goes on
            self.stage_seconds.labels(stage).observe(now - since)
        else:
            started = now
        if event.name in wire.JOB_END:
            self._jobs.pop(job, None)
            result = str(event.data.get("status") or event.data.get("error") or event.name)
            self.switch_seconds.labels(result).observe(now - started)
            kind, cause = str(event.data.get("kind")), str(event.data.get("cause"))
            self.switches.labels(kind, cause, result).inc()
        else:
            self._jobs[job] = (event.name, now, started)

    def render(self, status: Mapping[str, Any], gpu: GpuSnapshot, subscribers: int = 0) -> bytes:
        for name, model in status["models"].items():
            self.in_flight.labels(name).set(model["in_flight"])
            self.waiting.labels(name).set(model.get("waiting", 0))
            for state in ModelState:
                self.model_state.labels(name, state.value).set(model["status"] == state.value)
        self.model_memory.clear()  # a model unloaded since the last scrape holds nothing
        for device in status["gpu"]["devices"]:
            for model, held_gb in device.get("models", {}).items():
                self.model_memory.labels(model, str(device["index"])).set(gib_to_bytes(held_gb))
        for device in gpu.devices:
            index = str(device.index)
            self.gpu_memory.labels(index, "used").set(device.used_bytes)
            self.gpu_memory.labels(index, "total").set(device.total_bytes)
            self.gpu_memory.labels(index, "free").set(device.free_bytes)
        self.subscribers.set(subscribers)
        return generate_latest(self.registry)
