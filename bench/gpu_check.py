"""NVML readings against real allocations: run on a machine with an NVIDIA GPU.

Allocates known amounts of device memory (through PyTorch when present, else
cudaMalloc from libcudart) on each of the first two devices and checks that
switchd's NvmlProbe sees each one come and go on that device alone, and that
its per-process figures attribute it to this process (what switchd uses to
learn an engine's footprint by its PIDs); then times the probe's read.
Elsewhere it says why it cannot run and exits 0.
Run: `.venv/bin/python -m bench.gpu_check`.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import statistics
import time
from collections.abc import Callable

from switchd.gpu import GpuUnavailable, NvmlProbe
from switchd.units import GIB, gib

SIZES_GIB = (1, 4, 16)
Allocate = Callable[[int, int], Callable[[], None]]  # (bytes, device) -> release


def torch_allocator() -> Allocate | None:
    try:
        import torch  # noqa: PLC0415 - optional, only on GPU machines
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None

    def allocate(num_bytes: int, device: int) -> Callable[[], None]:
        block = torch.empty(num_bytes, dtype=torch.uint8, device=f"cuda:{device}")
        torch.cuda.synchronize(device)

        def release() -> None:
            nonlocal block
            del block
            torch.cuda.empty_cache()  # hand the memory back to the driver
            torch.cuda.synchronize(device)

        return release

    return allocate


def cudart_allocator() -> Allocate | None:
    for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12"):
        try:
            cudart = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return None

    def allocate(num_bytes: int, device: int) -> Callable[[], None]:
        cudart.cudaSetDevice(device)
        pointer = ctypes.c_void_p()
        status = cudart.cudaMalloc(ctypes.byref(pointer), ctypes.c_size_t(num_bytes))
        if status != 0:
            raise RuntimeError(f"cudaMalloc({num_bytes}) failed with {status}")
        return lambda: cudart.cudaFree(pointer)

    return allocate


async def main() -> int:
    try:
        probe = await NvmlProbe.open()
    except (GpuUnavailable, ImportError) as exc:
        print(f"gpu_check: no NVIDIA GPU here ({exc}); run it on a GPU machine")
        return 0
    allocate = torch_allocator() or cudart_allocator()
    first = probe.read()
    for device in first.devices:
        print(
            f"GPU {device.index}: {device.name}, {gib(device.total_bytes):.2f} GB total, "
            f"{gib(device.used_bytes):.2f} GB used before the check"
        )
    if allocate is None:
        print("gpu_check: neither PyTorch nor libcudart found: readings only, no allocations")
    else:
        print(
            f"{'GPU':>3}{'allocated GB':>13}{'NVML delta GB':>15}{'other GPUs GB':>15}"
            f"{'this PID GB':>13}{'released GB':>13}{'error %':>9}"
        )
        pid = os.getpid()
        for index in [d.index for d in first.devices][:2]:
            others = [d.index for d in first.devices if d.index != index]
            for size in SIZES_GIB:
                before = probe.read()
                release = allocate(size * GIB, index)
                during = probe.read()
                held = during.used_bytes([index]) - before.used_bytes([index])
                elsewhere = during.used_bytes(others) - before.used_bytes(others)
                mine = sum(
                    p.used_bytes for p in during.processes if p.pid == pid and p.device == index
                )
                release()
                await asyncio.sleep(0.2)
                back = probe.read().used_bytes([index]) - before.used_bytes([index])
                error = abs(held - size * GIB) / (size * GIB) * 100
                print(
                    f"{index:>3}{size:>13.2f}{gib(held):>15.2f}{gib(elsewhere):>15.2f}"
                    f"{gib(mine):>13.2f}{gib(held - back):>13.2f}{error:>9.2f}"
                )
    reads = []
    for _ in range(1000):
        started = time.perf_counter()
        probe.read()
        reads.append((time.perf_counter() - started) * 1000)
    reads.sort()
    print(
        f"NvmlProbe.read(): p50 {statistics.median(reads):.3f} ms, "
        f"p99 {reads[int(len(reads) * 0.99)]:.3f} ms over {len(reads)} reads"
    )
    await probe.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
