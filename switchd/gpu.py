"""GPU memory: the GpuProbe protocol, the NVML probe and a simulated GPU (a GpuLedger).

NVML is initialised once and read in a worker thread (a read takes well under
a millisecond); nvidia-smi and `docker exec` are never used. The simulated GPU
keeps a ledger of the engines it is told about, for the demo and the tests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

from switchd.config import GpuKind, SimulatedGpuSettings
from switchd.units import gib, gib_to_bytes

log = logging.getLogger(__name__)


class GpuUnavailable(RuntimeError):
    """NVML could not be used: no driver, no device, or no permission."""


@dataclass(frozen=True)
class DeviceMemory:
    index: int
    name: str
    total_bytes: int
    used_bytes: int

    @property
    def free_bytes(self) -> int:
        return max(0, self.total_bytes - self.used_bytes)

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "used_gb": gib(self.used_bytes),
            "total_gb": gib(self.total_bytes),
            "available_gb": gib(self.free_bytes),
        }


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    device: int
    used_bytes: int


@dataclass(frozen=True)
class GpuSnapshot:
    source: str  # "nvml" | "simulated"
    devices: tuple[DeviceMemory, ...]
    processes: tuple[ProcessMemory, ...] = ()

    def _on(self, devices: Sequence[int] | None) -> list[DeviceMemory]:
        return [d for d in self.devices if devices is None or d.index in devices]

    def indexes(self) -> tuple[int, ...]:
        return tuple(d.index for d in self.devices)

    def free_by_device(self) -> dict[int, int]:
        return {d.index: d.free_bytes for d in self.devices}

    def free_bytes(self, devices: Sequence[int] | None = None) -> int:
        return sum(d.free_bytes for d in self._on(devices))

    def total_bytes(self, devices: Sequence[int] | None = None) -> int:
        return sum(d.total_bytes for d in self._on(devices))

    def used_bytes(self, devices: Sequence[int] | None = None) -> int:
        return sum(d.used_bytes for d in self._on(devices))

    def as_json(self) -> dict[str, Any]:
        return {
            "used_gb": gib(self.used_bytes()),
            "total_gb": gib(self.total_bytes()),
            "available_gb": gib(self.free_bytes()),
            "source": self.source,
            "devices": [d.as_json() for d in self.devices],
        }


class GpuProbe(Protocol):
    source: str

    async def snapshot(self) -> GpuSnapshot: ...

    async def close(self) -> None: ...


class GpuLedger(Protocol):
    """What a card that sees no real allocation must be told: the simulated GPU's
    ledger, kept by Catalog.transition as engines start, sleep, wake and stop.
    NVML sees real allocations and keeps none (`ledger_of`)."""

    def engine_started(self, model: str, num_bytes: int, devices: Sequence[int] | None) -> None:
        """An engine was started and will hold about `num_bytes`."""

    def engine_stopped(self, model: str) -> None:
        """An engine is gone and its memory is being released."""

    def engine_slept(self, model: str) -> None:
        """An engine went to sleep: it gives most of its memory back, keeps a residue."""

    def engine_woken(self, model: str) -> None:
        """A sleeping engine woke up and takes its memory back."""


class NvmlProbe:
    """Reads the real GPU through NVML; initialise with `open()`."""

    source = "nvml"

    def __init__(self, nvml: ModuleType, handles: Sequence[Any], names: Sequence[str]) -> None:
        self._nvml = nvml
        self._handles = list(handles)
        self._names = list(names)

    @classmethod
    async def open(cls, nvml: ModuleType | None = None) -> NvmlProbe:
        return await asyncio.to_thread(cls._open_blocking, nvml)

    @classmethod
    def _open_blocking(cls, nvml: ModuleType | None) -> NvmlProbe:
        if nvml is None:
            import pynvml  # noqa: PLC0415 - only loaded where NVML is wanted

            nvml = pynvml
        try:
            nvml.nvmlInit()
        except Exception as exc:
            raise GpuUnavailable(f"NVML did not initialise: {exc}") from exc
        try:
            count = nvml.nvmlDeviceGetCount()
            if count == 0:
                raise GpuUnavailable("NVML found no GPU")
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            names = [_text(nvml.nvmlDeviceGetName(h)) for h in handles]
        except Exception:
            nvml.nvmlShutdown()
            raise
        return cls(nvml, handles, names)

    async def snapshot(self) -> GpuSnapshot:
        return await asyncio.to_thread(self.read)

    def read(self) -> GpuSnapshot:
        """One blocking read of every device; cheap enough for each status call."""
        devices: list[DeviceMemory] = []
        processes: list[ProcessMemory] = []
        for index, (handle, name) in enumerate(zip(self._handles, self._names, strict=True)):
            memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            devices.append(DeviceMemory(index, name, int(memory.total), int(memory.used)))
            try:
                running = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except Exception:  # per-process figures are optional
                running = []
            for proc in running:
                used = getattr(proc, "usedGpuMemory", None)
                if used is not None:  # None where the driver hides it (containers)
                    processes.append(ProcessMemory(int(proc.pid), index, int(used)))
        return GpuSnapshot(self.source, tuple(devices), tuple(processes))

    async def close(self) -> None:
        await asyncio.to_thread(self._nvml.nvmlShutdown)


@dataclass
class _Allocation:
    per_device: dict[int, int]
    released_at: float | None = None
    awake: dict[int, int] | None = None  # a sleeping engine's residue: what it holds awake


@dataclass
class SimulatedGpu:
    """A ledger-backed GPU: engines hold what they are told, released after a delay."""

    settings: SimulatedGpuSettings
    clock: Callable[[], float] = time.monotonic
    source: str = "simulated"
    _allocations: dict[str, list[_Allocation]] = field(default_factory=dict)

    def _device_indexes(self, devices: Sequence[int] | None) -> list[int]:
        every = range(self.settings.devices)
        return [i for i in every if devices is None or i in devices] or [0]

    def engine_started(self, model: str, num_bytes: int, devices: Sequence[int] | None) -> None:
        indexes = self._device_indexes(devices)
        share = num_bytes // len(indexes)
        allocation = _Allocation({i: share for i in indexes})
        self._allocations.setdefault(model, []).append(allocation)

    def engine_stopped(self, model: str) -> None:
        release_at = self.clock() + self.settings.release_delay_seconds
        for allocation in self._allocations.get(model, []):
            if allocation.released_at is None:
                allocation.released_at = release_at

    def _live(self, model: str) -> list[_Allocation]:
        return [a for a in self._allocations.get(model, []) if a.released_at is None]

    def engine_slept(self, model: str) -> None:
        # The awake allocation is released like a stopped engine's (with the same
        # lag); the residue, split as the engine was, stays until it wakes or stops.
        residue = gib_to_bytes(self.settings.sleep_residue_gb)
        release_at = self.clock() + self.settings.release_delay_seconds
        for allocation in self._live(model):
            if allocation.awake is not None:
                continue  # already asleep
            awake = dict(allocation.per_device)
            share = min(residue // len(awake), *awake.values())
            # The part given back is released with the lag; the residue stays.
            allocation.per_device = {d: held - share for d, held in awake.items()}
            allocation.released_at = release_at
            kept = _Allocation(dict.fromkeys(awake, share), awake=awake)
            self._allocations[model].append(kept)

    def engine_woken(self, model: str) -> None:
        now = self.clock()
        for allocation in self._allocations.get(model, []):
            if allocation.released_at is not None and allocation.released_at > now:
                allocation.released_at = now  # taken back before the lag ended: not twice
            if allocation.awake is not None:
                allocation.per_device, allocation.awake = allocation.awake, None

    def _used_on(self, index: int, now: float) -> int:
        return sum(
            allocation.per_device.get(index, 0)
            for allocations in self._allocations.values()
            for allocation in allocations
            if allocation.released_at is None or allocation.released_at > now
        )

    async def snapshot(self) -> GpuSnapshot:
        now = self.clock()
        for model, allocations in list(self._allocations.items()):
            kept = [a for a in allocations if a.released_at is None or a.released_at > now]
            if kept:
                self._allocations[model] = kept
            else:
                del self._allocations[model]
        total = gib_to_bytes(self.settings.total_gb)
        devices = tuple(
            DeviceMemory(i, "Simulated GPU", total, min(total, self._used_on(i, now)))
            for i in range(self.settings.devices)
        )
        return GpuSnapshot(self.source, devices)

    async def close(self) -> None:
        self._allocations.clear()


async def open_probe(kind: GpuKind, simulated: SimulatedGpuSettings) -> GpuProbe:
    """The probe `gpu:` asks for; `auto` falls back to the simulator, saying so."""
    if kind is GpuKind.SIMULATED:
        return SimulatedGpu(simulated)
    try:
        return await NvmlProbe.open()
    except (GpuUnavailable, ImportError) as exc:
        if kind is GpuKind.NVML:
            raise GpuUnavailable(
                f"gpu: nvml was asked for but {exc}; inside a container the GPU's "
                "`utility` capability is needed (NVIDIA_DRIVER_CAPABILITIES=utility)"
            ) from exc
        log.warning("NVML unavailable (%s): using a simulated %.2f GB GPU", exc, simulated.total_gb)
        return SimulatedGpu(simulated)


def ledger_of(probe: GpuProbe) -> GpuLedger | None:
    """The ledger to keep for `probe`: the simulated card's own; none for NVML."""
    return probe if isinstance(probe, SimulatedGpu) else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
