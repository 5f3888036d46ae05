"""A real `switchd serve` for the benchmarks, with the figures they share."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
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
    return launch(["serve", "--config", str(path)], port)


def launch(
    arguments: list[str],
    port: int,
    ready: Callable[[httpx.Response], bool] = lambda answer: True,
) -> tuple[subprocess.Popen[bytes], str]:
    """`switchd ARGUMENTS` on `port`, once its /health answers as `ready` says."""
    process = subprocess.Popen(
        [sys.executable, "-m", "switchd", *arguments, "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if ready(httpx.get(f"{url}/health", timeout=1)):
                return process, url
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(0.05)
    process.kill()
    raise SystemExit(f"switchd {arguments[0]} did not start")


def stop(process: subprocess.Popen[bytes], grace: float = 30) -> None:
    """SIGTERM, then SIGKILL if it is still there after `grace` seconds."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def rss_kb(pid: int) -> int:
    """The resident memory of process `pid` (VmRSS), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """CPU time process `pid` (all its threads) has used so far.

    From the scheduler's own count in nanoseconds (`/proc/PID/task/*/schedstat`),
    where the kernel keeps it: `/proc/PID/stat`'s user and system times are
    sampled at clock ticks (10 ms here), too coarse and too easily skewed for a
    few hundred requests of a fraction of a millisecond each. Threads that ended
    are gone from the sum, so a process's count is read as it runs, not after.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended as it was read
            total += int((task / "schedstat").read_text().split()[0])
    if total:  # (0: a kernel without schedstat)
        return total / 1e9
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raise_open_files(wanted: int) -> int:
    """Raise this process's soft open-files limit towards `wanted` (children inherit
    it); returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def machine() -> str:
    """One line: the CPUs this ran on, the kernel and the Python."""
    uname = os.uname()
    return (
        f"{os.cpu_count()} CPUs ({cpu_model()}), {uname.sysname} {uname.release} "
        f"{uname.machine}, Python {sys.version.split()[0]}"
    )


def heading(title: str, module: str) -> str:
    """The first lines every benchmark prints: what, where, how and when."""
    command = " ".join([f".venv/bin/python -m {module}", *sys.argv[1:]])
    return (
        f"{title}\n\nMachine: {machine()}. Command: `{command}`. "
        f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.\n"
    )
