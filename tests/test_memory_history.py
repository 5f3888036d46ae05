"""The GPU memory samples switchd keeps for the UI's chart: bounded to the chart's
window, each with its time and every device's figures."""

from __future__ import annotations

import asyncio

from switchd.gpu import DeviceMemory, GpuSnapshot
from switchd.memory_history import MemoryHistory

GIB = 2**30


class Probe:
    """Answers snapshots of two devices whose use grows by 1 GiB a read."""

    source = "simulated"

    def __init__(self) -> None:
        self.reads = 0
        self.third = asyncio.Event()

    async def snapshot(self) -> GpuSnapshot:
        self.reads += 1
        if self.reads == 3:
            self.third.set()
        return GpuSnapshot(
            "simulated",
            (
                DeviceMemory(0, "sim", 48 * GIB, self.reads * GIB),
                DeviceMemory(1, "sim", 48 * GIB, 0),
            ),
        )

    async def close(self) -> None:
        pass


def test_samples_keep_the_window_and_one_more() -> None:
    ticks = iter(range(1_800_000_000, 1_800_001_000))
    history = MemoryHistory(Probe(), every=2.0, window=10.0, clock=lambda: float(next(ticks)))
    for used in range(1, 10):
        snapshot = GpuSnapshot("simulated", (DeviceMemory(0, "sim", 48 * GIB, used * GIB),))
        history.record(snapshot)
    samples = history.samples()
    # 10 s of 2 s samples, and one before them: 7 kept of 9, the oldest dropped.
    assert [s["devices"][0]["used_gb"] for s in samples] == [3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    assert samples[0]["devices"] == [{"index": 0, "used_gb": 3.0, "total_gb": 48.0}]
    assert samples[0]["at"] == "2027-01-15T08:00:02.000Z"


async def test_the_task_samples_every_device_until_cancelled() -> None:
    probe = Probe()
    history = MemoryHistory(probe, every=0.01)
    task = asyncio.create_task(history.run())
    await asyncio.wait_for(probe.third.wait(), 5)
    task.cancel()
    samples = history.samples()
    assert len(samples) >= 3
    assert [d["index"] for d in samples[0]["devices"]] == [0, 1]
    assert samples[1]["devices"][0]["used_gb"] == samples[0]["devices"][0]["used_gb"] + 1
