"""Adopting process engines: an engine that outlives its switchd (a crash, or a close
with keep_engines_on_exit) is taken over by the next one when proven the same, its
output still followed from its file; anything else is stopped, saying why.

The old switchd is a real process (a ProcessRuntime in a subprocess): a pid file whose
switchd is alive is never touched, so it must really be gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from switchd.config import ModelSpec
from switchd.runtime import process
from switchd.runtime.base import EngineExited, EngineOutput, RuntimeEvent
from switchd.runtime.process import LOGS_DIR, ProcessRuntime
from tests.processes import gone, wait_gone

ROOT = Path(__file__).resolve().parents[2]
LOGGER = "switchd.runtime.process"
TIMEOUT = 10.0

# Prints `tick N` every 50 ms, forever.
TICKER = (
    "import itertools, time\n"
    "for i in itertools.count():\n"
    "    print(f'tick {i}', flush=True)\n"
    "    time.sleep(0.05)\n"
)
# A switchd that starts one adoptable engine, prints its pid, and on a line on stdin
# closes its runtime (keep_engines_on_exit: true) and exits. argv: state_dir, model, cmd...
OLD_SWITCHD = (
    "import asyncio, sys\n"
    "from pathlib import Path\n"
    "from switchd.config import ModelSpec\n"
    "from switchd.runtime.process import ProcessRuntime\n"
    "async def main():\n"
    "    spec = ModelSpec(name=sys.argv[2], size_gb=1, cmd=tuple(sys.argv[3:]))\n"
    "    runtime = ProcessRuntime(\n"
    "        5, state_dir=Path(sys.argv[1]), catalog={spec.name: spec}, keep_engines_on_exit=True\n"
    "    )\n"
    "    info = await runtime.start(spec)\n"
    "    print(f'pid {info.pid}', flush=True)\n"
    "    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)\n"
    "    await runtime.close()\n"
    "asyncio.run(main())\n"
)


def ticker(name: str = "ticker", *extra: str) -> ModelSpec:
    return ModelSpec(name=name, size_gb=1, cmd=(sys.executable, "-c", TICKER, *extra))


@pytest.fixture
def groups() -> Iterator[list[int]]:
    """Engine process groups, killed at the end of the test whatever happens."""
    found: list[int] = []
    yield found
    for pgid in found:
        assert pgid > 1
        assert pgid != os.getpgrp()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=LOGGER)
    return caplog


@contextlib.asynccontextmanager
async def old_switchd(
    state: Path, spec: ModelSpec
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    old = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        OLD_SWITCHD,
        str(state),
        spec.name,
        *spec.cmd,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert old.stdout is not None
        line = await asyncio.wait_for(old.stdout.readline(), TIMEOUT)
        assert line.startswith(b"pid "), line
        yield old, int(line.split()[1])
    finally:
        with contextlib.suppress(ProcessLookupError):
            old.kill()
        await asyncio.wait_for(old.wait(), TIMEOUT)


async def crashed(state: Path, spec: ModelSpec, groups: list[int]) -> int:
    """An engine left by a switchd killed with SIGKILL; its pid."""
    async with old_switchd(state, spec) as (old, pid):
        groups.append(pid)
        await asyncio.sleep(0.3)  # a few lines into its file
        old.kill()
        await asyncio.wait_for(old.wait(), TIMEOUT)
    await asyncio.sleep(0.2)
    assert not gone(pid), "the engine died with its switchd"
    return pid


async def next_of(events: AsyncIterator[RuntimeEvent], kind: type) -> RuntimeEvent:
    async with asyncio.timeout(TIMEOUT):
        while not isinstance(event := await anext(events), kind):
            pass
    return event


def pid_file(state: Path, model: str) -> Path:
    return state / "engines" / f"{model}.json"


def tick(line: str) -> int:
    word, number = line.split()
    assert word == "tick"
    return int(number)


async def test_an_engine_left_by_a_crash_is_adopted_and_its_output_followed(
    tmp_path: Path, groups: list[int], logs: pytest.LogCaptureFixture
) -> None:
    spec = ticker()
    pid = await crashed(tmp_path, spec, groups)
    record = json.loads(pid_file(tmp_path, "ticker").read_text(encoding="utf-8"))
    runtime = ProcessRuntime(5, state_dir=tmp_path, catalog={"ticker": spec})
    events = runtime.events()
    try:
        found = await asyncio.wait_for(runtime.discover(), TIMEOUT)
        (info,) = found.running
        assert (info.model, info.pid, info.instance) == ("ticker", pid, str(pid))
        assert info.url == record["url"]
        before = [tick(line) for line in runtime.last_lines("ticker")]
        assert before, "the lines written before adoption are its tail"
        output = await next_of(events, EngineOutput)
        assert isinstance(output, EngineOutput)
        assert output.instance == str(pid)
        # Only new lines become events: none is both in the tail read at adoption and
        # forwarded again (the follower may already have added new ones to the tail).
        tail = [tick(line) for line in runtime.last_lines("ticker")]
        assert tail == sorted(set(tail)), tail
        assert tick(output.line) in tail
        assert tick(output.line) > before[0]
        # The pid file names this switchd now: a crash of ours is seen again.
        owner = json.loads(pid_file(tmp_path, "ticker").read_text(encoding="utf-8"))["switchd"]
        assert owner["pid"] == os.getpid()
        await asyncio.wait_for(runtime.stop(spec, 5), TIMEOUT)
        exited = await next_of(events, EngineExited)
        assert isinstance(exited, EngineExited)
        assert (exited.instance, exited.reason) == (str(pid), "stopped")
        assert gone(pid)
        assert not pid_file(tmp_path, "ticker").exists()
    finally:
        await asyncio.wait_for(runtime.close(), TIMEOUT)
    assert f"adopting the engine of ticker (pid {pid}) left by an earlier switchd" in logs.text


async def test_an_adopted_engine_that_dies_is_reported_without_an_exit_code(
    tmp_path: Path, groups: list[int]
) -> None:
    spec = ticker()
    pid = await crashed(tmp_path, spec, groups)
    runtime = ProcessRuntime(5, state_dir=tmp_path, catalog={"ticker": spec})
    events = runtime.events()
    try:
        found = await asyncio.wait_for(runtime.discover(), TIMEOUT)
        assert [info.pid for info in found.running] == [pid]
        os.kill(pid, signal.SIGKILL)  # not our child: the pidfd still says it exited
        exited = await next_of(events, EngineExited)
        assert isinstance(exited, EngineExited)
        assert (exited.model, exited.instance, exited.exit_code) == ("ticker", str(pid), None)
        assert exited.reason == "exited (its exit status went to the switchd that started it)"
        assert exited.last_lines
        assert not pid_file(tmp_path, "ticker").exists()
    finally:
        await asyncio.wait_for(runtime.close(), TIMEOUT)


@pytest.mark.parametrize(
    ("catalog", "why"),
    [
        ({}, "its model is no longer in the config"),
        ({"ticker": ticker("ticker", "--other")}, "its engine settings changed in the config"),
    ],
)
async def test_an_engine_that_cannot_be_proven_the_same_is_stopped_saying_why(
    tmp_path: Path,
    groups: list[int],
    logs: pytest.LogCaptureFixture,
    catalog: dict[str, ModelSpec],
    why: str,
) -> None:
    pid = await crashed(tmp_path, ticker(), groups)
    runtime = ProcessRuntime(5, state_dir=tmp_path, catalog=catalog)
    try:
        assert (await asyncio.wait_for(runtime.discover(), TIMEOUT)).running == ()
        assert await wait_gone(pid, 5)
        assert not pid_file(tmp_path, "ticker").exists()
    finally:
        await asyncio.wait_for(runtime.close(), TIMEOUT)
    assert (
        f"not adopting the engine of ticker (pid {pid}) left by an earlier switchd: {why};"
        " stopping it"
    ) in logs.text


async def test_a_pid_file_whose_command_line_is_not_the_process_is_not_adopted(
    tmp_path: Path, groups: list[int], logs: pytest.LogCaptureFixture
) -> None:
    spec = ticker()
    pid = await crashed(tmp_path, spec, groups)
    path = pid_file(tmp_path, "ticker")
    record = json.loads(path.read_text(encoding="utf-8"))
    record["argv"] = ["something", "else"]
    path.write_text(json.dumps(record), encoding="utf-8")
    runtime = ProcessRuntime(5, state_dir=tmp_path, catalog={"ticker": spec})
    try:
        assert (await asyncio.wait_for(runtime.discover(), TIMEOUT)).running == ()
        assert await wait_gone(pid, 5)
    finally:
        await asyncio.wait_for(runtime.close(), TIMEOUT)
    assert "its command line is not the one recorded; stopping it" in logs.text


async def test_keep_engines_on_exit_leaves_the_engine_for_the_next_switchd(
    tmp_path: Path, groups: list[int]
) -> None:
    spec = ticker()
    async with old_switchd(tmp_path, spec) as (old, pid):
        groups.append(pid)
        assert old.stdin is not None
        old.stdin.write(b"close\n")
        await old.stdin.drain()
        assert await asyncio.wait_for(old.wait(), TIMEOUT) == 0
    await asyncio.sleep(0.2)
    assert not gone(pid), "the engine stopped with its switchd"
    assert pid_file(tmp_path, "ticker").exists()
    runtime = ProcessRuntime(5, state_dir=tmp_path, catalog={"ticker": spec})
    try:
        (info,) = (await asyncio.wait_for(runtime.discover(), TIMEOUT)).running
        assert info.pid == pid
    finally:
        await asyncio.wait_for(runtime.close(), TIMEOUT)  # keep is off here: it stops
    assert await wait_gone(pid, 5)


async def test_output_files_stay_bounded_and_lose_no_line_read_in_time(
    tmp_path: Path, groups: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process, "LOG_FILE_LIMIT", 2000)
    spec = ticker()
    runtime = ProcessRuntime(5, state_dir=tmp_path, catalog={"ticker": spec})
    events = runtime.events()
    try:
        info = await runtime.start(spec)
        assert info.pid is not None
        groups.append(info.pid)
        numbers: list[int] = []
        while len(numbers) < 300:  # about 3000 bytes: past the limit
            event = await next_of(events, EngineOutput)
            assert isinstance(event, EngineOutput)
            numbers.append(tick(event.line))
        assert numbers == list(range(300))
        size = (tmp_path / LOGS_DIR / "ticker.log").stat().st_size
        assert size < 2000 + process.FOLLOW_CHUNK
    finally:
        await asyncio.wait_for(runtime.close(), TIMEOUT)


async def test_each_start_has_a_fresh_output_file(tmp_path: Path, groups: list[int]) -> None:
    spec = ModelSpec(name="short", size_gb=1, cmd=("sh", "-c", "echo run; sleep 0.2"))
    runtime = ProcessRuntime(5, state_dir=tmp_path, catalog={"short": spec})
    events = runtime.events()
    try:
        for _ in range(2):
            info = await runtime.start(spec)
            assert info.pid is not None
            groups.append(info.pid)
            exited = await next_of(events, EngineExited)
            assert isinstance(exited, EngineExited)
            assert exited.last_lines == ("run",)
        text = (tmp_path / LOGS_DIR / "short.log").read_text(encoding="utf-8")
        assert text == "run\n"
    finally:
        await asyncio.wait_for(runtime.close(), TIMEOUT)
