"""Simulated GPU hosts for the cluster tests: each a real switchd (process runtime,
demo engines, a simulated card) on a free loopback port, and a gateway process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from switchd.runtime.process import free_port
from tests.integration.server import Server, engine_cmd, write_config


def cluster_models(load_seconds: float = 0.3) -> dict[str, Any]:
    """Three models on a 95.59 GB card: big (80) fits with neither other; small (24) and
    mid (40) fit together."""
    return {
        "big": {"cmd": engine_cmd(load_seconds), "size_gb": 80, "load_time_seconds": 1},
        "mid": {"cmd": engine_cmd(load_seconds), "size_gb": 40, "load_time_seconds": 1},
        "small": {
            "cmd": engine_cmd(load_seconds),
            "size_gb": 24,
            "load_time_seconds": 1,
            "aliases": ["s"],
        },
    }


def start_hosts(folder: Path, count: int, **settings: Any) -> list[Server]:
    hosts = []
    for index in range(count):
        where = folder / f"host{index}"
        where.mkdir(parents=True, exist_ok=True)
        server = write_config(where, cluster_models(), **settings)
        server.start()
        hosts.append(server)
    return hosts


def switch(server: Server, model: str) -> None:
    answer = httpx.post(
        f"{server.url}/v1/models/switch",
        params={"target_model": model, "wait": "ready"},
        timeout=30,
    )
    answer.raise_for_status()


@dataclass
class Gateway:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_gateway(folder: Path, *args: str, hosts: int, timeout: float = 30) -> Gateway:
    """`switchd gateway ARGS` on a free port; returns once it sees `hosts` reachable."""
    port = free_port()
    log_path = folder / f"gateway-{port}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "switchd", "gateway", "--listen", f"127.0.0.1:{port}", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    gateway = Gateway(port, process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited:\n{gateway.log()}")
        try:
            health = httpx.get(f"{gateway.url}/health", timeout=1).json()
            if health["hosts"]["reachable"] >= hosts:
                return gateway
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(0.1)
    gateway.stop()
    raise RuntimeError(
        f"the gateway did not see {hosts} hosts within {timeout} s:\n{gateway.log()}"
    )
