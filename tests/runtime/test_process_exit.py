"""How ProcessRuntime notices that an engine exited: a pidfd where Linux has one, else polling.

Every test runs under asyncio's default loop and under uvloop (what switchd runs
under in production), with each way of detecting the exit: the pidfd, with the
polls made an hour long so that only the pidfd can report the exit in time;
no os.pidfd_open at all; and os.pidfd_open failing (as on kernels before 5.3).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from switchd.config import ModelSpec
from switchd.runtime import process as process_module
from switchd.runtime.base import EngineExited, EngineOutput, RuntimeEvent
from switchd.runtime.process import ENGINES_DIR, ProcessRuntime
from tests.processes import gone, kill_groups

try:
    import uvloop
except ImportError:  # pragma: no cover - uvicorn[standard] brings it
    HAVE_UVLOOP = False
else:
    HAVE_UVLOOP = True

EVENT_TIMEOUT = 10.0
HOUR = 3600.0
Run = Callable[[Coroutine[Any, Any, None]], None]

SLEEPER = "import time\nprint('up', flush=True)\ntime.sleep(60)\n"
IGNORE_SIGTERM = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ignoring SIGTERM', flush=True)\n"
    "time.sleep(60)\n"
)
# Exits by itself, a moment after starting (so its exit is one to watch for).
EXITS_WITH_3 = "import sys, time\nprint('bye', flush=True)\ntime.sleep(0.3)\nsys.exit(3)\n"


def python(name: str, code: str) -> ModelSpec:
    return ModelSpec(name=name, size_gb=1, cmd=(sys.executable, "-c", code))


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Runs a coroutine to its end in a new event loop of the kind named."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if request.param == "uvloop":
        if not HAVE_UVLOOP:
            pytest.skip("uvloop is not installed")
        factory = uvloop.new_event_loop

    def runner(main: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=factory) as loop_runner:
            loop_runner.run(main)

    return runner


class Detection:
    """How exits are detected in a test; `asked`: the pids pidfd_open was called for."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.asked: list[int] = []


@pytest.fixture(params=["pidfd", "without pidfd_open", "pidfd_open fails"])
def detection(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Detection:
    chosen = Detection(request.param)
    real = getattr(os, "pidfd_open", None)
    if chosen.name == "pidfd":
        if real is None:
            pytest.skip("no os.pidfd_open on this platform")

        def spy(pid: int, flags: int = 0) -> int:
            chosen.asked.append(pid)
            fd: int = real(pid, flags)
            return fd

        monkeypatch.setattr(os, "pidfd_open", spy)
        # An hour between polls: an exit reported within the test's timeout was
        # reported by the pidfd. Once it is readable, returncode is polled for fast.
        monkeypatch.setattr(process_module, "EXIT_POLL_SECONDS", HOUR)
        monkeypatch.setattr(process_module, "EXIT_CHECK_SECONDS", HOUR)
        monkeypatch.setattr(process_module, "REAP_FAST_SECONDS", HOUR)
    elif chosen.name == "without pidfd_open":
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    else:

        def failing(pid: int, flags: int = 0) -> int:
            chosen.asked.append(pid)
            raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

        monkeypatch.setattr(os, "pidfd_open", failing)
    return chosen


def pidfds() -> set[int]:
    """This process's open file descriptors that are pidfds."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, now closed
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[pidfd]":
                found.add(int(name))
    return found


class Rig:
    """A ProcessRuntime, its events read one at a time, each with a timeout."""

    def __init__(self, grace: float = 10.0, state_dir: Path | None = None) -> None:
        self.runtime = ProcessRuntime(stop_grace_seconds=grace, state_dir=state_dir)
        self.events: AsyncIterator[RuntimeEvent] = self.runtime.events()
        self.pids: list[int] = []

    async def start(self, model: ModelSpec) -> int:
        info = await self.runtime.start(model)
        assert info.pid is not None
        self.pids.append(info.pid)
        return info.pid

    async def next_event(self) -> RuntimeEvent:
        return await asyncio.wait_for(anext(self.events), EVENT_TIMEOUT)

    async def exits(self, count: int) -> dict[str, EngineExited]:
        """The next `count` exits, by model; output lines in between are skipped."""
        found: dict[str, EngineExited] = {}
        while len(found) < count:
            event = await self.next_event()
            if isinstance(event, EngineExited):
                assert event.model not in found, f"{event.model} exited twice"
                found[event.model] = event
        return found

    async def close(self) -> None:
        kill_groups(self.pids)
        await asyncio.wait_for(self.runtime.close(), 20)


def with_rig(run: Run, scenario: Callable[[Rig], Coroutine[Any, Any, None]], **rig: Any) -> None:
    """`scenario` with a new Rig, closed after it; every pidfd it opened is closed too."""
    before = pidfds()

    async def main() -> None:
        made = Rig(**rig)
        try:
            await scenario(made)
        finally:
            await made.close()

    run(main())
    assert pidfds() == before


def check_detection(detection: Detection, pids: list[int]) -> None:
    """The way chosen was the way taken: pidfd_open was asked for each engine, or absent."""
    if detection.name == "without pidfd_open":
        assert not hasattr(os, "pidfd_open")
    else:
        assert sorted(detection.asked) == sorted(pids)


def test_an_engine_that_exits_by_itself_is_reported_with_its_code(
    run: Run, detection: Detection
) -> None:
    async def scenario(rig: Rig) -> None:
        model = python("exits", EXITS_WITH_3)
        pid = await rig.start(model)
        assert await rig.next_event() == EngineOutput("exits", str(pid), "bye")
        assert await rig.next_event() == EngineExited(
            "exits", str(pid), 3, "exited with code 3", ("bye",)
        )
        assert gone(pid)
        check_detection(detection, rig.pids)

    with_rig(run, scenario)


def test_a_stopped_engine_is_reported_stopped_and_its_pid_file_dropped(
    run: Run, detection: Detection, tmp_path: Path
) -> None:

    async def scenario(rig: Rig) -> None:
        model = python("polite", SLEEPER)
        pid = await rig.start(model)
        assert await rig.next_event() == EngineOutput("polite", str(pid), "up")
        assert [path.name for path in (tmp_path / ENGINES_DIR).iterdir()] == ["polite.json"]
        await asyncio.wait_for(rig.runtime.stop(model, 10), EVENT_TIMEOUT)
        # stop() returns once the exit is known: the event is already queued.
        assert await rig.next_event() == EngineExited(
            "polite", str(pid), -signal.SIGTERM, "stopped", ("up",)
        )
        assert gone(pid)
        assert list((tmp_path / ENGINES_DIR).iterdir()) == []
        check_detection(detection, rig.pids)

    with_rig(run, scenario, state_dir=tmp_path)


def test_an_engine_ignoring_sigterm_is_reported_killed_by_sigkill(
    run: Run, detection: Detection
) -> None:

    async def scenario(rig: Rig) -> None:
        model = python("stubborn", IGNORE_SIGTERM)
        pid = await rig.start(model)
        assert await rig.next_event() == EngineOutput("stubborn", str(pid), "ignoring SIGTERM")
        await asyncio.wait_for(rig.runtime.stop(model, 0.3), EVENT_TIMEOUT)
        assert await rig.next_event() == EngineExited(
            "stubborn",
            str(pid),
            -signal.SIGKILL,
            "stopped (killed by SIGKILL after the 0.3 s grace period)",
            ("ignoring SIGTERM",),
        )
        assert gone(pid)
        check_detection(detection, rig.pids)

    with_rig(run, scenario)


def test_engines_stopped_at_once_are_all_reported(
    run: Run, detection: Detection, tmp_path: Path
) -> None:
    names = ["one", "two", "three", "four"]

    async def scenario(rig: Rig) -> None:
        models = [python(name, SLEEPER) for name in names]
        models.append(python("stubborn", IGNORE_SIGTERM))
        pids = {model.name: await rig.start(model) for model in models}
        started: set[str] = set()
        while len(started) < len(models):
            event = await rig.next_event()
            assert isinstance(event, EngineOutput), event
            started.add(event.model)
        await asyncio.wait_for(
            asyncio.gather(*(rig.runtime.stop(model, 0.5) for model in models)),
            EVENT_TIMEOUT,
        )
        exits = await rig.exits(len(models))
        for name in names:
            assert exits[name] == EngineExited(
                name, str(pids[name]), -signal.SIGTERM, "stopped", ("up",)
            )
        assert exits["stubborn"].exit_code == -signal.SIGKILL
        assert exits["stubborn"].reason.startswith("stopped (killed by SIGKILL")
        assert all(gone(pid) for pid in pids.values())
        assert list((tmp_path / ENGINES_DIR).iterdir()) == []
        check_detection(detection, rig.pids)

    with_rig(run, scenario, state_dir=tmp_path)


def test_a_loop_that_cannot_watch_the_pidfd_falls_back_to_polling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """asyncio's loop only: uvloop's methods cannot be replaced on an instance."""

    async def scenario(rig: Rig) -> None:
        loop = asyncio.get_running_loop()

        def add_reader(*_: object) -> None:
            raise NotImplementedError

        monkeypatch.setattr(loop, "add_reader", add_reader)
        model = python("unwatched", SLEEPER)
        pid = await rig.start(model)
        assert await rig.next_event() == EngineOutput("unwatched", str(pid), "up")
        await asyncio.wait_for(rig.runtime.stop(model, 10), EVENT_TIMEOUT)
        assert await rig.next_event() == EngineExited(
            "unwatched", str(pid), -signal.SIGTERM, "stopped", ("up",)
        )
        model = python("exits", EXITS_WITH_3)
        pid = await rig.start(model)
        assert (await rig.exits(1))["exits"].reason == "exited with code 3"

    with asyncio.Runner() as runner:
        with_rig(runner.run, scenario)
