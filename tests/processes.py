"""Process helpers shared by the tests that start real processes."""

from __future__ import annotations

import os
from pathlib import Path


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
