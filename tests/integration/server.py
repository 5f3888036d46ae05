"""A real switchd (`python -m switchd serve`) on a free port, with demo engines."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from switchd.client import ServerEvent, SseParser
from switchd.runtime.process import free_port

STOP_EVENTS = frozenset({"result", "error"})


def engine_cmd(load_seconds: float, *extra: str) -> str:
    return (
        "${PYTHON} -m switchd.demo.engine --port ${PORT} --model ${MODEL} "
        f"--load-seconds {load_seconds} --tokens-per-second 200 {' '.join(extra)}"
    ).strip()


def seed_models(load_seconds: float = 0.5) -> dict[str, Any]:
    """The seed's four models, sized so gpt-oss-120b and gpt-oss-20b do not fit together."""
    return {
        "gpt-oss-120b": {"cmd": engine_cmd(load_seconds), "size_gb": 80, "load_time_seconds": 1},
        "gpt-oss-20b": {
            "cmd": engine_cmd(load_seconds),
            "size_gb": 24,
            "load_time_seconds": 1,
            "aliases": ["20b"],
        },
        "deepseek-coder-33b-instruct": {"cmd": engine_cmd(load_seconds), "size_gb": 40},
        "mistral-7b-v0.1": {"cmd": engine_cmd(load_seconds), "size_gb": 18},
    }


@dataclass
class Server:
    state_dir: Path
    config: Path
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        env = {**os.environ, **self.extra_env, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "switchd", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"switchd exited at start:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError(f"switchd did not answer within {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 20.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def write_config(tmp_path: Path, models: dict[str, Any], **settings: Any) -> Server:
    port = free_port()
    state_dir = tmp_path / "state"
    data: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "runtime": "process",
        "gpu": "simulated",
        "simulated_gpu": {"total_gb": 95.59, "release_delay_seconds": 0.3},
        "memory_release_timeout_seconds": 5,
        "health_timeout_seconds": 30,
        "stop_grace_seconds": 5,
        "state_dir": str(state_dir),
        "models": models,
    }
    data.update(settings)
    config = tmp_path / "switchd.yaml"
    config.write_text(yaml.safe_dump(data))
    return Server(state_dir, config, port, tmp_path / "switchd.log")


async def read_events(
    response: httpx.Response, stop: frozenset[str] = STOP_EVENTS, within: float = 30.0
) -> list[tuple[float, ServerEvent]]:
    """(arrival time, event) until one named in `stop`; fails past `within` seconds."""
    received: list[tuple[float, ServerEvent]] = []

    async def collect() -> None:
        parser = SseParser()
        async for line in response.aiter_lines():
            event = parser.feed(line)
            if event is None:
                continue
            received.append((time.monotonic(), event))
            if event.name in stop:
                return

    await asyncio.wait_for(collect(), within)
    return received
