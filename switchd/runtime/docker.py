"""Engines as Docker containers, driven through the Docker API (the `docker` SDK).

Two kinds of model: `container: NAME`, one that exists already (compose made
it) and is started and stopped; and `image: …`, a container switchd creates
itself, labelled `switchd.model=NAME`. Every SDK call runs in a worker thread.
Docker's event stream, followed in a thread of its own, tells switchd at once
about a container stopped, killed or crashed behind its back. Containers
outlive switchd: after a restart, the running ones are adopted, not restarted.

Placement: an `image:` model started on some devices gets a container that
requests exactly those (a device request with their ids); one left from an
earlier start with other devices is removed and created anew. A `container:`
model keeps the devices compose gave it: read back from its device requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container
from docker.types import DeviceRequest

from switchd.config import ModelSpec
from switchd.runtime.base import (
    Discovery,
    EngineExited,
    EngineInfo,
    EngineOutput,
    EventQueue,
    RuntimeEvent,
    StartFailed,
)
from switchd.runtime.process import free_port

log = logging.getLogger(__name__)

LABEL = "switchd.model"
TAIL_LINES = 50
RECONNECT_SECONDS = 1.0
DEFAULT_SOCKET = "unix:///var/run/docker.sock"


class DockerUnavailable(RuntimeError):
    """The Docker daemon cannot be reached; the message names the socket and the fix."""


def container_name(spec: ModelSpec) -> str:
    """The container's name; a model name like `org/name:tag` made fit for Docker."""
    return spec.container or "switchd-" + re.sub(r"[^a-zA-Z0-9_.-]", "-", spec.name)


def started_ns(container: Container) -> int:
    """State.StartedAt (RFC 3339, nanoseconds) as epoch nanoseconds."""
    text: str = container.attrs["State"]["StartedAt"]
    whole, _, rest = text.rstrip("Z").partition(".")
    fraction = rest.split("+")[0].split("-")[0]
    seconds = datetime.fromisoformat(whole + "+00:00").timestamp()
    return int(seconds) * 1_000_000_000 + int((fraction + "000000000")[:9])


def name_taken(name: str) -> str:
    return f"the name {name} is taken by a container switchd did not make"


def device_requests(spec: ModelSpec, devices: tuple[int, ...] | None) -> list[DeviceRequest]:
    """What an `image:` model's container asks Docker for: `devices` when given,
    else the model's `gpus` (indexes, a count, or every device)."""
    options = spec.docker
    if not options.request_gpus:
        return []
    if devices is not None:  # placed by switchd; () means no device at all
        placed = [str(index) for index in devices]
        return [DeviceRequest(device_ids=placed, capabilities=[["gpu"]])] if placed else []
    ids = [str(i) for i in spec.gpus] if spec.gpus is not None else None
    count = None if ids else (options.gpu_count or -1)
    return [DeviceRequest(count=count, device_ids=ids, capabilities=[["gpu"]])]


def _request_key(request: Mapping[str, Any]) -> tuple[Any, ...]:
    """A device request, as given to `create` or as `inspect` shows it, comparable."""
    normal = DeviceRequest(**request)  # fills in what either side left out
    return (
        normal["Driver"],
        normal["Count"],
        tuple(normal["DeviceIDs"]),
        tuple(tuple(caps) for caps in normal["Capabilities"]),
        tuple(sorted((normal["Options"] or {}).items())),
    )


def requests_of(container: Container) -> list[Mapping[str, Any]]:
    """HostConfig.DeviceRequests of a container (null when it has none)."""
    requests: list[Mapping[str, Any]] = container.attrs["HostConfig"].get("DeviceRequests") or []
    return requests


def same_requests(a: list[Mapping[str, Any]], b: list[Mapping[str, Any]]) -> bool:
    return sorted(map(_request_key, a)) == sorted(map(_request_key, b))


def devices_requested(container: Container) -> tuple[int, ...] | None:
    """The device indexes a container asks for; None when it asks for a count, for
    every device, for ids that are not indexes (UUIDs), or for none at all."""
    indexes: set[int] = set()
    for request in requests_of(container):
        ids = request.get("DeviceIDs") or []
        if request.get("Count") or not ids:
            return None  # a count (-1: all): Docker picks, switchd cannot tell which
        try:
            indexes.update(int(device) for device in ids)
        except ValueError:
            return None
    return tuple(sorted(indexes)) or None


def describe_exit(code: int | None, oom: bool) -> str:
    if oom:
        return "killed: out of GPU host memory (OOM killer)"
    if code == 137:
        return "killed (SIGKILL)"
    if code == 143:
        return "terminated (SIGTERM)"
    return f"exited with code {code}"


@dataclass
class _Run:
    """One run of a model's container: which container, since when."""

    spec: ModelSpec
    container_id: str
    started_ns: int
    info: EngineInfo
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    stopping: bool = False
    oom: bool = False


def unavailable_message(exc: Exception, base_url: str) -> str:
    text = str(exc)
    if "Permission denied" in text or isinstance(exc, PermissionError):
        return (
            f"permission denied on the Docker socket {base_url}: run switchd as root or as a "
            "member of the socket's group (`docker`), or in its container with that group"
        )
    if "No such file" in text or "Connection refused" in text:
        return (
            f"no Docker daemon answers at {base_url}: start it (`dockerd`), or, with switchd "
            "in a container, mount the socket: -v /var/run/docker.sock:/var/run/docker.sock"
        )
    return f"cannot use the Docker daemon at {base_url}: {text}"


def connect_docker(
    connect: Callable[[], docker.DockerClient] | None = None,
) -> docker.DockerClient:
    """A client for DOCKER_HOST or the default socket, checked with a ping (blocking)."""
    connect = connect or (lambda: docker.from_env(version="auto", timeout=60))
    try:
        client = connect()
        client.ping()
    except (docker.errors.DockerException, OSError) as exc:
        base_url = os.environ.get("DOCKER_HOST", DEFAULT_SOCKET)
        raise DockerUnavailable(unavailable_message(exc, base_url)) from exc
    return client


class DockerRuntime:
    def __init__(
        self,
        client: docker.DockerClient,
        specs: Mapping[str, ModelSpec],
        stop_grace_seconds: float = 10.0,
    ) -> None:
        self._client = client
        self._specs = specs
        self._by_container = {container_name(spec): spec for spec in specs.values()}
        self._grace = stop_grace_seconds
        self._runs: dict[str, _Run] = {}
        self._tails: dict[str, tuple[str, ...]] = {}
        self._events = EventQueue()
        self._loop = asyncio.get_running_loop()
        self._event_stream: Any = None
        # `die` events that came before their run was registered: container id ->
        # (time in ns, exit code). Bounded by the catalog: the events are filtered to it.
        self._early_deaths: dict[str, tuple[int, int | None]] = {}
        self._reports: set[asyncio.Future[None]] = set()
        self._closed = False

    @classmethod
    async def open(
        cls,
        specs: Mapping[str, ModelSpec],
        stop_grace_seconds: float = 10.0,
        connect: Callable[[], docker.DockerClient] | None = None,
    ) -> DockerRuntime:
        """Connect (DOCKER_HOST or the default socket) and start following events."""
        client = await asyncio.to_thread(connect_docker, connect)
        runtime = cls(client, specs, stop_grace_seconds)
        await runtime._follow_events()
        return runtime

    # ---- the Runtime protocol -------------------------------------------------

    async def start(self, spec: ModelSpec, devices: tuple[int, ...] | None = None) -> EngineInfo:
        # A `container:` model runs where compose put it: `devices` does not apply.
        wanted = devices if spec.image else None
        container = await asyncio.to_thread(self._start_blocking, spec, wanted)
        url = spec.url or self._derive_url(spec, container)
        run = self._run_of(spec, container, url)
        self._runs[spec.name] = run
        self._follow_logs(run)
        death = self._early_deaths.pop(container.id, None)
        if death is not None and death[0] >= run.started_ns:
            # It died before this run was registered (a crash at once): report it now.
            self._on_death(run, death[1])
        return run.info

    def _start_blocking(self, spec: ModelSpec, devices: tuple[int, ...] | None) -> Container:
        name = container_name(spec)
        try:
            container = self._client.containers.get(name)
        except docker.errors.NotFound:
            if spec.container:
                raise StartFailed(
                    f"container {name} does not exist (create it with `docker compose create`)"
                ) from None
            container = self._create(spec, devices)
        else:
            if spec.image and container.labels.get(LABEL) != spec.name:
                raise StartFailed(name_taken(name))
            if spec.image and self._misplaced(spec, container, devices):
                container = self._recreate(spec, container, devices)
        try:
            container.start()
            container.reload()
        except docker.errors.APIError as exc:
            raise StartFailed(f"container {name} did not start: {exc.explanation or exc}") from exc
        return container

    @staticmethod
    def _misplaced(spec: ModelSpec, container: Container, devices: tuple[int, ...] | None) -> bool:
        """A stopped switchd-made container that asks for other devices than wanted now.

        A running one is left as it is (start returns it, wherever it runs)."""
        if container.status not in ("created", "exited", "dead"):
            return False
        wanted: list[Mapping[str, Any]] = list(device_requests(spec, devices))
        return not same_requests(requests_of(container), wanted)

    def _recreate(
        self, spec: ModelSpec, container: Container, devices: tuple[int, ...] | None
    ) -> Container:
        """Remove a stopped container and create it again, on `devices`."""
        log.info(
            "%s asks for other GPUs than %s is placed on now: created anew",
            container.name,
            spec.name,
        )
        try:
            container.remove()  # not forced: a container started meanwhile is kept, and fails
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            raise StartFailed(
                f"cannot remove {container.name} to place it on other GPUs: "
                f"{exc.explanation or exc}"
            ) from exc
        return self._create(spec, devices)

    def _create(self, spec: ModelSpec, devices: tuple[int, ...] | None) -> Container:
        assert spec.image is not None
        options = spec.docker
        ports: dict[str, Any] = dict(options.ports)
        if not spec.url and not options.network and f"{options.port}/tcp" not in ports:
            ports[f"{options.port}/tcp"] = ("127.0.0.1", free_port())
        try:
            return self._client.containers.create(
                spec.image,
                command=list(spec.command) or None,
                name=container_name(spec),
                labels={LABEL: spec.name},
                environment=dict(spec.env),
                volumes=list(options.volumes),
                network=options.network,
                ports=ports,
                shm_size=options.shm_size,
                ipc_mode=options.ipc,
                device_requests=device_requests(spec, devices),
            )
        except docker.errors.ImageNotFound:
            raise StartFailed(
                f"image {spec.image} is not on this host: `docker pull {spec.image}` first"
            ) from None
        except docker.errors.APIError as exc:
            raise StartFailed(f"cannot create {container_name(spec)}: {exc.explanation}") from exc

    def _derive_url(self, spec: ModelSpec, container: Container) -> str:
        """Where the engine answers: its network name, else its published port."""
        if spec.docker.network:
            return f"http://{container.name}:{spec.docker.port}"
        port = f"{spec.docker.port}/tcp"
        # What is published now, else what was asked for (a container that already
        # exited publishes nothing, and its exit is what must be reported).
        published = (
            (container.attrs["NetworkSettings"]["Ports"] or {}).get(port)
            or (container.attrs["HostConfig"].get("PortBindings") or {}).get(port)
            or []
        )
        for binding in published:
            host = binding["HostIp"] or "127.0.0.1"
            host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
            return f"http://{host}:{binding['HostPort']}"
        raise StartFailed(
            f"{container.name} publishes no port {spec.docker.port}: set `url` for {spec.name}"
        )

    async def stop(self, spec: ModelSpec, grace_seconds: float) -> None:
        run = self._runs.get(spec.name)
        if run is not None:
            run.stopping = True
        await asyncio.to_thread(self._stop_blocking, spec, grace_seconds)
        if run is not None:
            self._tails[spec.name] = tuple(run.tail)
            if self._runs.get(spec.name) is run:
                del self._runs[spec.name]

    def _stop_blocking(self, spec: ModelSpec, grace_seconds: float) -> None:
        try:
            container = self._client.containers.get(container_name(spec))
        except docker.errors.NotFound:
            return
        # docker stop: SIGTERM, SIGKILL after the grace; then wait for the exit itself.
        container.stop(timeout=max(1, round(grace_seconds)))
        container.wait(timeout=grace_seconds + 30)
        if spec.docker.remove and spec.image:
            container.remove()

    async def discover(self) -> Discovery:
        return await asyncio.to_thread(self._discover_blocking)

    def _discover_blocking(self) -> Discovery:
        running: list[EngineInfo] = []
        unavailable: dict[str, str] = {}
        for spec in self._specs.values():
            name = container_name(spec)
            try:
                container = self._client.containers.get(name)
            except docker.errors.NotFound:
                if spec.container:
                    unavailable[spec.name] = (
                        f"container {name} does not exist (create it with `docker compose create`)"
                    )
                continue
            if spec.image and container.labels.get(LABEL) != spec.name:
                unavailable[spec.name] = name_taken(name)
                continue
            if container.status != "running":
                continue
            try:
                url = spec.url or self._derive_url(spec, container)
            except StartFailed as exc:
                unavailable[spec.name] = str(exc)
                continue
            run = self._run_of(spec, container, url)
            self._runs[spec.name] = run
            running.append(run.info)
        return Discovery(running, unavailable)

    @staticmethod
    def _run_of(spec: ModelSpec, container: Container, url: str) -> _Run:
        started = started_ns(container)
        # The start time is part of the instance: a container keeps its id across runs.
        info = EngineInfo(
            model=spec.name,
            instance=f"{container.short_id}:{started}",
            url=url,
            started_at=started / 1e9,
            container=container.name,
            devices=devices_requested(container),
        )
        return _Run(spec, container.id, started, info)

    def events(self) -> AsyncIterator[RuntimeEvent]:
        return aiter(self._events)

    def last_lines(self, model: str) -> tuple[str, ...]:
        run = self._runs.get(model)
        return tuple(run.tail) if run is not None else self._tails.get(model, ())

    async def engine_pids(self, info: EngineInfo) -> list[int]:
        """The container's processes as the host sees them (`docker top`)."""
        if info.container is None:
            return []
        try:
            return await asyncio.to_thread(self._pids_blocking, info.container)
        except Exception:  # a container gone or a daemon hiccup: just no per-process figure
            return []

    def _pids_blocking(self, container: str) -> list[int]:
        top = self._client.containers.get(container).top()
        column = top["Titles"].index("PID")
        return [int(row[column]) for row in top["Processes"]]

    async def close(self) -> None:
        """Stop following Docker; the containers go on running (adopted next start)."""
        self._closed = True
        if self._event_stream is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._event_stream.close)
        await asyncio.to_thread(self._client.close)
        self._events.end()

    # ---- threads that follow Docker --------------------------------------------

    def _emit(self, event: RuntimeEvent) -> None:
        """From a follower thread: hand an event to the loop."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: switchd is gone
            self._loop.call_soon_threadsafe(self._events.put, event)

    async def _follow_events(self) -> None:
        self._event_stream = await asyncio.to_thread(self._open_event_stream, int(time.time()))
        threading.Thread(target=self._pump_events, name="docker-events", daemon=True).start()

    def _open_event_stream(self, since: int) -> Any:
        names = list(self._by_container)
        filters = {"type": "container", "container": names}
        return self._client.events(decode=True, since=since, filters=filters)

    def _pump_events(self) -> None:
        """Forward Docker's events to the loop; reconnect if the stream breaks."""
        last_seen = int(time.time())
        while not self._closed:
            try:
                for event in self._event_stream:
                    last_seen = int(event.get("time", last_seen))
                    self._loop.call_soon_threadsafe(self._on_docker_event, event)
            except Exception as exc:  # closed by us, or dockerd went away
                if self._closed:
                    return
                log.warning("Docker's event stream broke (%s); reconnecting", exc)
            while not self._closed:
                time.sleep(RECONNECT_SECONDS)
                try:  # from the last event seen, so nothing in between is missed
                    self._event_stream = self._open_event_stream(last_seen)
                    break
                except Exception as exc:
                    log.warning("Docker's event stream: %s; retrying", exc)

    def _on_docker_event(self, event: dict[str, Any]) -> None:
        """On the loop: a container event, turned into what the switcher needs."""
        action = str(event.get("Action") or event.get("status") or "")
        attributes = event.get("Actor", {}).get("Attributes", {})
        spec = self._by_container.get(str(attributes.get("name", "")))
        if spec is None:
            return
        run = self._runs.get(spec.name)
        code = int(attributes["exitCode"]) if "exitCode" in attributes else None
        if run is None or event.get("id") != run.container_id:
            if action == "die":  # perhaps of a run start() has not registered yet
                self._early_deaths[str(event.get("id"))] = (int(event.get("timeNano", 0)), code)
            return
        if int(event.get("timeNano", 0)) < run.started_ns:
            return  # about an earlier run of this container
        if action == "oom":
            run.oom = True
        elif action == "die":
            self._on_death(run, code)

    def _on_death(self, run: _Run, code: int | None) -> None:
        if not run.stopping and self._runs.get(run.spec.name) is run:
            del self._runs[run.spec.name]
        task = asyncio.ensure_future(self._report_exit(run, code))
        self._reports.add(task)  # held until done: the loop keeps weak references only
        task.add_done_callback(self._reports.discard)

    async def _report_exit(self, run: _Run, code: int | None) -> None:
        lines = tuple(run.tail)
        if not run.stopping:
            # Docker's own record of the last lines: the log follower may lag behind it,
            # and an adopted engine has none.
            with contextlib.suppress(docker.errors.DockerException):
                lines = await asyncio.to_thread(self._log_tail, run.container_id) or lines
        self._tails[run.spec.name] = lines
        reason = "stopped" if run.stopping else describe_exit(code, run.oom)
        self._events.put(EngineExited(run.spec.name, run.info.instance, code, reason, lines))

    def _log_tail(self, container_id: str) -> tuple[str, ...]:
        raw: bytes = self._client.containers.get(container_id).logs(tail=TAIL_LINES)
        return tuple(raw.decode("utf-8", "replace").splitlines())

    def _follow_logs(self, run: _Run) -> None:
        def pump() -> None:
            try:
                container = self._client.containers.get(run.container_id)
                since = run.started_ns // 1_000_000_000
                stream = container.logs(stream=True, follow=True, since=since)
                for line in _lines(stream):
                    run.tail.append(line)
                    self._emit(EngineOutput(run.spec.name, run.info.instance, line))
            except Exception as exc:  # the container went away, or switchd is closing
                log.debug("log stream of %s ended: %s", run.spec.name, exc)

        threading.Thread(target=pump, name=f"logs-{run.spec.name}", daemon=True).start()


def _lines(chunks: Iterator[bytes]) -> Iterator[str]:
    """Docker hands log bytes in arbitrary pieces; lines come out whole."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for raw in complete:
            yield raw.decode("utf-8", "replace").rstrip("\r")
    if pending:
        yield pending.decode("utf-8", "replace")
