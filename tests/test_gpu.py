"""The simulated GPU's ledger, the NVML probe against a fake NVML, and open_probe."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import ModuleType, SimpleNamespace
from typing import Any, cast

import pytest

from switchd.config import GpuKind, SimulatedGpuSettings
from switchd.gpu import (
    DeviceMemory,
    GpuSnapshot,
    GpuUnavailable,
    NvmlProbe,
    ProcessMemory,
    SimulatedGpu,
    ledger_of,
    open_probe,
)
from switchd.units import GIB

CARD_BYTES = 97_887 * 1024**2  # a 97,887 MiB card: 95.59 GiB


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def simulated(
    total_gb: float = 95.59,
    devices: int = 1,
    delay: float = 0.0,
    clock: FakeClock | None = None,
    residue: float = 1.5,
) -> SimulatedGpu:
    settings = SimulatedGpuSettings(
        total_gb=total_gb, devices=devices, release_delay_seconds=delay, sleep_residue_gb=residue
    )
    return SimulatedGpu(settings, clock=clock or FakeClock())


# --- snapshots -------------------------------------------------------------------------------


async def test_empty_simulated_gpu_snapshot() -> None:
    snapshot = await simulated().snapshot()
    total = round(95.59 * GIB)
    assert snapshot == GpuSnapshot("simulated", (DeviceMemory(0, "Simulated GPU", total, 0),), ())
    assert snapshot.total_bytes() == total
    assert snapshot.free_bytes() == total
    assert snapshot.used_bytes() == 0


async def test_snapshot_json_in_gib_rounded() -> None:
    gpu = simulated()
    gpu.engine_started("m", 82 * GIB + GIB // 5, None)  # 82.2 GiB
    assert (await gpu.snapshot()).as_json() == {
        "used_gb": 82.2,
        "total_gb": 95.59,
        "available_gb": 13.39,
        "source": "simulated",
        "devices": [
            {
                "index": 0,
                "name": "Simulated GPU",
                "used_gb": 82.2,
                "total_gb": 95.59,
                "available_gb": 13.39,
            }
        ],
    }


def test_a_97887_mib_card_is_95_59() -> None:
    device = DeviceMemory(0, "H100", CARD_BYTES, 0)
    assert device.as_json()["total_gb"] == 95.59
    assert device.as_json()["available_gb"] == 95.59


def test_device_free_never_negative() -> None:
    assert DeviceMemory(0, "x", 10, 12).free_bytes == 0


def test_snapshot_free_bytes_by_device() -> None:
    snapshot = GpuSnapshot(
        "nvml",
        (
            DeviceMemory(0, "a", 100, 30),
            DeviceMemory(1, "b", 200, 50),
            DeviceMemory(2, "c", 400, 400),
        ),
    )
    assert snapshot.free_bytes() == 70 + 150 + 0
    assert snapshot.free_bytes([1]) == 150
    assert snapshot.free_bytes((0, 1)) == 220
    assert snapshot.free_bytes([2]) == 0
    assert snapshot.free_bytes([7]) == 0
    assert snapshot.free_bytes([]) == 0
    assert snapshot.total_bytes([0, 2]) == 500
    assert snapshot.used_bytes([1, 2]) == 450


# --- the simulated ledger --------------------------------------------------------------------


async def test_engine_started_adds_used_memory() -> None:
    gpu = simulated()
    gpu.engine_started("a", 10 * GIB, None)
    gpu.engine_started("b", 20 * GIB, None)
    snapshot = await gpu.snapshot()
    assert snapshot.used_bytes() == 30 * GIB
    assert snapshot.free_bytes() == round(95.59 * GIB) - 30 * GIB


async def test_engine_split_across_every_device() -> None:
    gpu = simulated(total_gb=80, devices=2)
    gpu.engine_started("m", 30 * GIB, None)
    snapshot = await gpu.snapshot()
    assert [d.index for d in snapshot.devices] == [0, 1]
    assert [d.used_bytes for d in snapshot.devices] == [15 * GIB, 15 * GIB]
    assert [d.total_bytes for d in snapshot.devices] == [80 * GIB, 80 * GIB]
    assert snapshot.total_bytes() == 160 * GIB


async def test_engine_on_one_given_device() -> None:
    gpu = simulated(total_gb=80, devices=2)
    gpu.engine_started("m", 30 * GIB, (1,))
    snapshot = await gpu.snapshot()
    assert [d.used_bytes for d in snapshot.devices] == [0, 30 * GIB]
    assert snapshot.free_bytes([0]) == 80 * GIB
    assert snapshot.free_bytes([1]) == 50 * GIB


async def test_used_is_capped_at_total() -> None:
    gpu = simulated(total_gb=10)
    gpu.engine_started("m", 25 * GIB, None)
    snapshot = await gpu.snapshot()
    assert snapshot.devices[0].used_bytes == 10 * GIB
    assert snapshot.free_bytes() == 0


async def test_engine_stopped_releases_at_once_without_delay() -> None:
    gpu = simulated()
    gpu.engine_started("a", 10 * GIB, None)
    gpu.engine_started("b", 5 * GIB, None)
    gpu.engine_stopped("a")
    assert (await gpu.snapshot()).used_bytes() == 5 * GIB


async def test_engine_stopped_releases_after_the_delay() -> None:
    clock = FakeClock(1000.0)
    gpu = simulated(delay=2.0, clock=clock)
    gpu.engine_started("a", 10 * GIB, None)
    gpu.engine_started("b", 5 * GIB, None)
    gpu.engine_stopped("a")
    assert (await gpu.snapshot()).used_bytes() == 15 * GIB
    clock.now = 1001.999
    assert (await gpu.snapshot()).used_bytes() == 15 * GIB
    clock.now = 1002.0
    assert (await gpu.snapshot()).used_bytes() == 5 * GIB
    clock.now = 5000.0
    assert (await gpu.snapshot()).used_bytes() == 5 * GIB


async def test_restart_while_old_memory_is_still_releasing() -> None:
    clock = FakeClock(0.0)
    gpu = simulated(delay=1.0, clock=clock)
    gpu.engine_started("a", 10 * GIB, None)
    gpu.engine_stopped("a")
    gpu.engine_started("a", 12 * GIB, None)  # the new engine's memory is not released
    assert (await gpu.snapshot()).used_bytes() == 22 * GIB
    clock.now = 1.0
    assert (await gpu.snapshot()).used_bytes() == 12 * GIB


async def test_stopping_an_unknown_engine_is_harmless() -> None:
    gpu = simulated()
    gpu.engine_started("a", GIB, None)
    gpu.engine_stopped("nobody")
    assert (await gpu.snapshot()).used_bytes() == GIB


async def test_simulated_close_clears_the_ledger() -> None:
    gpu = simulated()
    gpu.engine_started("a", GIB, None)
    await gpu.close()
    assert (await gpu.snapshot()).used_bytes() == 0


# --- sleeping engines ----------------------------------------------------------------------


async def used_by_device(gpu: SimulatedGpu) -> list[int]:
    return [d.used_bytes for d in (await gpu.snapshot()).devices]


async def test_a_sleeping_engine_keeps_its_residue_split_over_its_devices() -> None:
    clock = FakeClock(1000.0)
    gpu = simulated(total_gb=80, devices=2, delay=2.0, clock=clock, residue=1.5)
    gpu.engine_started("m", 30 * GIB, None)
    gpu.engine_slept("m")
    # Nothing comes back before the release delay, and nothing is counted twice.
    clock.now = 1001.999
    assert await used_by_device(gpu) == [15 * GIB, 15 * GIB]
    clock.now = 1002.0
    assert await used_by_device(gpu) == [3 * GIB // 4, 3 * GIB // 4]
    clock.now = 5000.0
    assert await used_by_device(gpu) == [3 * GIB // 4, 3 * GIB // 4]


async def test_without_a_delay_the_sleep_releases_at_once() -> None:
    gpu = simulated(residue=2.0)
    gpu.engine_started("m", 10 * GIB, None)
    gpu.engine_slept("m")
    assert (await gpu.snapshot()).used_bytes() == 2 * GIB


async def test_the_residue_stays_on_the_engines_own_device() -> None:
    gpu = simulated(total_gb=80, devices=2, residue=1.5)
    gpu.engine_started("m", 30 * GIB, (1,))
    gpu.engine_started("other", 10 * GIB, (0,))
    gpu.engine_slept("m")
    assert await used_by_device(gpu) == [10 * GIB, 3 * GIB // 2]


async def test_a_residue_is_never_more_than_the_engine_held() -> None:
    gpu = simulated(total_gb=80, devices=2, residue=4.0)
    gpu.engine_started("m", GIB, None)  # half a GiB on each device
    gpu.engine_slept("m")
    assert await used_by_device(gpu) == [GIB // 2, GIB // 2]


async def test_a_woken_engine_takes_everything_back_at_once() -> None:
    clock = FakeClock(1000.0)
    gpu = simulated(total_gb=80, devices=2, delay=2.0, clock=clock, residue=1.5)
    gpu.engine_started("m", 30 * GIB, None)
    gpu.engine_slept("m")
    clock.now = 1002.0
    assert await used_by_device(gpu) == [3 * GIB // 4, 3 * GIB // 4]
    gpu.engine_woken("m")
    assert await used_by_device(gpu) == [15 * GIB, 15 * GIB]
    clock.now = 5000.0
    assert await used_by_device(gpu) == [15 * GIB, 15 * GIB]


async def test_a_wake_before_the_release_lag_ends_is_not_counted_twice() -> None:
    clock = FakeClock(1000.0)
    gpu = simulated(total_gb=80, devices=2, delay=2.0, clock=clock, residue=1.5)
    gpu.engine_started("m", 30 * GIB, None)
    gpu.engine_slept("m")
    clock.now = 1001.0
    gpu.engine_woken("m")
    assert await used_by_device(gpu) == [15 * GIB, 15 * GIB]


async def test_a_woken_engine_can_sleep_again() -> None:
    gpu = simulated(residue=1.0)
    gpu.engine_started("m", 10 * GIB, None)
    gpu.engine_slept("m")
    gpu.engine_woken("m")
    gpu.engine_slept("m")
    assert (await gpu.snapshot()).used_bytes() == GIB
    gpu.engine_woken("m")
    assert (await gpu.snapshot()).used_bytes() == 10 * GIB


async def test_stopping_a_sleeping_engine_releases_its_residue_after_the_delay() -> None:
    clock = FakeClock(1000.0)
    gpu = simulated(total_gb=80, devices=2, delay=2.0, clock=clock, residue=1.5)
    gpu.engine_started("m", 30 * GIB, None)
    gpu.engine_slept("m")
    clock.now = 1010.0
    gpu.engine_stopped("m")
    assert await used_by_device(gpu) == [3 * GIB // 4, 3 * GIB // 4]
    clock.now = 1011.999
    assert await used_by_device(gpu) == [3 * GIB // 4, 3 * GIB // 4]
    clock.now = 1012.0
    assert await used_by_device(gpu) == [0, 0]
    gpu.engine_woken("m")  # nothing left to wake
    assert await used_by_device(gpu) == [0, 0]


async def test_sleeping_twice_is_a_no_op() -> None:
    clock = FakeClock(1000.0)
    gpu = simulated(delay=1.0, clock=clock, residue=1.5)
    gpu.engine_started("m", 10 * GIB, None)
    gpu.engine_slept("m")
    gpu.engine_slept("m")
    clock.now = 1001.0
    assert (await gpu.snapshot()).used_bytes() == 3 * GIB // 2
    gpu.engine_slept("m")  # after the release, too
    clock.now = 1002.0
    assert (await gpu.snapshot()).used_bytes() == 3 * GIB // 2
    gpu.engine_woken("m")
    assert (await gpu.snapshot()).used_bytes() == 10 * GIB


async def test_sleeping_or_waking_an_unknown_engine_is_harmless() -> None:
    gpu = simulated()
    gpu.engine_started("a", GIB, None)
    gpu.engine_slept("nobody")
    gpu.engine_woken("nobody")
    gpu.engine_woken("a")  # awake already
    assert (await gpu.snapshot()).used_bytes() == GIB


# --- NVML against a fake module ------------------------------------------------------------


@dataclass
class FakeNvml:
    """Records calls; its `module` is what NvmlProbe gets as `nvml`."""

    count: int = 2
    init_error: Exception | None = None
    processes_error: Exception | None = None
    count_error: Exception | None = None
    calls: list[str] = field(default_factory=list)

    @property
    def module(self) -> ModuleType:
        return cast(
            ModuleType,
            SimpleNamespace(
                nvmlInit=self.init,
                nvmlDeviceGetCount=self.get_count,
                nvmlDeviceGetHandleByIndex=self.handle,
                nvmlDeviceGetName=self.name,
                nvmlDeviceGetMemoryInfo=self.memory,
                nvmlDeviceGetComputeRunningProcesses=self.processes,
                nvmlShutdown=self.shutdown,
            ),
        )

    def init(self) -> None:
        self.calls.append("init")
        if self.init_error is not None:
            raise self.init_error

    def get_count(self) -> int:
        self.calls.append("count")
        if self.count_error is not None:
            raise self.count_error
        return self.count

    def handle(self, index: int) -> str:
        return f"handle-{index}"

    def name(self, handle: str) -> bytes | str:
        # Old bindings return bytes, new ones str: both must work.
        return b"NVIDIA H100 80GB HBM3" if handle == "handle-0" else "NVIDIA H200"

    def memory(self, handle: str) -> SimpleNamespace:
        if handle == "handle-0":
            return SimpleNamespace(total=CARD_BYTES, used=40 * GIB, free=CARD_BYTES - 40 * GIB)
        return SimpleNamespace(total=140 * GIB, used=0, free=140 * GIB)

    def processes(self, handle: str) -> list[SimpleNamespace]:
        if self.processes_error is not None:
            raise self.processes_error
        if handle == "handle-0":
            return [
                SimpleNamespace(pid=4242, usedGpuMemory=30 * GIB),
                SimpleNamespace(pid=4343, usedGpuMemory=None),  # hidden in a container
                SimpleNamespace(pid=4444, usedGpuMemory=10 * GIB),
            ]
        return [SimpleNamespace(pid=5555, usedGpuMemory=GIB)]

    def shutdown(self) -> None:
        self.calls.append("shutdown")


async def test_nvml_probe_reads_devices_and_processes() -> None:
    fake = FakeNvml()
    probe = await NvmlProbe.open(fake.module)
    assert probe.source == "nvml"
    snapshot = await probe.snapshot()
    assert snapshot == GpuSnapshot(
        "nvml",
        (
            DeviceMemory(0, "NVIDIA H100 80GB HBM3", CARD_BYTES, 40 * GIB),
            DeviceMemory(1, "NVIDIA H200", 140 * GIB, 0),
        ),
        (
            ProcessMemory(4242, 0, 30 * GIB),
            ProcessMemory(4444, 0, 10 * GIB),
            ProcessMemory(5555, 1, GIB),
        ),
    )
    assert snapshot.as_json()["devices"][0] == {
        "index": 0,
        "name": "NVIDIA H100 80GB HBM3",
        "used_gb": 40.0,
        "total_gb": 95.59,
        "available_gb": 55.59,
    }
    assert fake.calls == ["init", "count"]
    await probe.close()
    assert fake.calls == ["init", "count", "shutdown"]


async def test_nvml_process_figures_are_optional() -> None:
    fake = FakeNvml(processes_error=RuntimeError("not supported"))
    probe = await NvmlProbe.open(fake.module)
    snapshot = await probe.snapshot()
    assert snapshot.processes == ()
    assert [d.used_bytes for d in snapshot.devices] == [40 * GIB, 0]


async def test_only_the_simulated_card_keeps_a_ledger() -> None:
    nvml = await NvmlProbe.open(FakeNvml().module)
    assert ledger_of(nvml) is None  # NVML sees real allocations
    simulated = SimulatedGpu(SimulatedGpuSettings())
    assert ledger_of(simulated) is simulated


async def test_nvml_init_failure_is_gpu_unavailable() -> None:
    fake = FakeNvml(init_error=RuntimeError("Driver Not Loaded"))
    with pytest.raises(GpuUnavailable, match=r"^NVML did not initialise: Driver Not Loaded$"):
        await NvmlProbe.open(fake.module)
    assert fake.calls == ["init"]  # nothing to shut down


async def test_nvml_without_devices_is_gpu_unavailable_and_shuts_down() -> None:
    fake = FakeNvml(count=0)
    with pytest.raises(GpuUnavailable, match=r"^NVML found no GPU$"):
        await NvmlProbe.open(fake.module)
    assert fake.calls == ["init", "count", "shutdown"]


async def test_nvml_error_after_init_shuts_down() -> None:
    fake = FakeNvml(count_error=OSError("lost the device"))
    with pytest.raises(OSError, match=r"^lost the device$"):
        await NvmlProbe.open(fake.module)
    assert fake.calls == ["init", "count", "shutdown"]


# --- open_probe --------------------------------------------------------------------------


async def test_open_probe_simulated() -> None:
    settings = SimulatedGpuSettings(total_gb=24.0, devices=3, release_delay_seconds=0.5)
    probe = await open_probe(GpuKind.SIMULATED, settings)
    assert isinstance(probe, SimulatedGpu)
    assert probe.settings is settings
    assert probe.source == "simulated"
    snapshot = await probe.snapshot()
    assert [d.index for d in snapshot.devices] == [0, 1, 2]
    assert snapshot.as_json()["total_gb"] == 72.0
    await probe.close()


async def test_open_probe_auto_falls_back_to_simulated(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def no_nvml(nvml: Any = None) -> NvmlProbe:
        raise GpuUnavailable("NVML did not initialise: no driver")

    monkeypatch.setattr(NvmlProbe, "open", no_nvml)
    settings = SimulatedGpuSettings(total_gb=12.0)
    with caplog.at_level(logging.WARNING, logger="switchd.gpu"):
        probe = await open_probe(GpuKind.AUTO, settings)
    assert isinstance(probe, SimulatedGpu)
    assert probe.settings is settings
    assert "NVML unavailable (NVML did not initialise: no driver)" in caplog.text
    assert "simulated 12.00 GB GPU" in caplog.text


async def test_open_probe_nvml_refuses_to_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_nvml(nvml: Any = None) -> NvmlProbe:
        raise GpuUnavailable("NVML found no GPU")

    monkeypatch.setattr(NvmlProbe, "open", no_nvml)
    with pytest.raises(GpuUnavailable) as caught:
        await open_probe(GpuKind.NVML, SimulatedGpuSettings())
    message = str(caught.value)
    assert message.startswith("gpu: nvml was asked for but NVML found no GPU;")
    assert "NVIDIA_DRIVER_CAPABILITIES=utility" in message


async def test_open_probe_auto_uses_nvml_when_it_opens(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml()
    real_open = NvmlProbe.open

    async def fake_open(nvml: Any = None) -> NvmlProbe:
        return await real_open(fake.module)

    monkeypatch.setattr(NvmlProbe, "open", fake_open)
    probe = await open_probe(GpuKind.AUTO, SimulatedGpuSettings())
    assert isinstance(probe, NvmlProbe)
    assert [d.name for d in (await probe.snapshot()).devices] == [
        "NVIDIA H100 80GB HBM3",
        "NVIDIA H200",
    ]
    await probe.close()


async def test_open_probe_nvml_on_the_real_driver() -> None:
    """Against the real pynvml: skipped where NVML does not initialise (no GPU here)."""
    try:
        import pynvml  # noqa: PLC0415

        pynvml.nvmlInit()
    except Exception as exc:
        pytest.skip(f"NVML does not initialise on this machine (no GPU or driver): {exc}")
    else:
        pynvml.nvmlShutdown()

    probe = await open_probe(GpuKind.NVML, SimulatedGpuSettings())
    try:
        assert isinstance(probe, NvmlProbe)
        assert probe.source == "nvml"
        snapshot = await probe.snapshot()
        assert snapshot.source == "nvml"
        assert len(snapshot.devices) >= 1
        assert [d.index for d in snapshot.devices] == list(range(len(snapshot.devices)))
        for device in snapshot.devices:
            assert device.total_bytes > 0
            assert 0 <= device.used_bytes <= device.total_bytes
            assert device.name
        assert snapshot.as_json()["total_gb"] > 0
    finally:
        await probe.close()
