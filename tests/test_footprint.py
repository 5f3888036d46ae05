"""Whose memory is it: footprint samples from two snapshots, per device."""

from __future__ import annotations

from switchd.footprint import attribute
from switchd.gpu import DeviceMemory, GpuSnapshot, ProcessMemory
from switchd.units import gib_to_bytes

CARD = gib_to_bytes(48)


def snapshot(used_gb: tuple[float, ...], *processes: ProcessMemory) -> GpuSnapshot:
    devices = tuple(DeviceMemory(i, "GPU", CARD, gib_to_bytes(gb)) for i, gb in enumerate(used_gb))
    return GpuSnapshot("nvml", devices, processes)


def test_nvmls_figures_for_the_engines_pids_win_device_by_device() -> None:
    after = snapshot(
        (50, 30),
        ProcessMemory(100, 0, gib_to_bytes(20)),  # the engine, on both of its devices
        ProcessMemory(101, 1, gib_to_bytes(20)),
        ProcessMemory(999, 0, gib_to_bytes(30)),  # someone else's
        ProcessMemory(100, 2, gib_to_bytes(5)),  # a device it was not placed on
    )
    sample, why = attribute((0, 1), snapshot((0, 0)), after, [100, 101], moved=True, expected_gb=40)
    assert (sample, why) == ({0: 20.0, 1: 20.0}, None), "even while other memory moved"


def test_free_memory_before_and_after_counts_per_device_when_nothing_else_moved() -> None:
    sample, why = attribute(
        (0, 1), snapshot((5, 5)), snapshot((25, 26)), [], moved=False, expected_gb=40
    )
    assert (sample, why) == ({0: 20.0, 1: 21.0}, None)


def test_a_window_in_which_other_engines_moved_is_not_attributable() -> None:
    sample, why = attribute((0,), snapshot((0,)), snapshot((20,)), [], moved=True, expected_gb=20)
    assert sample is None
    assert why == "other engines' memory moved while it loaded"


def test_a_sample_far_below_the_expected_footprint_is_dropped() -> None:
    sample, why = attribute((0,), snapshot((40,)), snapshot((48,)), [], moved=False, expected_gb=24)
    assert sample is None
    assert why == "an implausible sample: 8.00 GB measured, about 24.00 GB expected"
