"""Process helpers shared by the tests that start real processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path


def kill_groups(groups: list[int]) -> None:
    """SIGKILL to each process group: whatever a failed test left running."""
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)


def gone(pid: int) -> bool:
    """No such process, or only a zombie waiting to be reaped (dead for our purposes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def wait_gone(pid: int, within: float) -> bool:
    """Whether `pid` is gone within `within` seconds."""
    deadline = time.monotonic() + within
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True
