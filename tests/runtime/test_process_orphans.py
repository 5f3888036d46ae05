"""Engine pid files, and what the next switchd does with what a crash left running.

PR_SET_PDEATHSIG reaches only an engine's direct child: when `cmd` is a wrapper
(`sh -c "…"`), its children outlive a crashed switchd. These tests crash a real
switchd (a ProcessRuntime in a subprocess, killed with SIGKILL), and check that
the next one stops the leftovers, and never a process that is not theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from switchd.config import ModelSpec
from switchd.runtime.base import Discovery, EngineExited, RuntimeEvent
from switchd.runtime.process import ProcessRuntime
from tests.processes import gone, wait_gone

ROOT = Path(__file__).resolve().parents[2]
LOGGER = "switchd.runtime.process"
TIMEOUT = 10.0

# A switchd that starts one engine, prints its output lines, and never stops it:
# the test kills it with SIGKILL. argv: state_dir, model, cmd...
OLD_SWITCHD = (
    "import asyncio, sys\n"
    "from pathlib import Path\n"
    "from switchd.config import ModelSpec\n"
    "from switchd.runtime.process import ProcessRuntime\n"
    "async def main():\n"
    "    runtime = ProcessRuntime(state_dir=Path(sys.argv[1]))\n"
    "    await runtime.start(ModelSpec(name=sys.argv[2], size_gb=1, cmd=tuple(sys.argv[3:])))\n"
    "    async for event in runtime.events():\n"
    "        print(getattr(event, 'line', event), flush=True)\n"
    "asyncio.run(main())\n"
)
# A wrapper whose real worker, its child, is in the engine's process group.
WRAPPER = 'sleep 300 & echo "worker $!"; wait'
IGNORE_SIGTERM = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ignoring SIGTERM', flush=True)\n"
    "time.sleep(300)\n"
)


def stat_of(pid: int) -> list[str]:
    """Fields 3 onwards of /proc/<pid>/stat (field n is at index n - 3)."""
    text = Path(f"/proc/{pid}/stat").read_text(encoding="latin-1")
    return text.rpartition(")")[2].split()


def start_time_of(pid: int) -> int:
    return int(stat_of(pid)[19])


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()


def orphan_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelno == logging.WARNING and "orphaned" in r.getMessage()
    ]


class Reaper:
    """Every process and process group a test starts, killed at its end whatever happens."""

    def __init__(self) -> None:
        self.groups: list[int] = []
        self.popens: list[subprocess.Popen[bytes]] = []
        self.processes: list[asyncio.subprocess.Process] = []

    def group(self, pgid: int) -> int:
        # Never the test runner's own group, whatever a test computed.
        assert pgid > 1
        assert pgid != os.getpgrp()
        self.groups.append(pgid)
        return pgid

    def popen(
        self, *argv: str, new_session: bool = True, stdout: int = subprocess.DEVNULL
    ) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            start_new_session=new_session,
            process_group=None if new_session else 0,
        )
        self.popens.append(process)
        self.group(process.pid)
        return process

    async def cleanup(self) -> None:
        for pgid in self.groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await asyncio.wait_for(process.wait(), TIMEOUT)
        for popen in self.popens:
            with contextlib.suppress(ProcessLookupError):
                popen.kill()
            await asyncio.to_thread(popen.wait, TIMEOUT)


@pytest.fixture
async def reaper() -> AsyncIterator[Reaper]:
    rig = Reaper()
    try:
        yield rig
    finally:
        await rig.cleanup()


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=LOGGER)
    return caplog


def pid_file(state: Path, model: str) -> Path:
    return state / "engines" / (model.replace("/", "%2F") + ".json")


async def crash_with_orphan(
    reaper: Reaper, state: Path, model: str, *cmd: str, ready: str = "worker"
) -> tuple[int, int]:
    """Run a switchd that starts `cmd`, kill it with SIGKILL once `ready` was printed.

    The engine prints `worker <pid>` for its worker. Returns the engine's process
    group and the worker, which survives (the wrapper itself gets PDEATHSIG).
    """
    old = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        OLD_SWITCHD,
        str(state),
        model,
        *cmd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    reaper.processes.append(old)
    assert old.stdout is not None
    lines: list[str] = []
    while not all(any(line.startswith(word) for line in lines) for word in ("worker", ready)):
        raw = await asyncio.wait_for(old.stdout.readline(), TIMEOUT)
        assert raw, f"the old switchd ended early after {lines}"
        lines.append(raw.decode().strip())
    worker = int(next(line for line in lines if line.startswith("worker")).split()[1])
    record = json.loads(pid_file(state, model).read_text(encoding="utf-8"))
    wrapper = reaper.group(record["pid"])
    assert int(stat_of(worker)[2]) == wrapper  # the worker is in the engine's group

    old.kill()  # the crash: no stop, no close
    await asyncio.wait_for(old.wait(), TIMEOUT)
    assert await wait_gone(wrapper, 5), "PDEATHSIG did not reach the wrapper"
    await asyncio.sleep(0.2)
    assert not gone(worker), "the worker did not survive the crash: nothing left to test"
    assert pid_file(state, model).exists()
    return wrapper, worker


def write_pid_file(state: Path, model: str, pid: int, start_time: int, boot: str) -> Path:
    """A pid file as a dead switchd left it (its owner: a pid that is not that switchd)."""
    path = pid_file(state, model)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "model": model,
        "pid": pid,
        "start_time": start_time,
        "boot_id": boot,
        "argv": ["sleep", "300"],
        "started_at": time.time(),
        "switchd": {"pid": os.getpid(), "start_time": 1},  # not this process: gone
    }
    path.write_text(json.dumps(record), encoding="utf-8")
    return path


async def discover(state: Path, grace: float = 5.0) -> None:
    runtime = ProcessRuntime(grace, state_dir=state)
    assert await asyncio.wait_for(runtime.discover(), 30) == Discovery()
    await asyncio.wait_for(runtime.close(), TIMEOUT)


# ---- after a crash ---------------------------------------------------------------------


async def test_a_wrappers_child_left_by_a_crash_is_stopped_by_the_next_switchd(
    reaper: Reaper, tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    group, worker = await crash_with_orphan(reaper, state, "org/wrapped", "sh", "-c", WRAPPER)
    began = time.monotonic()
    await discover(state, grace=5)
    assert time.monotonic() - began < 3  # SIGTERM sufficed
    assert await wait_gone(worker, 3)
    assert not pid_file(state, "org/wrapped").exists()
    assert orphan_warnings(logs) == [
        f"stopped 1 orphaned process(es) of org/wrapped (process group {group})"
        " left by an earlier switchd"
    ]


async def test_an_orphan_ignoring_sigterm_is_killed_after_the_grace(
    reaper: Reaper, tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    wrapper = f'{sys.executable} -c "$1" & echo "worker $!"; wait'
    group, worker = await crash_with_orphan(
        reaper, state, "stubborn", "sh", "-c", wrapper, "sh", IGNORE_SIGTERM, ready="ignoring"
    )
    began = time.monotonic()
    await discover(state, grace=0.5)
    assert 0.5 <= time.monotonic() - began < 5
    assert await wait_gone(worker, 3)
    assert not pid_file(state, "stubborn").exists()
    assert orphan_warnings(logs) == [
        f"stopped 1 orphaned process(es) of stubborn (process group {group})"
        " left by an earlier switchd"
    ]


async def test_an_engine_of_a_running_switchd_is_left_alone(
    reaper: Reaper, tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    """A second switchd started with the same state_dir stops nothing of the first."""
    state = tmp_path / "state"
    first = ProcessRuntime(5, state_dir=state)
    try:
        info = await first.start(ModelSpec(name="shared", size_gb=1, cmd=("sh", "-c", WRAPPER)))
        assert info.pid is not None
        reaper.group(info.pid)
        await discover(state)
        await asyncio.sleep(0.2)
        assert not gone(info.pid)
        assert pid_file(state, "shared").exists()
        assert orphan_warnings(logs) == []
        assert any("another switchd" in r.getMessage() for r in logs.records)
    finally:
        await asyncio.wait_for(first.close(), TIMEOUT)
    assert not pid_file(state, "shared").exists()


# ---- pid files naming nothing of ours -----------------------------------------------


async def test_a_pid_file_of_a_group_that_is_gone_is_dropped(
    reaper: Reaper, tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    done = reaper.popen("true")
    await asyncio.to_thread(done.wait, TIMEOUT)  # reaped: its pid and group are gone
    path = write_pid_file(tmp_path, "gone", done.pid, 12345, boot_id())
    await discover(tmp_path)
    assert not path.exists()
    assert orphan_warnings(logs) == []


async def test_a_pid_file_of_another_boot_is_dropped_without_a_signal(
    reaper: Reaper, tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    # A live group that matches the file in every other respect.
    sleeper = reaper.popen("sleep", "300")
    path = write_pid_file(
        tmp_path, "old-boot", sleeper.pid, start_time_of(sleeper.pid), "not-" + boot_id()
    )
    await discover(tmp_path)
    assert not path.exists()
    await asyncio.sleep(0.2)
    assert sleeper.poll() is None
    assert orphan_warnings(logs) == []


@pytest.mark.parametrize(
    ("kind", "ticks"),
    [("leader", +100), ("leader", -100), ("in-the-callers-session", 0), ("leader-gone", +100)],
    ids=[
        "leader-older-than-the-engine",
        "leader-started-after-the-engine",
        "not-a-session-leader",
        "leader-gone-member-older-than-the-engine",
    ],
)
async def test_a_recycled_process_group_is_never_signalled(
    reaper: Reaper, tmp_path: Path, logs: pytest.LogCaptureFixture, kind: str, ticks: int
) -> None:
    """The group id of the file now names somebody else's group: left alone."""
    if kind == "leader-gone":
        # A group whose leader has exited; its child lives on in it.
        leader = reaper.popen("sh", "-c", "sleep 300 >/dev/null & echo $!", stdout=subprocess.PIPE)
        out, _ = await asyncio.to_thread(leader.communicate, None, TIMEOUT)
        pgid, member = leader.pid, int(out)
        assert gone(pgid)
    else:
        sleeper = reaper.popen("sleep", "300", new_session=kind == "leader")
        pgid = member = sleeper.pid
    assert int(stat_of(member)[2]) == pgid
    recorded = start_time_of(member) + ticks
    assert recorded > 0
    path = write_pid_file(tmp_path, "recycled", pgid, recorded, boot_id())
    await discover(tmp_path, grace=0.3)
    assert not path.exists()
    await asyncio.sleep(0.2)
    assert not gone(member)
    assert orphan_warnings(logs) == []


async def test_an_unreadable_pid_file_is_dropped(
    tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "broken.json").write_text("{not json", encoding="utf-8")
    (engines / "wrong.json").write_text('{"pid": "1"}', encoding="utf-8")
    await discover(tmp_path)
    assert os.listdir(engines) == []
    assert sum("unreadable pid file" in r.getMessage() for r in logs.records) == 2


# ---- the pid file of a running engine ---------------------------------------------------


async def next_exit(events: AsyncIterator[RuntimeEvent]) -> EngineExited:
    while not isinstance(event := await asyncio.wait_for(anext(events), TIMEOUT), EngineExited):
        pass
    return event


async def test_a_started_engine_has_a_pid_file_until_a_clean_stop(
    reaper: Reaper, tmp_path: Path
) -> None:
    runtime = ProcessRuntime(5, state_dir=tmp_path)
    model = ModelSpec(name="org/model", size_gb=1, cmd=("sleep", "${PORT}00"))
    try:
        info = await runtime.start(model)
        assert info.pid is not None
        reaper.group(info.pid)
        path = tmp_path / "engines" / "org%2Fmodel.json"
        record = json.loads(path.read_text(encoding="utf-8"))
        port = info.url.rsplit(":", 1)[1]
        assert record["model"] == "org/model"
        assert record["pid"] == info.pid
        assert record["start_time"] == start_time_of(info.pid)
        assert record["boot_id"] == boot_id()
        assert record["argv"] == ["sleep", f"{port}00"]
        assert abs(record["started_at"] - info.started_at) < 1e-3
        assert record["switchd"] == {"pid": os.getpid(), "start_time": start_time_of(os.getpid())}
        assert os.listdir(path.parent) == [path.name]  # no temp file left
        await asyncio.wait_for(runtime.stop(model, 5), TIMEOUT)
        assert not path.exists()
    finally:
        await asyncio.wait_for(runtime.close(), TIMEOUT)


async def test_an_engine_that_exits_by_itself_removes_its_pid_file(
    reaper: Reaper, tmp_path: Path
) -> None:
    runtime = ProcessRuntime(5, state_dir=tmp_path)
    events = runtime.events()
    path = tmp_path / "engines" / "short.json"
    try:
        model = ModelSpec(name="short", size_gb=1, cmd=("sleep", "0.3"))
        info = await runtime.start(model)
        assert info.pid is not None
        reaper.group(info.pid)
        assert json.loads(path.read_text(encoding="utf-8"))["pid"] == info.pid
        exited = await next_exit(events)
        assert exited.reason == "exited with code 0"
        assert not path.exists()
        # The next run of the model has a file of its own.
        again = await runtime.start(model)
        assert again.pid is not None
        reaper.group(again.pid)
        assert json.loads(path.read_text(encoding="utf-8"))["pid"] == again.pid
        await next_exit(events)
        assert not path.exists()
    finally:
        await asyncio.wait_for(runtime.close(), TIMEOUT)


async def test_close_removes_every_pid_file(reaper: Reaper, tmp_path: Path) -> None:
    runtime = ProcessRuntime(5, state_dir=tmp_path)
    try:
        for name in ("a", "b/c"):
            info = await runtime.start(ModelSpec(name=name, size_gb=1, cmd=("sleep", "300")))
            assert info.pid is not None
            reaper.group(info.pid)
        assert len(os.listdir(tmp_path / "engines")) == 2
    finally:
        await asyncio.wait_for(runtime.close(), TIMEOUT)
    assert os.listdir(tmp_path / "engines") == []


async def test_without_a_state_dir_no_pid_file_is_written(
    reaper: Reaper, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    runtime = ProcessRuntime(5)
    try:
        info = await runtime.start(ModelSpec(name="plain", size_gb=1, cmd=("sleep", "300")))
        assert info.pid is not None
        reaper.group(info.pid)
        assert await runtime.discover() == Discovery()
    finally:
        await asyncio.wait_for(runtime.close(), TIMEOUT)
    assert os.listdir(tmp_path) == []


async def test_a_pid_file_nested_too_deep_is_dropped_not_fatal(
    tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "deep.json").write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    await discover(tmp_path)  # was: RecursionError, and switchd did not start
    assert os.listdir(engines) == []
    assert sum("unreadable pid file" in r.getMessage() for r in logs.records) == 1
