"""A hung engine call, end to end: a real switchd, real demo engines, and a victim
whose /sleep never answers. What fits without the hung engine loads and serves at
once, beside the stuck switch; what needs its memory waits for the switch, which
stops the hung engine once its call times out."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from tests.integration.conftest import ServerFactory
from tests.integration.server import engine_cmd
from tests.integration.test_standby import chat, sleeper, stages, switch

CALL_TIMEOUT_SECONDS = 8  # the hung /sleep is given up after this


def plain(size_gb: float) -> dict[str, Any]:
    return {"cmd": engine_cmd(0.5), "size_gb": size_gb, "load_time_seconds": 3}


async def switch_stage(http: httpx.AsyncClient, within: float = 15.0) -> tuple[str, str] | None:
    """The running switch's (target, stage), once it has one."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        current = (await http.get("/v1/models/status")).json()["switch"]
        if current is not None and current["stage"] == "sleep":
            return current["target"], current["stage"]
        await asyncio.sleep(0.05)
    return None


async def test_a_model_that_fits_beside_is_served_while_a_sleep_hangs(
    make_server: ServerFactory,
) -> None:
    # 95.59 GB: v (60) sleeps for ten minutes when asked; t (90) needs v's memory;
    # u (5) fits beside v and t; w (30) fits beside v, not beside t.
    server = make_server(
        {
            "v": sleeper(60, "--sleep-seconds", "600"),
            "t": plain(90),
            "u": plain(5),
            "w": plain(30),
        },
        standby_host_ram_gb=200,
        engine_call_timeout_seconds=CALL_TIMEOUT_SECONDS,
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        await switch(http, "v")
        switching = asyncio.create_task(switch(http, "t"))
        assert await switch_stage(http) == ("t", "sleep")
        waiting_w = asyncio.create_task(chat(http, "w"))
        # Several clients at once, and one that gives up before its model is ready.
        impatient = asyncio.create_task(chat(http, "u"))
        answers = await asyncio.gather(*(chat(http, "u", f"hi {n}") for n in range(3)))
        status = (await http.get("/v1/models/status")).json()
        impatient.cancel()
        assert [a.status_code for a in answers] == [200, 200, 200]
        # Served while the switch still waits for the hung sleep.
        assert (status["switch"]["target"], status["switch"]["stage"]) == ("t", "sleep")
        assert status["models"]["u"]["status"] == "running"
        assert status["models"]["w"]["status"] == "exited"  # it needs what t counts on
        assert not waiting_w.done()
        assert status["gpu"]["used_gb"] == 65.0  # v and u: nothing promised twice
        waiting_w.cancel()  # its client gives up: t is not unloaded for it afterwards
        events = await switching
        assert stages(events) == [
            "memory_check",
            "sleep",
            "unload",
            "unloaded",
            "freed",
            "start",
            "ready",
            "result",
        ]
        unload = next(e for e in events if e.name == "unload")
        assert f"timed out after {CALL_TIMEOUT_SECONDS} s" in unload.data["message"]
        # The stopped v's memory, measured while u was loading beside: all of it.
        unloaded = next(e for e in events if e.name == "unloaded")
        assert unloaded.data["freed_gb"] == 60.0
        final = (await http.get("/v1/models/status")).json()
        assert {m: final["models"][m]["status"] for m in ("v", "t", "u")} == {
            "v": "exited",
            "t": "running",
            "u": "running",
        }
        assert final["gpu"]["used_gb"] == 95.0
        await asyncio.gather(waiting_w, impatient, return_exceptions=True)
