"""Stand-in engines as Docker containers, for the tests against a real Docker daemon.

No image registry is reachable, so the engine image is built locally: `docker
import` of an empty tar, with the host's interpreter, the virtual environment
and the repository bind-mounted read-only, and the demo engine as command.
Every path is derived at run time, so a fresh clone elsewhere works too.

Test modules use the fixtures by assigning them to module names (which keeps
the linters quiet about imports used only as fixture arguments):

    docker_client = docker_engine.docker_client
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import sys
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from docker.models.containers import Container

import switchd
from switchd.runtime.process import free_port

REPO_ROOT = Path(switchd.__file__).resolve().parents[1]
IMAGE_REPOSITORY = "switchd-test-engine"
ENGINE_PORT = 8000
LABEL = "switchd.model"

ENGINE_LOAD_LINES = (
    "INFO Loading model weights for {model}",
    "INFO Loading safetensors checkpoint shards: 1/4",
    "INFO Loading safetensors checkpoint shards: 2/4",
    "INFO Loading safetensors checkpoint shards: 3/4",
    "INFO Loading safetensors checkpoint shards: 4/4",
    "INFO Memory profiling: KV cache reserved",
    "INFO Capturing CUDA graphs",
)
CRASH_LINES = (
    "ERROR torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
    "ERROR RuntimeError: Engine core initialization failed. See root cause above.",
    "ERROR Engine core initialization failed",
)


def load_lines(model: str) -> list[str]:
    """The demo engine's load lines before its final `Model X loaded in …s`."""
    return [line.format(model=model) for line in ENGINE_LOAD_LINES]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# ---- the daemon and the image ----------------------------------------------------


def no_docker_reason() -> str | None:
    """Why the Docker tests cannot run here, or None when a daemon answers."""
    try:
        client = docker.from_env(version="auto", timeout=10)
    except docker.errors.DockerException as exc:
        return f"no Docker daemon reachable ({exc}); start dockerd to run these tests"
    try:
        client.ping()
    except (docker.errors.DockerException, OSError) as exc:
        return f"no Docker daemon answers ({exc}); start dockerd to run these tests"
    finally:
        client.close()
    return None


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """A client for DOCKER_HOST or the default socket; skips when no daemon answers."""
    reason = no_docker_reason()
    if reason is not None:
        pytest.skip(reason)
    client = docker.from_env(version="auto", timeout=60)
    yield client
    client.close()


def empty_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w"):
        pass
    return buffer.getvalue()


@pytest.fixture(scope="session")
def engine_image(docker_client: docker.DockerClient) -> Iterator[str]:
    """An empty image, imported under a tag of its own and removed at the end."""
    tag = uuid.uuid4().hex[:12]
    name = f"{IMAGE_REPOSITORY}:{tag}"
    docker_client.api.import_image_from_data(empty_tar(), repository=IMAGE_REPOSITORY, tag=tag)
    yield name
    with contextlib.suppress(docker.errors.NotFound):
        docker_client.images.remove(name, force=True)


def engine_volumes() -> list[str]:
    """The host's interpreter, its libraries and the repository, read-only.

    A path inside another one of the list is left out: Docker refuses the same
    mount point twice, and the outer mount shows it anyway.
    """
    candidates = [
        REPO_ROOT,
        Path(sys.prefix).resolve(),
        Path(sys.base_prefix).resolve(),
        Path("/usr"),
        Path("/lib"),
        Path("/lib64"),
        Path("/bin"),
    ]
    chosen: list[Path] = []
    for path in candidates:
        if not path.exists() or path in chosen:
            continue
        if any(path.is_relative_to(outer) for outer in chosen):
            continue
        chosen = [p for p in chosen if not p.is_relative_to(path)] + [path]
    return [f"{path}:{path}:ro" for path in chosen]


def engine_command(
    model: str,
    *,
    load_seconds: float = 0.5,
    fail_after: float | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "switchd.demo.engine",
        "--host",
        "0.0.0.0",
        "--port",
        str(ENGINE_PORT),
        "--model",
        model,
        "--load-seconds",
        str(load_seconds),
        "--tokens-per-second",
        "200",
    ]
    if fail_after is not None:
        command += ["--fail-after", str(fail_after)]
    return [*command, *extra]


def image_model(
    image: str,
    model: str,
    *,
    size_gb: float = 10,
    load_seconds: float = 0.5,
    fail_after: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A config entry for an `image:` model (switchd creates `switchd-MODEL`)."""
    entry: dict[str, Any] = {
        "image": image,
        "command": engine_command(model, load_seconds=load_seconds, fail_after=fail_after),
        "volumes": engine_volumes(),
        "request_gpus": False,  # no GPU here: no device requests
        "env": {"PYTHONPATH": str(REPO_ROOT)},  # switchd creates it without a working dir
        "size_gb": size_gb,
        "load_time_seconds": max(1.0, load_seconds),
    }
    entry.update(extra)
    return entry


def create_engine_container(
    client: docker.DockerClient,
    image: str,
    name: str,
    model: str,
    *,
    load_seconds: float = 0.5,
    fail_after: float | None = None,
    extra: Sequence[str] = (),
) -> tuple[Container, str]:
    """A stopped container as compose would make it, publishing the engine's port on
    127.0.0.1; returns it and the URL the engine will answer at."""
    port = free_port()
    command = engine_command(model, load_seconds=load_seconds, fail_after=fail_after, extra=extra)
    container = client.containers.create(
        image,
        command=command,
        name=name,
        volumes=engine_volumes(),
        working_dir=str(REPO_ROOT),
        ports={f"{ENGINE_PORT}/tcp": ("127.0.0.1", port)},
    )
    return container, f"http://127.0.0.1:{port}"


def container_model(
    client: docker.DockerClient,
    image: str,
    name: str,
    model: str,
    *,
    size_gb: float = 10,
    load_seconds: float = 0.5,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """Create `name` (stopped) and return the config entry of a `container:` model;
    `extra`: more arguments for the demo engine."""
    _, url = create_engine_container(
        client, image, name, model, load_seconds=load_seconds, extra=extra
    )
    return {
        "container": name,
        "url": url,
        "size_gb": size_gb,
        "load_time_seconds": max(1.0, load_seconds),
    }


class Containers:
    """Names of containers a test made or made switchd make; all removed at the end."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client
        self.names: list[str] = []

    def track(self, name: str) -> str:
        self.names.append(name)
        return name

    def name(self, prefix: str) -> str:
        return self.track(unique(prefix))

    def model(self, prefix: str) -> str:
        """A unique model name; its switchd-made container is tracked too."""
        model = unique(prefix)
        self.track(f"switchd-{model}")
        return model

    def get(self, name: str) -> Container:
        return self.client.containers.get(name)

    def inspect(self, name: str) -> dict[str, Any]:
        state: dict[str, Any] = self.client.api.inspect_container(name)
        return state

    def running(self, name: str) -> bool:
        return bool(self.inspect(name)["State"]["Running"])

    def remove_all(self) -> None:
        for name in self.names:
            with contextlib.suppress(docker.errors.NotFound):
                self.client.containers.get(name).remove(force=True)


@pytest.fixture
def containers(docker_client: docker.DockerClient) -> Iterator[Containers]:
    made = Containers(docker_client)
    yield made
    made.remove_all()


# ---- waiting ----------------------------------------------------------------------


async def eventually(
    predicate: Callable[[], bool], within: float, what: str, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(interval)
