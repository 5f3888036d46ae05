"""The Runtime protocol: what the switcher needs from whatever runs engines, and the
runtimes by name (`RUNTIMES`, what `runtime:` in the config chooses from).

A runtime reports what happens to its engines (output lines, exits) as a
stream of RuntimeEvents, so the switcher, the one owner of model states, hears
about a crash outside switchd the same way it hears about its own stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from switchd.config import ModelSpec, Settings


class StartFailed(RuntimeError):
    """The engine could not be started at all (bad command, missing container)."""


@dataclass(frozen=True)
class EngineInfo:
    model: str
    instance: str  # pid or container id: tells one run of an engine from the next
    url: str
    started_at: float  # epoch seconds
    pid: int | None = None
    container: str | None = None
    devices: tuple[int, ...] | None = None  # the GPU indexes it runs on; None: unknown/all


@dataclass(frozen=True)
class EngineOutput:
    model: str
    instance: str
    line: str


@dataclass(frozen=True)
class EngineExited:
    model: str
    instance: str
    exit_code: int | None
    reason: str
    last_lines: tuple[str, ...]


RuntimeEvent = EngineOutput | EngineExited


class EventQueue:
    """The RuntimeEvents a runtime hands the switcher, in order, until it ends."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[RuntimeEvent | None] = asyncio.Queue()

    def put(self, event: RuntimeEvent) -> None:
        self._queue.put_nowait(event)

    def end(self) -> None:
        self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[RuntimeEvent]:
        while (event := await self._queue.get()) is not None:
            yield event


@dataclass(frozen=True)
class Discovery:
    """What a runtime found at start-up: engines to adopt, models it cannot run."""

    running: Sequence[EngineInfo] = ()
    unavailable: Mapping[str, str] = field(default_factory=dict)  # model: why


class Runtime(Protocol):
    async def start(self, spec: ModelSpec, devices: tuple[int, ...] | None = None) -> EngineInfo:
        """Start the engine on `devices` (GPU indexes, as NVML numbers them; None: every
        device, or as the model is configured); returns once it runs (not once it is
        healthy). An engine that already runs is returned as it is, wherever it runs.
        A `container:` model ignores `devices`: compose placed it."""
        ...

    async def stop(self, spec: ModelSpec, grace_seconds: float) -> None:
        """Stop the engine and return only once it has really stopped."""
        ...

    async def discover(self) -> Discovery:
        """Engines of the catalog already running (adopted at start-up), and the
        models that cannot run at all (a container that does not exist)."""
        ...

    def events(self) -> AsyncIterator[RuntimeEvent]:
        """Output lines and exits of every engine, in order, until close()."""
        ...

    def last_lines(self, model: str) -> tuple[str, ...]:
        """The engine's latest output lines, for failure messages."""
        ...

    async def engine_pids(self, info: EngineInfo) -> Sequence[int]:
        """The host PIDs of the engine's processes (to find its own memory in NVML's
        per-process figures); empty when unknown."""
        ...

    async def close(self) -> None:
        """Release the runtime; engines it owns are stopped (unless it was told to leave
        them for the next switchd: `keep_engines_on_exit`)."""
        ...


@dataclass(frozen=True)
class RuntimeChoice:
    """A runtime the config can name: how to open it, and what every model needs for it."""

    open: Callable[[Settings], Awaitable[Runtime]]
    runs: Callable[[ModelSpec], bool]  # whether a model has what this runtime needs
    needs: str  # that, in words, for the error naming a model without it
    # Before serving: why the runtime cannot be reached, in one line, or None. Found
    # then, not as a traceback from the lifespan.
    preflight: Callable[[], str | None] = lambda: None


async def _open_docker(settings: Settings) -> Runtime:
    # Imported when chosen: the Docker SDK is loaded only where Docker runs engines.
    from switchd.runtime.docker import DockerRuntime  # noqa: PLC0415

    return await DockerRuntime.open(settings.models, settings.stop_grace_seconds)


def _docker_preflight() -> str | None:
    from switchd.runtime.docker import DockerUnavailable, connect_docker  # noqa: PLC0415

    try:
        connect_docker().close()
    except DockerUnavailable as exc:
        return str(exc)
    return None


async def _open_process(settings: Settings) -> Runtime:
    from switchd.runtime.process import ProcessRuntime  # noqa: PLC0415

    return ProcessRuntime(
        settings.stop_grace_seconds,
        state_dir=settings.state_dir,
        catalog=settings.models,  # its engines are adoptable by the next switchd
        keep_engines_on_exit=settings.keep_engines_on_exit,
    )


RUNTIMES: Mapping[str, RuntimeChoice] = {
    "docker": RuntimeChoice(
        _open_docker,
        lambda spec: bool(spec.container or spec.image),
        "`container` or `image`",
        _docker_preflight,
    ),
    "process": RuntimeChoice(_open_process, lambda spec: bool(spec.cmd), "`cmd`"),
}
