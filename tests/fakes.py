"""Recording fakes for the Runtime protocol and the engines' health routes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from switchd.config import ModelSpec, Settings, parse_settings
from switchd.runtime.base import (
    Discovery,
    EngineExited,
    EngineInfo,
    EngineOutput,
    EventQueue,
    RuntimeEvent,
    StartFailed,
)


@dataclass
class FakeRuntime:
    """Starts nothing; records calls; engines turn healthy after `load_seconds`."""

    load_seconds: dict[str, float] = field(default_factory=dict)
    default_load_seconds: float = 0.05
    stop_seconds: float = 0.0
    fail_start: set[str] = field(default_factory=set)
    adopted: list[EngineInfo] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    started_on: dict[str, tuple[int, ...] | None] = field(default_factory=dict)  # model: devices
    ready_at: dict[str, float] = field(default_factory=dict)
    instances: dict[str, str] = field(default_factory=dict)
    lines: dict[str, list[str]] = field(default_factory=dict)
    _events: EventQueue = field(default_factory=EventQueue)
    _counter: int = 0

    async def start(self, spec: ModelSpec, devices: tuple[int, ...] | None = None) -> EngineInfo:
        self.calls.append(f"start {spec.name}")
        self.started_on[spec.name] = devices
        if spec.name in self.fail_start:
            raise StartFailed(f"cannot run {spec.name!r}: No such file or directory")
        self._counter += 1
        instance = f"{spec.name}#{self._counter}"
        self.instances[spec.name] = instance
        self.ready_at[spec.name] = time.monotonic() + self.load_seconds.get(
            spec.name, self.default_load_seconds
        )
        url = f"http://{spec.name}.engine"
        return EngineInfo(spec.name, instance, url, time.time(), pid=4242, devices=devices)

    async def stop(self, spec: ModelSpec, grace_seconds: float) -> None:
        self.calls.append(f"stop {spec.name}")
        self.ready_at.pop(spec.name, None)
        await asyncio.sleep(self.stop_seconds)
        instance = self.instances.pop(spec.name, None)
        if instance is not None:
            self._events.put(EngineExited(spec.name, instance, 0, "stopped", ()))

    async def discover(self) -> Discovery:
        for info in self.adopted:
            self.instances[info.model] = info.instance
            self.ready_at[info.model] = 0.0
        return Discovery(list(self.adopted), dict(self.unavailable))

    def events(self) -> AsyncIterator[RuntimeEvent]:
        return aiter(self._events)

    def last_lines(self, model: str) -> tuple[str, ...]:
        return tuple(self.lines.get(model, []))

    async def engine_pids(self, info: EngineInfo) -> list[int]:
        return [info.pid] if info.pid is not None else []

    async def close(self) -> None:
        self._events.end()

    # ---- what a test makes an engine do -----------------------------------------

    def print_line(self, model: str, line: str) -> None:
        self.lines.setdefault(model, []).append(line)
        self._events.put(EngineOutput(model, self.instances[model], line))

    def crash(self, model: str, code: int = 1) -> None:
        instance = self.instances.pop(model)
        self.ready_at.pop(model, None)
        tail = tuple(self.lines.get(model, []))
        reason = f"exited with code {code}"
        self._events.put(EngineExited(model, instance, code, reason, tail))

    def transport(self) -> httpx.MockTransport:
        """Health answers for the fake engines: 200 once loaded, else 503."""

        def handle(request: httpx.Request) -> httpx.Response:
            model = request.url.host.removesuffix(".engine")
            ready_at = self.ready_at.get(model)
            if ready_at is not None and time.monotonic() >= ready_at:
                return httpx.Response(200, json={"status": "ok"})
            return httpx.Response(503, json={"status": "loading"})

        return httpx.MockTransport(handle)


SEED_MODELS: dict[str, Any] = {
    "gpt-oss-120b": {"cmd": "engine", "size_gb": 80, "load_time_seconds": 8},
    "gpt-oss-20b": {"cmd": "engine", "size_gb": 24, "load_time_seconds": 3, "aliases": ["20b"]},
    "deepseek-coder-33b-instruct": {"cmd": "engine", "size_gb": 40},
    "mistral-7b-v0.1": {"cmd": "engine", "size_gb": 18},
}


def make_settings(tmp_path: Path, models: dict[str, Any] | None = None, **extra: Any) -> Settings:
    data: dict[str, Any] = {
        "runtime": "process",
        "gpu": "simulated",
        "simulated_gpu": {"total_gb": 95.59},
        "memory_release_timeout_seconds": 2,
        "health_timeout_seconds": 5,
        "drain_timeout_seconds": 5,
        "state_dir": str(tmp_path / "state"),
        "models": models or SEED_MODELS,
    }
    data.update(extra)
    return parse_settings(data, "test.yaml", {})
