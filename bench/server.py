"""A real `switchd serve` for the benchmarks, with the figures they share."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def start_switchd(
    folder: Path, models: dict[str, Any], settings: dict[str, Any] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """switchd on a free port with the simulated GPU; returns it and its URL.

    `settings` (config keys) are merged over the defaults here.
    """
    port = free_port()
    config = {
        "listen": f"127.0.0.1:{port}",
        "runtime": "process",
        "gpu": "simulated",
        "state_dir": str(folder / "state"),
        "models": models,
        **(settings or {}),
    }
    path = folder / "switchd.yaml"
    path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [sys.executable, "-m", "switchd", "serve", "--config", str(path), "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/health", timeout=1)
            return process, url
        except httpx.TransportError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("switchd did not start")
