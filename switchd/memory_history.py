"""Recent GPU memory samples, so that the UI's 5-minute chart starts full.

A small task of the app's lifespan reads the GPU probe (a cached NVML read, or
the simulated card's ledger: no subprocess) every SAMPLE_SECONDS into a bounded
ring holding the chart's window; `GET /v1/gpu/history` gives the samples, oldest
first, each with its time and every device's used and total GB.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from switchd.gpu import GpuProbe, GpuSnapshot
from switchd.units import iso_timestamp

log = logging.getLogger(__name__)

SAMPLE_SECONDS = 2.0  # as often as the UI reads the status while it is open
WINDOW_SECONDS = 300.0  # the chart's window


class MemoryHistory:
    def __init__(
        self,
        probe: GpuProbe,
        every: float = SAMPLE_SECONDS,
        window: float = WINDOW_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._probe = probe
        self.every = every
        self._clock = clock
        # One sample older than the window too: the chart's line starts at its left edge.
        self._samples: deque[dict[str, Any]] = deque(maxlen=int(window / every) + 2)

    def record(self, snapshot: GpuSnapshot) -> None:
        devices = [
            {"index": d["index"], "used_gb": d["used_gb"], "total_gb": d["total_gb"]}
            for d in (device.as_json() for device in snapshot.devices)
        ]
        self._samples.append({"at": iso_timestamp(self._clock()), "devices": devices})

    def samples(self) -> list[dict[str, Any]]:
        return list(self._samples)

    async def run(self) -> None:
        """Sample until cancelled; a failed read costs only its sample."""
        while True:
            try:
                self.record(await self._probe.snapshot())
            except Exception as exc:  # the probe's own errors: the chart has a gap
                log.warning("GPU memory sample failed: %r", exc)
            await asyncio.sleep(self.every)


async def history(request: Request) -> Response:
    found: MemoryHistory = request.app.state.memory_history
    return JSONResponse({"interval_seconds": found.every, "samples": found.samples()})


ROUTES = [Route("/v1/gpu/history", history)]
