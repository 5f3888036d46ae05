"""ProcessRuntime against real subprocesses: small Python scripts and the demo engine."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import httpx
import pytest

from switchd.config import ModelSpec
from switchd.runtime.base import EngineExited, EngineInfo, EngineOutput, RuntimeEvent, StartFailed
from switchd.runtime.process import TAIL_LINES, ProcessRuntime, free_port
from tests.processes import gone, kill_groups, wait_gone

EVENT_TIMEOUT = 10.0

# Prints each argument, then each NAME=value of the variables named by the
# first argument (comma-separated), one per line.
PRINT_ARGS = (
    "import os, sys\n"
    "names, *args = sys.argv[1:]\n"
    "for arg in args: print('arg=' + arg, flush=True)\n"
    "for name in filter(None, names.split(',')): "
    "print(name + '=' + os.environ.get(name, '<unset>'), flush=True)\n"
)
# Spawns a worker that inherits stdout (as vLLM's workers do), reports both pids,
# then sleeps.
PARENT_WITH_WORKER = (
    "import os, subprocess, time\n"
    "worker = subprocess.Popen(['sleep', '60'])\n"
    "print(f'pids {os.getpid()} {worker.pid}', flush=True)\n"
    "time.sleep(60)\n"
)
IGNORE_SIGTERM = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ignoring SIGTERM', flush=True)\n"
    "time.sleep(60)\n"
)
SLEEPER = "import time\nprint('up', flush=True)\ntime.sleep(60)\n"


def spec(
    name: str, *cmd: str, url: str | None = None, env: Mapping[str, str] | None = None
) -> ModelSpec:
    return ModelSpec(name=name, size_gb=1, cmd=cmd, url=url, env=dict(env or {}))


def python(name: str, code: str, *args: str, url: str | None = None) -> ModelSpec:
    return spec(name, sys.executable, "-c", code, *args, url=url)


class Harness:
    """A ProcessRuntime whose events are read one at a time, each with a timeout."""

    def __init__(self, grace: float = 10.0) -> None:
        self.runtime = ProcessRuntime(stop_grace_seconds=grace)
        self.events: AsyncIterator[RuntimeEvent] = self.runtime.events()
        self.groups: list[int] = []

    async def start(self, model: ModelSpec, devices: tuple[int, ...] | None = None) -> EngineInfo:
        info = await self.runtime.start(model, devices)
        assert info.pid is not None
        self.groups.append(info.pid)
        return info

    async def next_event(self, within: float = EVENT_TIMEOUT) -> RuntimeEvent:
        return await asyncio.wait_for(anext(self.events), within)

    async def next_output(self, within: float = EVENT_TIMEOUT) -> EngineOutput:
        event = await self.next_event(within)
        assert isinstance(event, EngineOutput), event
        return event

    async def until_exit(self, within: float = EVENT_TIMEOUT) -> tuple[list[str], EngineExited]:
        """The output lines, then the exit, of the one engine that runs."""
        lines: list[str] = []
        deadline = time.monotonic() + within
        while True:
            event = await self.next_event(max(0.01, deadline - time.monotonic()))
            if isinstance(event, EngineExited):
                return lines, event
            lines.append(event.line)

    async def remaining(self, within: float = EVENT_TIMEOUT) -> list[RuntimeEvent]:
        """Every event until the iterator ends (after close())."""
        events: list[RuntimeEvent] = []

        async def drain() -> None:
            async for event in self.events:
                events.append(event)

        await asyncio.wait_for(drain(), within)
        return events

    async def shutdown(self) -> None:
        kill_groups(self.groups)
        await asyncio.wait_for(self.runtime.close(), 20)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    rig = Harness()
    yield rig
    await rig.shutdown()


@pytest.fixture
async def quick() -> AsyncIterator[Harness]:
    """A runtime whose close() gives engines 0.3 s before SIGKILL."""
    rig = Harness(grace=0.3)
    yield rig
    await rig.shutdown()


# ---- command line and environment -------------------------------------------------


async def test_placeholders_are_substituted_in_argv_and_env(harness: Harness) -> None:
    model = spec(
        "sub-model",
        "${PYTHON}",
        "-c",
        PRINT_ARGS,
        "ENGINE_PORT,ENGINE_URL,ENGINE_PYTHON,PLAIN,LEFT",
        "${PORT}",
        "--model=${MODEL}",
        "${PYTHON}",
        "${MODEL}:${PORT}:${MODEL}",
        "${UNKNOWN}",
        env={
            "ENGINE_PORT": "${PORT}",
            "ENGINE_URL": "http://127.0.0.1:${PORT}/${MODEL}",
            "ENGINE_PYTHON": "${PYTHON}",
            "PLAIN": "no placeholders",
            "LEFT": "${NOT_A_PLACEHOLDER}",
        },
    )
    info = await harness.start(model)
    lines, exited = await harness.until_exit()
    port = int(lines[0].removeprefix("arg="))
    assert 0 < port < 65536
    assert lines == [
        f"arg={port}",
        "arg=--model=sub-model",
        f"arg={sys.executable}",
        f"arg=sub-model:{port}:sub-model",
        "arg=${UNKNOWN}",
        f"ENGINE_PORT={port}",
        f"ENGINE_URL=http://127.0.0.1:{port}/sub-model",
        f"ENGINE_PYTHON={sys.executable}",
        "PLAIN=no placeholders",
        "LEFT=${NOT_A_PLACEHOLDER}",
    ]
    assert info.url == f"http://127.0.0.1:{port}"
    assert exited.exit_code == 0


async def test_the_engine_inherits_the_environment(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWITCHD_TEST_INHERITED", "from switchd")
    monkeypatch.setenv("SWITCHD_TEST_OVERRIDDEN", "from switchd")
    model = spec(
        "env-model",
        sys.executable,
        "-c",
        PRINT_ARGS,
        "SWITCHD_TEST_INHERITED,SWITCHD_TEST_OVERRIDDEN",
        env={"SWITCHD_TEST_OVERRIDDEN": "from the spec"},
    )
    await harness.start(model)
    lines, _ = await harness.until_exit()
    assert lines == [
        "SWITCHD_TEST_INHERITED=from switchd",
        "SWITCHD_TEST_OVERRIDDEN=from the spec",
    ]


# ---- placement on GPU devices ---------------------------------------------------------

PLACEMENT_VARIABLES = "CUDA_VISIBLE_DEVICES,CUDA_DEVICE_ORDER,ENGINE_GPUS"


async def test_an_engine_placed_on_devices_sees_only_them(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")  # switchd's own: the placement wins
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    model = spec(
        "placed",
        sys.executable,
        "-c",
        PRINT_ARGS,
        PLACEMENT_VARIABLES,
        "${GPUS}",
        "--gpus=${GPUS}",
        env={"ENGINE_GPUS": "devices ${GPUS}"},
    )

    info = await harness.start(model, (0, 1))

    lines, exited = await harness.until_exit()
    assert lines == [
        "arg=0,1",
        "arg=--gpus=0,1",
        "CUDA_VISIBLE_DEVICES=0,1",
        "CUDA_DEVICE_ORDER=PCI_BUS_ID",  # CUDA's numbering is NVML's
        "ENGINE_GPUS=devices 0,1",
    ]
    assert info.devices == (0, 1)
    assert exited.exit_code == 0


async def test_gpus_is_substituted_in_the_words_before_a_shell_sees_them(
    harness: Harness,
) -> None:
    script = 'echo "cvd=$CUDA_VISIBLE_DEVICES gpus=${GPUS}"; sleep 30'
    model = spec("placed-sh", "sh", "-c", script)

    info = await harness.start(model, (0, 1))

    output = await harness.next_output()
    assert output == EngineOutput("placed-sh", info.instance, "cvd=0,1 gpus=0,1")
    await harness.runtime.stop(model, 5)
    exited = await harness.next_event()
    assert isinstance(exited, EngineExited)
    assert exited.reason == "stopped"


async def test_the_models_own_cuda_visible_devices_wins_over_the_placement(
    harness: Harness,
) -> None:
    model = spec(
        "pinned",
        sys.executable,
        "-c",
        PRINT_ARGS,
        PLACEMENT_VARIABLES,
        "${GPUS}",
        env={
            "CUDA_VISIBLE_DEVICES": "3",
            "CUDA_DEVICE_ORDER": "FASTEST_FIRST",
            "ENGINE_GPUS": "${GPUS}",
        },
    )

    info = await harness.start(model, (0, 1))

    lines, _ = await harness.until_exit()
    assert lines == [
        "arg=0,1",
        "CUDA_VISIBLE_DEVICES=3",
        "CUDA_DEVICE_ORDER=FASTEST_FIRST",
        "ENGINE_GPUS=0,1",
    ]
    assert info.devices == (0, 1)


async def test_without_devices_the_environment_is_left_as_it_was(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    model = spec(
        "unplaced",
        sys.executable,
        "-c",
        PRINT_ARGS,
        PLACEMENT_VARIABLES,
        "${GPUS}",
        "--gpus=${GPUS}",
        env={"ENGINE_GPUS": "[${GPUS}]"},
    )

    info = await harness.start(model, None)

    lines, _ = await harness.until_exit()
    assert lines == [
        "arg=",
        "arg=--gpus=",
        "CUDA_VISIBLE_DEVICES=5",
        "CUDA_DEVICE_ORDER=<unset>",
        "ENGINE_GPUS=[]",
    ]
    assert info.devices is None


async def test_a_running_engine_started_on_other_devices_is_returned_as_it_runs(
    harness: Harness,
) -> None:
    model = python("moved", SLEEPER)
    first = await harness.start(model, (0,))
    await harness.next_output()

    second = await harness.start(model, (1,))

    assert second is first
    assert second.devices == (0,)


async def test_engine_info_derives_the_url_from_the_port(harness: Harness) -> None:
    before = time.time()
    info = await harness.start(python("derived", PRINT_ARGS, "", "${PORT}"))
    lines, _ = await harness.until_exit()
    assert info.model == "derived"
    assert info.pid is not None
    assert info.instance == str(info.pid)
    assert info.url == f"http://127.0.0.1:{lines[0].removeprefix('arg=')}"
    assert info.container is None
    assert before - 1 <= info.started_at <= time.time() + 1


async def test_an_explicit_url_wins_over_the_derived_one(harness: Harness) -> None:
    info = await harness.start(
        python("explicit", PRINT_ARGS, "", "${PORT}", url="http://engine.internal:9000")
    )
    lines, _ = await harness.until_exit()
    assert info.url == "http://engine.internal:9000"
    assert lines[0].removeprefix("arg=").isdigit()  # the port is still handed out


async def test_no_shell_interprets_the_arguments(harness: Harness, tmp_path: Path) -> None:
    marker = tmp_path / "shell-ran"
    tricky = [
        "$HOME;echo hi",
        f"`touch {marker}`",
        f"$(touch {marker})",
        "a b  c",
        "*",
        "'quoted'",
        "> redirected",
        "",
    ]
    await harness.start(python("literal", PRINT_ARGS, "", *tricky))
    lines, exited = await harness.until_exit()
    assert lines == [f"arg={word}" for word in tricky]
    assert exited.exit_code == 0
    assert not marker.exists()


# ---- output and exits --------------------------------------------------------------


async def test_output_lines_arrive_in_order_then_one_exit(harness: Harness) -> None:
    code = (
        "import sys\n"
        "for i in range(120):\n"
        "    stream = sys.stderr if i % 3 == 0 else sys.stdout\n"
        "    print(f'line {i}', file=stream, flush=True)\n"
        "sys.stdout.buffer.write(b'windows line\\r\\n')\n"
        "sys.stdout.buffer.write(b'bad \\xff byte\\n')\n"
        "sys.stdout.buffer.write(b'no newline at the end')\n"
    )
    info = await harness.start(python("ordered", code))
    expected = [f"line {i}" for i in range(120)]
    expected += ["windows line", "bad \ufffd byte", "no newline at the end"]
    events = [await harness.next_event() for _ in range(len(expected) + 1)]
    assert events[:-1] == [EngineOutput("ordered", info.instance, line) for line in expected]
    assert events[-1] == EngineExited(
        "ordered", info.instance, 0, "exited with code 0", tuple(expected[-TAIL_LINES:])
    )
    assert len(events[-1].last_lines) == TAIL_LINES
    assert harness.runtime.last_lines("ordered") == tuple(expected[-TAIL_LINES:])
    await asyncio.wait_for(harness.runtime.close(), 5)
    assert await harness.remaining() == []  # one exit, nothing after it


@pytest.mark.parametrize(
    ("code", "exit_code", "reason"),
    [
        ("import sys; print('boom', flush=True); sys.exit(3)", 3, "exited with code 3"),
        (
            "import os, signal; print('boom', flush=True); os.kill(os.getpid(), signal.SIGUSR1)",
            -signal.SIGUSR1,
            "killed by SIGUSR1",
        ),
    ],
    ids=["exit-3", "signal"],
)
async def test_a_crash_is_reported_with_its_code_and_last_lines(
    harness: Harness, code: str, exit_code: int, reason: str
) -> None:
    info = await harness.start(python("crashy", code))
    lines, exited = await harness.until_exit()
    assert lines == ["boom"]
    assert exited == EngineExited("crashy", info.instance, exit_code, reason, ("boom",))
    assert harness.runtime.last_lines("crashy") == ("boom",)
    assert harness.runtime.last_lines("never-started") == ()


async def test_last_lines_while_running_and_after_stop(harness: Harness) -> None:
    code = "import time\nfor i in range(3): print(f'loading {i}', flush=True)\ntime.sleep(60)\n"
    model = python("tail", code)
    await harness.start(model)
    for _ in range(3):
        await harness.next_output()
    assert harness.runtime.last_lines("tail") == ("loading 0", "loading 1", "loading 2")
    await harness.runtime.stop(model, 5)
    assert harness.runtime.last_lines("tail") == ("loading 0", "loading 1", "loading 2")
    exited = await harness.next_event()
    assert isinstance(exited, EngineExited)
    assert exited.last_lines == ("loading 0", "loading 1", "loading 2")


@pytest.mark.parametrize("size", [64 * 1024 + 1, 300 * 1024], ids=["64KiB+1", "300KiB"])
async def test_a_line_longer_than_64_kib_is_delivered_whole(harness: Harness, size: int) -> None:
    code = (
        "import sys\n"
        f"sys.stdout.write('before\\n' + 'x' * {size} + '\\nafter\\n')\n"
        "sys.stdout.flush()\n"
    )
    await harness.start(python("chatty", code))
    lines, exited = await harness.until_exit()
    assert lines == ["before", "x" * size, "after"]
    assert exited.exit_code == 0


async def test_a_line_over_the_limit_loses_nothing(harness: Harness) -> None:
    size = 2 * 1024 * 1024
    code = (
        "import sys\n"
        f"sys.stdout.write('before\\n' + 'x' * {size} + '\\nafter\\n')\n"
        "sys.stdout.flush()\n"
    )
    await harness.start(python("flood", code))
    lines, exited = await harness.until_exit()
    assert exited.exit_code == 0  # no exception: the pump survives the long line
    assert lines[0] == "before"
    assert lines[-1] == "after"
    # Split into pieces is acceptable; losing output is not.
    pieces = lines[1:-1]
    assert {char for piece in pieces for char in piece} == {"x"}
    assert sum(len(piece) for piece in pieces) == size


# ---- stopping ------------------------------------------------------------------------


async def test_stop_terminates_the_whole_process_group(harness: Harness) -> None:
    model = python("family", PARENT_WITH_WORKER)
    info = await harness.start(model)
    line = (await harness.next_output()).line
    _, parent, worker = line.split()
    assert int(parent) == info.pid
    assert not gone(int(parent))
    assert not gone(int(worker))
    began = time.monotonic()
    await harness.runtime.stop(model, 30)
    assert time.monotonic() - began < 5  # SIGTERM sufficed: no waiting out the grace
    # stop() returned only once both had exited (the worker held the output pipe).
    assert gone(int(parent))
    assert gone(int(worker))
    exited = await harness.next_event(1)
    assert exited == EngineExited(
        "family", info.instance, -signal.SIGTERM, "stopped", (f"pids {parent} {worker}",)
    )


async def test_an_engine_ignoring_sigterm_is_killed_after_the_grace(harness: Harness) -> None:
    model = python("stubborn", IGNORE_SIGTERM)
    info = await harness.start(model)
    assert (await harness.next_output()).line == "ignoring SIGTERM"
    began = time.monotonic()
    await asyncio.wait_for(harness.runtime.stop(model, 0.3), 10)
    elapsed = time.monotonic() - began
    assert 0.3 <= elapsed < 2
    assert info.pid is not None
    assert gone(info.pid)
    exited = await harness.next_event(1)
    assert isinstance(exited, EngineExited)
    assert exited.exit_code == -signal.SIGKILL


async def test_a_sigkilled_engine_says_so_in_its_exit_reason(harness: Harness) -> None:
    model = python("stubborn", IGNORE_SIGTERM)
    await harness.start(model)
    await harness.next_output()
    await asyncio.wait_for(harness.runtime.stop(model, 0.3), 10)
    exited = await harness.next_event(1)
    assert isinstance(exited, EngineExited)
    assert "SIGKILL" in exited.reason


async def test_stop_of_an_engine_never_started_or_already_exited(harness: Harness) -> None:
    await asyncio.wait_for(harness.runtime.stop(python("never", SLEEPER), 1), 5)
    model = python("short", "print('bye')")
    info = await harness.start(model)
    _, exited = await harness.until_exit()
    assert exited.reason == "exited with code 0"
    await asyncio.wait_for(harness.runtime.stop(model, 1), 5)
    # A stop after the exit reports nothing more, and the next start is a new run.
    again = await harness.start(model)
    assert again.instance != info.instance
    assert (await harness.next_output()) == EngineOutput("short", again.instance, "bye")


async def test_a_crash_is_reported_even_when_a_worker_survives(harness: Harness) -> None:
    code = (
        "import os, subprocess, sys\n"
        "worker = subprocess.Popen(['sleep', '60'])\n"
        "print(f'worker {worker.pid}', flush=True)\n"
        "sys.exit(3)\n"
    )
    info = await harness.start(python("orphaning", code))
    worker = int((await harness.next_output()).line.split()[1])
    exited = await harness.next_event(5)
    assert exited == EngineExited(
        "orphaning", info.instance, 3, "exited with code 3", (f"worker {worker}",)
    )
    assert await wait_gone(worker, 2)  # the worker it left behind is killed


# ---- start ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "executable", ["/nonexistent/dir/engine-binary", "switchd-no-such-engine-xyz"]
)
async def test_start_of_a_missing_executable_raises_start_failed(
    harness: Harness, executable: str
) -> None:
    with pytest.raises(StartFailed, match=r"No such file") as caught:
        await harness.runtime.start(spec("missing", executable, "--port", "${PORT}"))
    assert executable in str(caught.value)
    assert harness.runtime.last_lines("missing") == ()
    # Nothing was queued for the failed start: the next event is the next engine's.
    info = await harness.start(python("after", "print('fine')"))
    assert await harness.next_output() == EngineOutput("after", info.instance, "fine")


async def test_start_of_a_running_model_returns_the_same_engine(harness: Harness) -> None:
    model = python("once", SLEEPER)
    first = await harness.start(model)
    await harness.next_output()
    second = await harness.start(model)
    assert second is first
    await harness.runtime.stop(model, 5)
    exited = await harness.next_event()
    assert isinstance(exited, EngineExited)
    assert exited.instance == first.instance
    third = await harness.start(model)
    assert third.instance != first.instance
    assert (await harness.next_output()).instance == third.instance


async def test_the_demo_engine_runs_and_answers_on_the_derived_url(harness: Harness) -> None:
    model = spec(
        "demo-model",
        "${PYTHON}",
        "-m",
        "switchd.demo.engine",
        "--port",
        "${PORT}",
        "--model",
        "${MODEL}",
        "--load-seconds",
        "0.3",
    )
    info = await harness.start(model)
    deadline = time.monotonic() + 20
    async with httpx.AsyncClient(base_url=info.url, timeout=2) as http:
        while True:
            assert time.monotonic() < deadline, "the demo engine never became healthy"
            try:
                if (await http.get("/health")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
        models = (await http.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["demo-model"]
    await harness.runtime.stop(model, 5)
    lines: list[str] = []
    while not isinstance(event := await harness.next_event(), EngineExited):
        lines.append(event.line)
    assert any("demo-model" in line for line in lines)
    assert event.reason == "stopped"
    assert info.pid is not None
    assert gone(info.pid)


# ---- close ---------------------------------------------------------------------------


async def test_close_stops_every_engine_and_ends_the_events(quick: Harness) -> None:
    polite = await quick.start(python("polite", SLEEPER))
    stubborn = await quick.start(python("stubborn", IGNORE_SIGTERM))
    outputs = {(await quick.next_output()).model for _ in range(2)}
    assert outputs == {"polite", "stubborn"}
    began = time.monotonic()
    await asyncio.wait_for(quick.runtime.close(), 10)
    assert time.monotonic() - began < 2  # the stubborn one got the 0.3 s grace, not more
    assert polite.pid is not None
    assert stubborn.pid is not None
    assert gone(polite.pid)
    assert gone(stubborn.pid)
    rest = await quick.remaining()
    exits = {e.model: e for e in rest if isinstance(e, EngineExited)}
    assert len(rest) == 2
    assert exits["polite"].exit_code == -signal.SIGTERM
    assert exits["stubborn"].exit_code == -signal.SIGKILL
    assert exits["polite"].reason == "stopped"
    assert exits["stubborn"].reason.startswith("stopped (killed by SIGKILL")


async def test_close_without_engines_ends_the_events(harness: Harness) -> None:
    await asyncio.wait_for(harness.runtime.close(), 5)
    assert await harness.remaining() == []


# ---- free_port -----------------------------------------------------------------------


def test_free_port_returns_a_bindable_port() -> None:
    port = free_port()
    assert 1024 <= port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert sock.getsockname()[1] == port
