"""DockerRuntime against a real Docker daemon, with the demo engine in containers.

Skipped, with the reason, when no daemon answers. Every container a test makes
(or makes switchd make) is removed at its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest
from docker.types import DeviceRequest

from switchd.config import ModelSpec, parse_settings
from switchd.runtime.base import EngineExited, EngineInfo, EngineOutput, RuntimeEvent, StartFailed
from switchd.runtime.docker import (
    DockerRuntime,
    DockerUnavailable,
    connect_docker,
    container_name,
    devices_requested,
)
from tests import docker_engine
from tests.docker_engine import (
    CRASH_LINES,
    LABEL,
    Containers,
    container_model,
    create_engine_container,
    eventually,
    image_model,
    load_lines,
    unique,
)

docker_client = docker_engine.docker_client
engine_image = docker_engine.engine_image
containers = docker_engine.containers

EVENT_TIMEOUT = 10.0
GRACE = 2.0


def parse_specs(models: dict[str, dict[str, Any]]) -> dict[str, ModelSpec]:
    """ModelSpecs as switchd reads them from its file, DockerOptions included."""
    return dict(parse_settings({"models": models}, "test.yaml", {}).models)


def docker_started_ns(state: dict[str, Any]) -> int:
    """State.StartedAt of `docker inspect` (RFC 3339, UTC) as epoch nanoseconds."""
    text: str = state["State"]["StartedAt"]
    whole, _, fraction = text.removesuffix("Z").partition(".")
    seconds = datetime.fromisoformat(whole).replace(tzinfo=UTC).timestamp()
    return int(seconds) * 1_000_000_000 + int(fraction.ljust(9, "0")[:9])


class Harness:
    """An open DockerRuntime whose events are collected as they come."""

    def __init__(self, runtime: DockerRuntime, specs: dict[str, ModelSpec]) -> None:
        self.runtime = runtime
        self.specs = specs
        self.events: list[RuntimeEvent] = []
        self.pump = asyncio.create_task(self._collect())
        self.closed = False

    async def _collect(self) -> None:
        async for event in self.runtime.events():
            self.events.append(event)

    def lines(self, model: str) -> list[str]:
        return [e.line for e in self.events if isinstance(e, EngineOutput) and e.model == model]

    def exits(self, model: str) -> list[EngineExited]:
        return [e for e in self.events if isinstance(e, EngineExited) and e.model == model]

    async def exit_of(self, model: str, within: float = EVENT_TIMEOUT) -> EngineExited:
        await eventually(lambda: bool(self.exits(model)), within, f"EngineExited of {model}")
        return self.exits(model)[0]

    async def loaded(self, model: str, within: float = EVENT_TIMEOUT) -> None:
        """Until the engine's `Model X loaded in` line came as EngineOutput."""
        await eventually(
            lambda: any(" loaded in " in line for line in self.lines(model)),
            within,
            f"the load lines of {model}",
        )

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.runtime.close()
        await asyncio.wait_for(self.pump, EVENT_TIMEOUT)


OpenRuntime = Callable[[dict[str, dict[str, Any]]], Awaitable[Harness]]


@pytest.fixture
async def open_runtime(containers: Containers) -> AsyncIterator[OpenRuntime]:
    """Open DockerRuntimes on demand; each is closed before its containers are removed."""
    opened: list[Harness] = []

    async def factory(models: dict[str, dict[str, Any]]) -> Harness:
        specs = parse_specs(models)
        runtime = await DockerRuntime.open(specs, stop_grace_seconds=GRACE)
        harness = Harness(runtime, specs)
        opened.append(harness)
        return harness

    yield factory
    for harness in opened:
        await harness.close()


async def healthy(url: str, within: float = EVENT_TIMEOUT) -> None:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=2) as http:
        while True:
            with contextlib.suppress(httpx.TransportError):
                if (await http.get(f"{url}/health")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"{url}/health did not answer 200 within {within} s")
            await asyncio.sleep(0.05)


def assert_matches_docker(info: EngineInfo, state: dict[str, Any]) -> None:
    """Same container, same run: the start time is Docker's, to the nanosecond."""
    started = docker_started_ns(state)
    assert info.started_at == started / 1e9
    assert info.instance == f"{state['Id'][:12]}:{started}"
    assert info.container == state["Name"].removeprefix("/")
    assert info.pid is None


# ---- starting ------------------------------------------------------------------


async def test_image_model_runs_in_a_labelled_container_and_its_logs_follow(
    open_runtime: OpenRuntime, containers: Containers, engine_image: str
) -> None:
    model = containers.model("img")
    harness = await open_runtime({model: image_model(engine_image, model)})

    info = await harness.runtime.start(harness.specs[model])

    state = containers.inspect(f"switchd-{model}")
    assert state["State"]["Running"] is True
    assert state["Config"]["Labels"] == {LABEL: model}
    assert state["Config"]["Image"] == engine_image
    assert not state["HostConfig"]["DeviceRequests"]  # request_gpus: false
    binding = state["HostConfig"]["PortBindings"]["8000/tcp"][0]
    assert binding["HostIp"] == "127.0.0.1"
    assert info.model == model
    assert info.container == f"switchd-{model}"
    assert info.url == f"http://127.0.0.1:{binding['HostPort']}"
    assert_matches_docker(info, state)

    await healthy(info.url)
    await harness.loaded(model)
    lines = harness.lines(model)
    assert lines[:-1] == load_lines(model)
    assert lines[-1].startswith(f"INFO Model {model} loaded in ")
    outputs = [e for e in harness.events if isinstance(e, EngineOutput)]
    assert {e.instance for e in outputs} == {info.instance}
    assert harness.runtime.last_lines(model) == tuple(lines)
    assert harness.exits(model) == []


async def test_container_model_is_started_and_its_published_port_found(
    open_runtime: OpenRuntime,
    containers: Containers,
    docker_client: docker.DockerClient,
    engine_image: str,
) -> None:
    model = unique("ctr")
    name = containers.name("compose-ctr")
    entry = container_model(docker_client, engine_image, name, model)
    url = entry.pop("url")  # derived from the published port instead
    assert containers.inspect(name)["State"]["Status"] == "created"
    harness = await open_runtime({model: entry})

    info = await harness.runtime.start(harness.specs[model])

    state = containers.inspect(name)
    assert state["State"]["Running"] is True
    assert info.container == name
    assert info.url == url
    assert_matches_docker(info, state)
    await healthy(url)


async def test_stop_returns_once_docker_shows_it_exited_and_reports_stopped(
    open_runtime: OpenRuntime, containers: Containers, engine_image: str
) -> None:
    model = containers.model("stop")
    harness = await open_runtime({model: image_model(engine_image, model)})
    spec = harness.specs[model]
    info = await harness.runtime.start(spec)
    await harness.loaded(model)

    await harness.runtime.stop(spec, GRACE)

    state = containers.inspect(f"switchd-{model}")["State"]
    assert (state["Running"], state["Status"], state["ExitCode"]) == (False, "exited", 0)
    exited = await harness.exit_of(model, within=5)
    assert exited.instance == info.instance
    assert (exited.exit_code, exited.reason) == (0, "stopped")
    assert list(exited.last_lines[: len(load_lines(model))]) == load_lines(model)
    assert harness.runtime.last_lines(model)[: len(load_lines(model))] == tuple(load_lines(model))

    # Started again, the same container runs anew: another instance, no stale exit.
    again = await harness.runtime.start(spec)
    assert again.container == info.container
    assert again.instance != info.instance
    assert again.instance.split(":")[0] == info.instance.split(":")[0]
    assert containers.running(f"switchd-{model}")
    await healthy(again.url)
    assert len(harness.exits(model)) == 1


async def test_remove_true_removes_the_container_on_stop(
    open_runtime: OpenRuntime, containers: Containers, engine_image: str
) -> None:
    model = containers.model("rm")
    harness = await open_runtime({model: image_model(engine_image, model, remove=True)})
    spec = harness.specs[model]
    await harness.runtime.start(spec)
    assert containers.running(f"switchd-{model}")

    await harness.runtime.stop(spec, GRACE)

    with pytest.raises(docker.errors.NotFound):
        containers.get(f"switchd-{model}")
    exited = await harness.exit_of(model, within=5)
    assert exited.reason == "stopped"


# ---- placement on GPU devices ----------------------------------------------------------


def device_requests_of(state: dict[str, Any]) -> list[tuple[int, list[str], list[list[str]]]]:
    """HostConfig.DeviceRequests of `docker inspect`: (Count, DeviceIDs, Capabilities)."""
    requests = state["HostConfig"]["DeviceRequests"] or []
    return [(r["Count"], r["DeviceIDs"] or [], r["Capabilities"]) for r in requests]


async def start_placed(harness: Harness, spec: ModelSpec, devices: tuple[int, ...] | None) -> None:
    """Start on `devices`, then stop: Docker creates the container here, but without an
    NVIDIA runtime (no GPU on this host) it cannot start one that asks for a GPU."""
    failure = None
    try:
        await harness.runtime.start(spec, devices)
    except StartFailed as failed:
        failure = str(failed)
    if failure is None:  # a host with GPUs: stopped, so the next start may place it elsewhere
        await harness.runtime.stop(spec, GRACE)
    else:
        assert failure.startswith(f"container {container_name(spec)} did not start: ")


async def test_an_image_model_placed_on_devices_asks_docker_for_exactly_them(
    open_runtime: OpenRuntime, containers: Containers, engine_image: str
) -> None:
    model = containers.model("placed")
    harness = await open_runtime({model: image_model(engine_image, model, request_gpus=True)})
    spec = harness.specs[model]

    await start_placed(harness, spec, (1,))

    state = containers.inspect(f"switchd-{model}")
    assert device_requests_of(state) == [(0, ["1"], [["gpu"]])]
    assert state["Config"]["Labels"] == {LABEL: model}


async def test_another_placement_recreates_the_container_and_the_same_one_reuses_it(
    open_runtime: OpenRuntime, containers: Containers, engine_image: str
) -> None:
    model = containers.model("moved")
    harness = await open_runtime({model: image_model(engine_image, model, request_gpus=True)})
    spec = harness.specs[model]
    name = f"switchd-{model}"
    await start_placed(harness, spec, (1,))
    first = containers.inspect(name)["Id"]

    await start_placed(harness, spec, (0, 2))

    second = containers.inspect(name)
    assert second["Id"] != first  # removed and created anew
    assert device_requests_of(second) == [(0, ["0", "2"], [["gpu"]])]
    assert second["Config"]["Labels"] == {LABEL: model}

    await start_placed(harness, spec, (0, 2))
    assert containers.inspect(name)["Id"] == second["Id"]  # same placement: reused

    await start_placed(harness, spec, None)  # as configured: every device
    unplaced = containers.inspect(name)
    assert unplaced["Id"] != second["Id"]
    assert device_requests_of(unplaced) == [(-1, [], [["gpu"]])]


async def test_without_request_gpus_a_placement_asks_docker_for_no_device(
    open_runtime: OpenRuntime, containers: Containers, engine_image: str
) -> None:
    model = containers.model("nogpus")
    harness = await open_runtime({model: image_model(engine_image, model)})  # request_gpus: false
    spec = harness.specs[model]

    info = await harness.runtime.start(spec, (1,))

    state = containers.inspect(f"switchd-{model}")
    assert state["State"]["Running"] is True
    assert not state["HostConfig"]["DeviceRequests"]
    assert info.devices is None
    await healthy(info.url)


async def test_a_running_container_is_not_recreated_for_another_placement(
    open_runtime: OpenRuntime, containers: Containers, engine_image: str
) -> None:
    model = containers.model("busy")
    first = await open_runtime({model: image_model(engine_image, model)})
    info = await first.runtime.start(first.specs[model])
    await first.close()
    # The next switchd asks for GPUs: the engine running already is left as it runs.
    second = await open_runtime({model: image_model(engine_image, model, request_gpus=True)})

    again = await second.runtime.start(second.specs[model], (1,))

    state = containers.inspect(f"switchd-{model}")
    assert again.instance == info.instance
    assert not state["HostConfig"]["DeviceRequests"]
    assert again.devices is None


async def test_a_container_model_ignores_the_placement(
    open_runtime: OpenRuntime,
    containers: Containers,
    docker_client: docker.DockerClient,
    engine_image: str,
) -> None:
    model = unique("compose-placed")
    name = containers.name("compose-placed")
    harness = await open_runtime({model: container_model(docker_client, engine_image, name, model)})
    created = containers.inspect(name)["Id"]

    info = await harness.runtime.start(harness.specs[model], (1,))

    state = containers.inspect(name)
    assert state["Id"] == created  # compose's container, as compose made it
    assert state["State"]["Running"] is True
    assert not state["HostConfig"]["DeviceRequests"]
    assert info.devices is None
    await healthy(info.url)


@pytest.mark.parametrize(
    ("requests", "expected"),
    [
        ([DeviceRequest(device_ids=["2", "0"], capabilities=[["gpu"]])], (0, 2)),
        ([DeviceRequest(driver="nvidia", device_ids=["3"], capabilities=[["gpu"]])], (3,)),
        ([DeviceRequest(count=-1, capabilities=[["gpu"]])], None),  # all
        ([DeviceRequest(count=2, capabilities=[["gpu"]])], None),  # any 2: Docker picks
        ([DeviceRequest(device_ids=["GPU-0a1b"], capabilities=[["gpu"]])], None),  # a UUID
        ([], None),
    ],
)
def test_the_devices_a_container_requests_are_read_from_its_device_requests(
    containers: Containers,
    engine_image: str,
    requests: list[DeviceRequest],
    expected: tuple[int, ...] | None,
) -> None:
    name = containers.name("compose-gpus")
    created = containers.client.containers.create(
        engine_image, ["true"], name=name, device_requests=requests
    )

    assert devices_requested(created) == expected
    assert containers.inspect(name)["State"]["Status"] == "created"  # only read


# ---- clear errors -----------------------------------------------------------------


async def test_a_container_model_that_does_not_exist_fails_to_start(
    open_runtime: OpenRuntime,
) -> None:
    model = unique("ghost")
    name = unique("no-such-container")
    harness = await open_runtime({model: {"container": name, "size_gb": 1}})

    with pytest.raises(StartFailed) as failed:
        await harness.runtime.start(harness.specs[model])

    assert str(failed.value) == (
        f"container {name} does not exist (create it with `docker compose create`)"
    )


async def test_a_missing_image_fails_naming_the_image_and_docker_pull(
    open_runtime: OpenRuntime, containers: Containers
) -> None:
    model = containers.model("noimg")
    image = f"{unique('switchd-test-missing')}:latest"
    harness = await open_runtime({model: {"image": image, "size_gb": 1, "request_gpus": False}})

    with pytest.raises(StartFailed) as failed:
        await harness.runtime.start(harness.specs[model])

    assert str(failed.value) == f"image {image} is not on this host: `docker pull {image}` first"
    with pytest.raises(docker.errors.NotFound):
        containers.get(f"switchd-{model}")


async def test_a_name_taken_by_a_container_switchd_did_not_make_fails(
    open_runtime: OpenRuntime,
    containers: Containers,
    docker_client: docker.DockerClient,
    engine_image: str,
) -> None:
    model = containers.model("taken")
    name = f"switchd-{model}"
    create_engine_container(docker_client, engine_image, name, model)  # no label
    harness = await open_runtime({model: image_model(engine_image, model)})

    with pytest.raises(StartFailed) as failed:
        await harness.runtime.start(harness.specs[model])

    assert str(failed.value) == f"the name {name} is taken by a container switchd did not make"
    assert containers.inspect(name)["State"]["Status"] == "created"  # left alone


def test_connect_docker_names_a_missing_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    socket = f"unix://{tmp_path}/missing/docker.sock"
    monkeypatch.setenv("DOCKER_HOST", socket)

    with pytest.raises(DockerUnavailable) as unavailable:
        connect_docker()

    assert str(unavailable.value) == (
        f"no Docker daemon answers at {socket}: start it (`dockerd`), or, with switchd "
        "in a container, mount the socket: -v /var/run/docker.sock:/var/run/docker.sock"
    )


async def test_open_fails_with_the_same_message_without_a_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    socket = f"unix://{tmp_path}/docker.sock"
    monkeypatch.setenv("DOCKER_HOST", socket)

    with pytest.raises(DockerUnavailable, match=f"^no Docker daemon answers at {socket}: "):
        await DockerRuntime.open(parse_specs({"m": {"container": "m", "size_gb": 1}}))


# ---- exits behind switchd's back -----------------------------------------------------


async def test_a_container_killed_from_outside_reports_sigkill_and_its_last_lines(
    open_runtime: OpenRuntime, containers: Containers, engine_image: str
) -> None:
    model = containers.model("kill")
    harness = await open_runtime({model: image_model(engine_image, model)})
    info = await harness.runtime.start(harness.specs[model])
    await harness.loaded(model)

    killed_at = time.monotonic()
    containers.get(f"switchd-{model}").kill()
    exited = await harness.exit_of(model, within=5)

    assert time.monotonic() - killed_at < 2.0
    assert exited.instance == info.instance
    assert (exited.exit_code, exited.reason) == (137, "killed (SIGKILL)")
    assert list(exited.last_lines) == harness.lines(model)
    assert list(exited.last_lines[:-1]) == load_lines(model)
    assert harness.runtime.last_lines(model) == exited.last_lines


async def test_a_crash_while_loading_reports_code_1_and_the_error_lines(
    open_runtime: OpenRuntime, containers: Containers, engine_image: str
) -> None:
    model = containers.model("crash")
    harness = await open_runtime(
        {model: image_model(engine_image, model, load_seconds=2.0, fail_after=0.3)}
    )
    info = await harness.runtime.start(harness.specs[model])

    exited = await harness.exit_of(model)

    assert exited.instance == info.instance
    assert (exited.exit_code, exited.reason) == (1, "exited with code 1")
    assert exited.last_lines[0] == f"INFO Loading model weights for {model}"
    assert exited.last_lines[-3:] == CRASH_LINES
    assert containers.inspect(f"switchd-{model}")["State"]["ExitCode"] == 1


async def test_a_container_that_dies_at_once_is_reported_not_waited_for(
    open_runtime: OpenRuntime, containers: Containers, engine_image: str
) -> None:
    model = containers.model("instant")
    command = ["/bin/sh", "-c", "echo boom; exit 3"]  # gone before start() returns
    harness = await open_runtime({model: image_model(engine_image, model, command=command)})
    info = await harness.runtime.start(harness.specs[model])

    exited = await harness.exit_of(model)

    assert exited.instance == info.instance
    assert (exited.exit_code, exited.reason) == (3, "exited with code 3")
    assert exited.last_lines == ("boom",)


# ---- adoption, closing ---------------------------------------------------------------


async def test_discover_adopts_a_running_container_and_reports_a_missing_one(
    open_runtime: OpenRuntime, containers: Containers, engine_image: str
) -> None:
    model = containers.model("adopt")
    ghost = unique("ghost")
    missing = unique("no-such-container")
    models = {
        model: image_model(engine_image, model),
        ghost: {"container": missing, "size_gb": 1},
    }
    first = await open_runtime(models)
    info = await first.runtime.start(first.specs[model])
    await first.loaded(model)
    await first.close()
    assert containers.running(f"switchd-{model}")  # switchd's end is not the engine's

    second = await open_runtime(models)
    found = await second.runtime.discover()

    state = containers.inspect(f"switchd-{model}")
    assert found.running == [info]  # same container, same run, same URL
    assert_matches_docker(found.running[0], state)
    assert dict(found.unavailable) == {
        ghost: f"container {missing} does not exist (create it with `docker compose create`)"
    }
    await healthy(info.url)

    # An adopted engine has no log follower: its exit still carries its last lines.
    containers.get(f"switchd-{model}").kill()
    exited = await second.exit_of(model, within=5)
    assert (exited.instance, exited.exit_code, exited.reason) == (
        info.instance,
        137,
        "killed (SIGKILL)",
    )
    assert list(exited.last_lines[: len(load_lines(model))]) == load_lines(model)


async def test_discover_ignores_stopped_containers(
    open_runtime: OpenRuntime,
    containers: Containers,
    docker_client: docker.DockerClient,
    engine_image: str,
) -> None:
    model = unique("idle")
    name = containers.name("compose-idle")
    harness = await open_runtime({model: container_model(docker_client, engine_image, name, model)})

    found = await harness.runtime.discover()

    assert list(found.running) == []
    assert dict(found.unavailable) == {}


async def test_discover_does_not_adopt_a_container_switchd_did_not_make(
    open_runtime: OpenRuntime,
    containers: Containers,
    docker_client: docker.DockerClient,
    engine_image: str,
) -> None:
    model = containers.model("foreign")
    foreign, _ = create_engine_container(docker_client, engine_image, f"switchd-{model}", model)
    foreign.start()
    harness = await open_runtime({model: image_model(engine_image, model)})

    found = await harness.runtime.discover()

    assert list(found.running) == []


async def test_close_ends_events_and_leaves_containers_running(
    open_runtime: OpenRuntime, containers: Containers, engine_image: str
) -> None:
    model = containers.model("close")
    harness = await open_runtime({model: image_model(engine_image, model)})
    await harness.runtime.start(harness.specs[model])

    await harness.runtime.close()
    harness.closed = True

    await asyncio.wait_for(harness.pump, 5)  # events() ended
    assert containers.running(f"switchd-{model}")
    assert harness.exits(model) == []


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("gpt-oss-20b", "switchd-gpt-oss-20b"),
        ("Qwen/Qwen3-8B", "switchd-Qwen-Qwen3-8B"),
        ("llama3.1:8b", "switchd-llama3.1-8b"),
    ],
)
def test_switchd_made_containers_get_names_docker_accepts(name: str, expected: str) -> None:
    assert container_name(ModelSpec(name=name, size_gb=1, image="i")) == expected
