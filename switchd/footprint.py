"""Whose memory is it? A footprint sample, only where it can be attributed to the engine.

Pure: two GPU snapshots (before the start, after ready) and what is known of
the engine in, a per-device figure (or the reason there is none) out.

- NVML's per-process figures for the engine's PIDs are its own: they win.
- Otherwise free-before minus free-after counts only if no other engine
  started, stopped, died or was still handing memory back meanwhile (`moved`),
  and only if it is not far below what the engine is expected to hold: a
  sample that came out low because something else released memory would let
  the planner put two models on a card that cannot hold them both.
"""

from __future__ import annotations

from collections.abc import Sequence

from switchd.gpu import GpuSnapshot
from switchd.units import gib

PLAUSIBLE_SHARE = 0.5  # a sample below this share of the expected footprint is dropped


def attribute(
    devices: Sequence[int],
    before: GpuSnapshot,
    after: GpuSnapshot,
    pids: Sequence[int],
    *,
    moved: bool,
    expected_gb: float,
) -> tuple[dict[int, float] | None, str | None]:
    """(GB per device, None), or (None, why the sample cannot be trusted)."""
    wanted = set(pids)
    mine: dict[int, int] = {}
    for process in after.processes:
        if process.pid in wanted and process.device in devices:
            mine[process.device] = mine.get(process.device, 0) + process.used_bytes
    if mine:
        return {device: gib(used) for device, used in sorted(mine.items())}, None
    if moved:
        return None, "other engines' memory moved while it loaded"
    free_before, free_after = before.free_by_device(), after.free_by_device()
    by_device = {d: gib(free_before.get(d, 0) - free_after.get(d, 0)) for d in devices}
    sample = round(sum(by_device.values()), 2)
    if sample < PLAUSIBLE_SHARE * expected_gb:
        return None, (
            f"an implausible sample: {sample:.2f} GB measured, about {expected_gb:.2f} GB expected"
        )
    if sample > gib(after.total_bytes(devices)):
        return None, f"an implausible sample: {sample:.2f} GB, more than its devices hold"
    return by_device, None
