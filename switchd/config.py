"""Settings and model specs from a YAML file plus the environment.

Every problem is reported as a ConfigError naming the file, the key and what
is wrong, so an operator fixes a bad file in one go instead of guessing.
"""

from __future__ import annotations

import math
import os
import re
import shlex
from collections import deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import yaml

_E = TypeVar("_E", bound=StrEnum)


class ConfigError(Exception):
    """A configuration file that cannot be used, with where and why."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")


class RuntimeKind(StrEnum):
    DOCKER = "docker"
    PROCESS = "process"


class GpuKind(StrEnum):
    AUTO = "auto"
    NVML = "nvml"
    SIMULATED = "simulated"


class EvictionPolicy(StrEnum):
    LARGEST_FIRST = "largest_first"
    LRU = "lru"
    SMALLEST_SUFFICIENT = "smallest_sufficient"


@dataclass(frozen=True)
class SimulatedGpuSettings:
    total_gb: float = 95.59
    devices: int = 1
    # How long a stopped engine's memory takes to show as free again; real
    # drivers lag, and the verify-freed path should be exercised.
    release_delay_seconds: float = 0.0
    # What a sleeping engine still holds (its CUDA context and buffers), in all: the
    # simulated card's truth, which switchd must measure and learn, never read.
    sleep_residue_gb: float = 1.5


class Tier(StrEnum):
    """How an engine can be put aside without stopping it (`standby:` in a model)."""

    SLEEP1 = "sleep1"  # vLLM sleep level 1: weights kept in host RAM
    SLEEP2 = "sleep2"  # vLLM sleep level 2: weights discarded, reloaded on wake
    RELEASE = "release"  # SGLang's release/resume memory occupation

    @property
    def uses_host_ram(self) -> bool:
        return self is Tier.SLEEP1


@dataclass(frozen=True)
class DockerOptions:
    """How switchd creates a model's container itself (`image:` models)."""

    volumes: tuple[str, ...] = ()  # "host:container[:ro]"
    network: str | None = None
    ports: Mapping[str, tuple[str, int]] = field(default_factory=dict)  # "8000/tcp": (ip, port)
    port: int = 8000  # the engine's port inside the container
    shm_size: str | None = None
    ipc: str | None = None
    request_gpus: bool = True  # ask Docker for the model's GPUs (device requests)
    gpu_count: int | None = None  # `gpus: N`: any N devices
    remove: bool = False  # remove the container on unload instead of keeping it stopped


@dataclass(frozen=True)
class ModelSpec:
    name: str
    size_gb: float
    cmd: tuple[str, ...] = ()
    container: str | None = None
    image: str | None = None
    command: tuple[str, ...] = ()
    url: str | None = None
    load_time_seconds: float = 30.0
    health_path: str = "/health"
    pinned: bool = False
    aliases: tuple[str, ...] = ()
    ttl_seconds: float = 0.0
    gpus: tuple[int, ...] | None = None  # None: every device
    env: Mapping[str, str] = field(default_factory=dict)
    api_key: str | None = None  # sent to the engine instead of the client's key
    docker: DockerOptions = DockerOptions()
    priority: int = 0  # breaks ties between models whose waiters waited as long
    gb_per_device: float | None = None  # need per device, where it is not an even split
    standby: tuple[Tier, ...] = ()  # how it can sleep instead of stopping, cheapest wake first
    weights_gb: float | None = None  # what a level-1 sleep keeps in host RAM (else its footprint)
    wake_check_path: str = "/v1/completions"  # the one tiny request after a wake
    # Stage and queue progress as reasoning chunks in a streamed chat answer that
    # must wait for a load; None: as `load_progress_in_stream` says.
    load_progress_in_stream: bool | None = None


@dataclass(frozen=True)
class Settings:
    models: Mapping[str, ModelSpec]
    source: str = "<defaults>"
    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: tuple[str, ...] = ()  # admin keys: everything
    inference_keys: tuple[str, ...] = ()  # the OpenAI routes, and reading
    read_keys: tuple[str, ...] = ()  # status, models, events, metrics
    cors_allow_origins: tuple[str, ...] = ()  # browser origins allowed to call the API
    runtime: RuntimeKind = RuntimeKind.DOCKER
    gpu: GpuKind = GpuKind.AUTO
    simulated_gpu: SimulatedGpuSettings = SimulatedGpuSettings()
    eviction: EvictionPolicy = EvictionPolicy.LARGEST_FIRST
    auto_switch: bool = True
    request_timeout_seconds: float = 600.0
    drain_timeout_seconds: float = 30.0
    health_timeout_seconds: float = 900.0
    memory_release_timeout_seconds: float = 30.0
    stop_grace_seconds: float = 10.0
    max_body_bytes: int = 32 * 1024 * 1024
    # Bounded resources (switchd/limits.py).
    max_buffered_body_bytes: int = 256 * 1024 * 1024  # all request bodies held at once
    body_read_timeout_seconds: float = 30.0  # the longest pause inside a request body
    header_read_timeout_seconds: float = 10.0  # to send a request's headers
    max_connections: int = 2048  # open at once; past it 503
    max_waiting_requests: int = 512  # proxied requests waiting for a load; then 503
    # The scheduler (switchd/policy.py): a loaded model keeps the GPU at least its
    # residency (this floor or its learned load time, the larger), then at most
    # max_hold_seconds while requests for models that do not fit beside it wait.
    min_residency_seconds: float = 5.0
    max_hold_seconds: float = 60.0
    # After a failed load, requests for that model are refused (503 + Retry-After)
    # for this long, doubling per consecutive failure up to the maximum.
    load_failure_cooldown_seconds: float = 10.0
    max_load_failure_cooldown_seconds: float = 300.0
    # Host RAM that level-1 sleeps may hold in all; None: half of MemAvailable at start.
    standby_host_ram_gb: float | None = None
    # Streamed chat answers that wait for a load get its progress as reasoning chunks.
    load_progress_in_stream: bool = False
    state_dir: Path = Path(".switchd-state")

    def resolve(self, name: str) -> ModelSpec | None:
        """The model called `name` or having it as an alias."""
        spec = self.models.get(name)
        if spec is not None:
            return spec
        for candidate in self.models.values():
            if name in candidate.aliases:
                return candidate
        return None


_TOP_KEYS = {
    "listen",
    "api_keys",
    "inference_keys",
    "read_keys",
    "cors_allow_origins",
    "max_buffered_body_bytes",
    "body_read_timeout_seconds",
    "header_read_timeout_seconds",
    "max_connections",
    "runtime",
    "gpu",
    "simulated_gpu",
    "eviction",
    "auto_switch",
    "request_timeout_seconds",
    "drain_timeout_seconds",
    "health_timeout_seconds",
    "memory_release_timeout_seconds",
    "stop_grace_seconds",
    "max_body_bytes",
    "max_waiting_requests",
    "min_residency_seconds",
    "max_hold_seconds",
    "load_failure_cooldown_seconds",
    "max_load_failure_cooldown_seconds",
    "standby_host_ram_gb",
    "load_progress_in_stream",
    "state_dir",
    "models",
}
_MODEL_KEYS = {
    "cmd",
    "container",
    "image",
    "command",
    "url",
    "size_gb",
    "load_time_seconds",
    "health_path",
    "api_key",
    "pinned",
    "aliases",
    "ttl_seconds",
    "gpus",
    "env",
    "volumes",
    "network",
    "ports",
    "port",
    "shm_size",
    "ipc",
    "request_gpus",
    "remove",
    "priority",
    "gpu_count",
    "gb_per_device",
    "standby",
    "weights_gb",
    "wake_check_path",
    "load_progress_in_stream",
}
_SIMULATED_KEYS = {"total_gb", "devices", "release_delay_seconds", "sleep_residue_gb"}


class _Reader:
    """Typed access to one mapping of the file, errors naming the full key."""

    def __init__(self, source: str, prefix: str, data: Mapping[str, Any], known: set[str]):
        self.source = source
        self.prefix = prefix
        self.data = data
        for key in data:
            if key not in known:
                allowed = ", ".join(sorted(known))
                raise self.error(str(key), f"unknown key (known keys: {allowed})")

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), problem)

    def number(self, name: str, default: float | None, *, minimum: float = 0.0) -> float:
        value = self.data.get(name, default)
        if value is None:
            raise self.error(name, "is required (a number)")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(name, f"must be a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .nan, .inf and -.inf
            raise self.error(name, f"must be a finite number, got {value!r}")
        if value < minimum:
            raise self.error(name, f"must be >= {minimum:g}, got {value!r}")
        return float(value)

    def whole(self, name: str, default: int, *, minimum: int = 0) -> int:
        value = self.number(name, default, minimum=minimum)
        if value != int(value):
            raise self.error(name, f"must be a whole number, got {value!r}")
        return int(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.data.get(name, default)
        if not isinstance(value, bool):
            raise self.error(name, f"must be true or false, got {value!r}")
        return value

    def text(self, name: str, default: str | None = None) -> str | None:
        value = self.data.get(name, default)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise self.error(name, f"must be a non-empty string, got {value!r}")
        return value

    def words(self, name: str) -> tuple[str, ...]:
        """A command line: a string split like a shell would, or a list."""
        value = self.data.get(name)
        if value is None:
            return ()
        if isinstance(value, str):
            try:
                parts = shlex.split(value)
            except ValueError as exc:
                raise self.error(name, f"cannot be split into words: {exc}") from None
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            parts = list(value)
        else:
            raise self.error(name, "must be a string or a list of strings")
        if not parts:
            raise self.error(name, "must not be empty")
        return tuple(parts)

    def choice(self, name: str, enum: type[_E], default: _E) -> _E:
        value = self.data.get(name, default.value)
        try:
            return enum(value)
        except ValueError:
            allowed = " | ".join(member.value for member in enum)
            raise self.error(name, f"must be one of {allowed}, got {value!r}") from None


def parse_listen(source: str, value: object) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:8080`) into its parts."""
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(source, "listen", f"must be HOST:PORT, got {value!r}")
    host, _, port_text = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(source, "listen", f"must be HOST:PORT with a port 1-65535, got {value!r}")
    return host, int(port_text)


def _parse_gpus(reader: _Reader) -> tuple[tuple[int, ...] | None, int | None]:
    """`all`, a count N (any N devices), or device indexes: (indexes, count)."""
    value = reader.data.get("gpus")
    if value is None or value == "all":
        return None, None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return None, value
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        raise reader.error(
            "gpus", f"must be all, a count, or device indexes like [0, 1], got {value!r}"
        )
    return tuple(value), None


def _parse_ports(reader: _Reader) -> dict[str, tuple[str, int]]:
    """Compose-style "[IP:]HOST:CONTAINER" strings into the Docker SDK's mapping."""
    value = reader.data.get("ports", [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise reader.error("ports", 'must be a list like ["127.0.0.1:8001:8000"]')
    ports: dict[str, tuple[str, int]] = {}
    for entry in value:
        parts = entry.split(":")
        if len(parts) == 2:
            parts.insert(0, "0.0.0.0")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise reader.error("ports", f"{entry!r} is not [IP:]HOST_PORT:CONTAINER_PORT")
        ports[f"{parts[2]}/tcp"] = (parts[0], int(parts[1]))
    return ports


def _parse_docker(reader: _Reader, gpu_count: int | None) -> DockerOptions:
    volumes = reader.data.get("volumes", [])
    if not isinstance(volumes, list) or not all(isinstance(v, str) and ":" in v for v in volumes):
        raise reader.error("volumes", 'must be a list like ["/srv/models:/models:ro"]')
    port = reader.number("port", 8000, minimum=1)
    if port != int(port) or port > 65535:
        raise reader.error("port", f"must be a port number, got {port!r}")
    return DockerOptions(
        volumes=tuple(volumes),
        network=reader.text("network"),
        ports=_parse_ports(reader),
        port=int(port),
        shm_size=reader.text("shm_size"),
        ipc=reader.text("ipc"),
        request_gpus=reader.boolean("request_gpus", True),
        gpu_count=gpu_count,
        remove=reader.boolean("remove", False),
    )


def _parse_standby(reader: _Reader) -> tuple[Tier, ...]:
    """`standby: [sleep1, sleep2]` (vLLM), `[release]` (SGLang) or nothing (stop only)."""
    value = reader.data.get("standby", [])
    allowed = " | ".join(tier.value for tier in Tier)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise reader.error("standby", f"must be a list of tiers ({allowed}), got {value!r}")
    tiers: list[Tier] = []
    for item in value:
        try:
            tier = Tier(item)
        except ValueError:
            raise reader.error("standby", f"unknown tier {item!r} (known: {allowed})") from None
        if tier in tiers:
            raise reader.error("standby", f"lists {item!r} twice")
        tiers.append(tier)
    if Tier.RELEASE in tiers and len(tiers) > 1:
        raise reader.error(
            "standby", "`release` is SGLang's, `sleep1`/`sleep2` vLLM's: one engine has one kind"
        )
    return tuple(sorted(tiers, key=list(Tier).index))


def _parse_model(source: str, name: str, data: object) -> ModelSpec:
    prefix = f"models.{name}."
    if not isinstance(data, dict):
        raise ConfigError(source, f"models.{name}", "must be a mapping of model settings")
    reader = _Reader(source, prefix, data, _MODEL_KEYS)
    cmd = reader.words("cmd")
    container = reader.text("container")
    image = reader.text("image")
    if not cmd and not container and not image:
        raise ConfigError(
            source,
            f"models.{name}",
            "needs `cmd` (process runtime) or `container`/`image` (docker)",
        )
    aliases = reader.data.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise reader.error("aliases", "must be a list of names")
    env = reader.data.get("env", {})
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str | int | float) for k, v in env.items()
    ):
        raise reader.error("env", "must map names to strings or numbers")
    health_path = reader.text("health_path", "/health") or "/health"
    if not health_path.startswith("/"):
        raise reader.error("health_path", f"must start with '/', got {health_path!r}")
    url = reader.text("url")
    if url is not None and not url.startswith(("http://", "https://")):
        raise reader.error("url", f"must start with http:// or https://, got {url!r}")
    gpus, gpu_count = _parse_gpus(reader)
    if "gpu_count" in reader.data:
        if "gpus" in reader.data:
            raise reader.error("gpu_count", "give `gpus` (devices or a count) or `gpu_count`")
        gpu_count = int(reader.whole("gpu_count", 1, minimum=1))
    wake_check_path = reader.text("wake_check_path", "/v1/completions") or "/v1/completions"
    if not wake_check_path.startswith("/"):
        raise reader.error("wake_check_path", f"must start with '/', got {wake_check_path!r}")
    if container and image:
        raise ConfigError(
            source,
            f"models.{name}",
            "has both `container` (one compose made) and `image` (one switchd makes): keep one",
        )
    return ModelSpec(
        name=name,
        size_gb=reader.number("size_gb", None, minimum=0.0),
        cmd=cmd,
        container=container,
        image=image,
        command=reader.words("command"),
        url=url.rstrip("/") if url else None,
        load_time_seconds=reader.number("load_time_seconds", 30.0),
        health_path=health_path,
        pinned=reader.boolean("pinned", False),
        aliases=tuple(aliases),
        ttl_seconds=reader.number("ttl_seconds", 0.0),
        gpus=gpus,
        api_key=reader.text("api_key"),
        docker=_parse_docker(reader, gpu_count),
        priority=reader.whole("priority", 0, minimum=-1000),
        gb_per_device=reader.number("gb_per_device", None, minimum=0.01)
        if "gb_per_device" in reader.data
        else None,
        standby=_parse_standby(reader),
        weights_gb=reader.number("weights_gb", None, minimum=0.01)
        if reader.data.get("weights_gb") is not None
        else None,
        wake_check_path=wake_check_path,
        load_progress_in_stream=reader.boolean("load_progress_in_stream", False)
        if reader.data.get("load_progress_in_stream") is not None
        else None,
        # YAML's `true` would become "True"; engines expect the spelling they were given.
        env={k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()},
    )


# A model's name reaches Docker (container names, labels) and engines' command lines
# (${MODEL}): plain characters only, though a HuggingFace-style `org/name` must work.
MAX_MODEL_NAME = 128
_MODEL_NAME = re.compile(r"[A-Za-z0-9._:/-]+")


def _model_name(source: str, name: object) -> str:
    """`name` as a model's name, or the ConfigError saying why it cannot be one."""
    if not isinstance(name, str) or not name:
        # YAML makes `~:` None, `123:` an int and `true:` a bool: all typos here.
        raise ConfigError(source, "models", f"model names must be non-empty strings, got {name!r}")
    problem = None
    if not _MODEL_NAME.fullmatch(name):
        problem = "may only use ASCII letters, digits and . _ - : /"
    elif name.startswith(("-", "/")):
        problem = "must not start with '-' or '/'"
    elif ".." in name:
        problem = "must not contain '..'"
    elif len(name) > MAX_MODEL_NAME:
        problem = f"is {len(name)} characters long, at most {MAX_MODEL_NAME} are allowed"
    if problem is not None:
        raise ConfigError(source, "models", f"model name {name!r} {problem}")
    return name


def _device_list(count: int) -> str:
    """`1 device (0)`, `2 devices (0, 1)`, `8 devices (0-7)`."""
    if count <= 0:
        return "no devices"
    indexes = ", ".join(str(i) for i in range(count)) if count <= 2 else f"0-{count - 1}"
    return f"{count} device{'s' if count > 1 else ''} ({indexes})"


def check_devices(
    settings: Settings,
    device_count: int,
    source_name: str,
    device_total_gb: float | None = None,
) -> None:
    """Refuse models asking for GPUs that `source_name` (NVML, the simulated GPU) lacks.

    `gpus: [5]` names device 5, `gpus: 3` asks for any 3: either is a typo on a host
    with fewer devices, found now rather than at the model's first load. With
    `device_total_gb` (the smallest card), a model whose share per device (its size
    split over its devices) is larger than one card is refused too.
    """
    for spec in settings.models.values():
        key = f"models.{spec.name}.gpus"
        count = len(spec.gpus) if spec.gpus else (spec.docker.gpu_count or device_count)
        if device_total_gb is not None and count:
            if spec.gb_per_device is not None and spec.gb_per_device > device_total_gb:
                raise ConfigError(
                    settings.source,
                    f"models.{spec.name}.gb_per_device",
                    f"{spec.gb_per_device:g} GB is more than one {device_total_gb:.2f} GB card "
                    f"of {source_name} holds",
                )
            if spec.size_gb / count > device_total_gb:
                raise ConfigError(
                    settings.source,
                    f"models.{spec.name}.size_gb",
                    f"{spec.size_gb:g} GB over {count} device(s) is {spec.size_gb / count:.2f} "
                    f"GB on each, more than one {device_total_gb:.2f} GB card of {source_name} "
                    "holds",
                )
        for index in spec.gpus or ():
            if index >= device_count:
                has = f"{source_name} has {_device_list(device_count)}"
                raise ConfigError(settings.source, key, f"device {index} does not exist: {has}")
        asked = spec.docker.gpu_count
        if asked is not None and asked > device_count:
            raise ConfigError(
                settings.source,
                key,
                f"asks for {asked} devices: {source_name} has {device_count}",
            )


def _check_names(source: str, models: Mapping[str, ModelSpec]) -> None:
    reserved = "'all' is reserved (`unload all`)"
    if "all" in models:
        raise ConfigError(source, "models.all", reserved)
    owner: dict[str, str] = {name: name for name in models}
    for spec in models.values():
        for alias in spec.aliases:
            if alias == "all":
                raise ConfigError(source, f"models.{spec.name}.aliases", reserved)
            if alias in owner:
                other = owner[alias]
                what = "a model name" if other == alias else f"an alias of {other!r}"
                raise ConfigError(
                    source, f"models.{spec.name}.aliases", f"{alias!r} is already {what}"
                )
            owner[alias] = spec.name


def _keys(top: _Reader, name: str, environ: Mapping[str, str], variable: str) -> tuple[str, ...]:
    """Bearer keys from the file and from `variable` (comma-separated), stripped."""
    keys = top.data.get(name, []) or []
    if not isinstance(keys, list) or not all(isinstance(k, str) and k.strip() for k in keys):
        raise top.error(name, "must be a list of non-empty strings")
    from_env = [k for k in environ.get(variable, "").split(",") if k.strip()]
    return tuple(dict.fromkeys(k.strip() for k in [*keys, *from_env]))  # as a header's token


def parse_settings(data: object, source: str, environ: Mapping[str, str]) -> Settings:
    """Settings from the decoded YAML document; `environ` adds SWITCHD_API_KEYS."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, "", "must be a YAML mapping at the top level")
    top = _Reader(source, "", data, _TOP_KEYS)
    host, port = parse_listen(source, data.get("listen", "127.0.0.1:8080"))

    keys, inference_keys, read_keys = (
        _keys(top, name, environ, variable)
        for name, variable in (
            ("api_keys", "SWITCHD_API_KEYS"),
            ("inference_keys", "SWITCHD_INFERENCE_KEYS"),
            ("read_keys", "SWITCHD_READ_KEYS"),
        )
    )
    origins = data.get("cors_allow_origins", []) or []
    if not isinstance(origins, list) or not all(
        isinstance(o, str) and (o == "*" or o.startswith(("http://", "https://"))) for o in origins
    ):
        raise top.error("cors_allow_origins", 'must be a list like ["https://ui.example.com"]')

    simulated = data.get("simulated_gpu", {}) or {}
    if not isinstance(simulated, dict):
        raise top.error("simulated_gpu", "must be a mapping")
    sim = _Reader(source, "simulated_gpu.", simulated, _SIMULATED_KEYS)
    devices = sim.whole("devices", 1, minimum=1)

    models_data = data.get("models")
    if not isinstance(models_data, dict) or not models_data:
        raise top.error("models", "must map at least one model name to its settings")
    models = {}
    for raw_name, model_data in models_data.items():
        name = _model_name(source, raw_name)
        models[name] = _parse_model(source, name, model_data)
    _check_names(source, models)

    state_dir = top.text("state_dir", "~/.local/state/switchd") or "~/.local/state/switchd"
    settings = Settings(
        models=models,
        source=source,
        host=host,
        port=port,
        api_keys=keys,
        inference_keys=inference_keys,
        read_keys=read_keys,
        cors_allow_origins=tuple(origins),
        runtime=top.choice("runtime", RuntimeKind, RuntimeKind.DOCKER),
        gpu=top.choice("gpu", GpuKind, GpuKind.AUTO),
        simulated_gpu=SimulatedGpuSettings(
            total_gb=sim.number("total_gb", 95.59, minimum=0.01),
            devices=devices,
            release_delay_seconds=sim.number("release_delay_seconds", 0.0),
            sleep_residue_gb=sim.number("sleep_residue_gb", 1.5),
        ),
        eviction=top.choice("eviction", EvictionPolicy, EvictionPolicy.LARGEST_FIRST),
        auto_switch=top.boolean("auto_switch", True),
        request_timeout_seconds=top.number("request_timeout_seconds", 600.0),
        drain_timeout_seconds=top.number("drain_timeout_seconds", 30.0),
        health_timeout_seconds=top.number("health_timeout_seconds", 900.0, minimum=0.1),
        memory_release_timeout_seconds=top.number("memory_release_timeout_seconds", 30.0),
        stop_grace_seconds=top.number("stop_grace_seconds", 10.0),
        max_body_bytes=top.whole("max_body_bytes", 32 * 1024 * 1024, minimum=1),
        max_buffered_body_bytes=top.whole("max_buffered_body_bytes", 256 * 1024 * 1024, minimum=1),
        body_read_timeout_seconds=top.number("body_read_timeout_seconds", 30.0, minimum=0.1),
        header_read_timeout_seconds=top.number("header_read_timeout_seconds", 10.0, minimum=0.1),
        max_connections=top.whole("max_connections", 2048, minimum=1),
        max_waiting_requests=top.whole("max_waiting_requests", 512),
        min_residency_seconds=top.number("min_residency_seconds", 5.0),
        max_hold_seconds=top.number("max_hold_seconds", 60.0),
        load_failure_cooldown_seconds=top.number("load_failure_cooldown_seconds", 10.0),
        max_load_failure_cooldown_seconds=top.number("max_load_failure_cooldown_seconds", 300.0),
        standby_host_ram_gb=top.number("standby_host_ram_gb", None)
        if data.get("standby_host_ram_gb") is not None
        else None,
        load_progress_in_stream=top.boolean("load_progress_in_stream", False),
        state_dir=Path(os.path.expanduser(state_dir)),
    )
    if settings.gpu is GpuKind.SIMULATED:  # for nvml and auto: once the probe is open (app.py)
        check_devices(settings, devices, "the simulated GPU", settings.simulated_gpu.total_gb)
    return settings


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _DuplicateKey(Exception):
    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader (same tags, same safety) refusing a key given twice in one mapping.

    Plain YAML loading keeps the last of two `gpt-oss-20b:` entries and drops the
    first without a word. A key from a merge (`<<: *base`) may still be overridden.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._explicit_keys: dict[int, tuple[str, list[yaml.Node]]] = {}

    def construct_document(self, node: yaml.Node) -> Any:
        # Before any construction: a merge rewrites the node lists it flattens.
        self._explicit_keys = _explicit_keys(node)
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        path, key_nodes = self._explicit_keys.get(id(node), ("", []))
        first_line: dict[Hashable, int] = {}
        for key_node in key_nodes:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                earlier = first_line.get(key)
            except TypeError:  # unhashable: the base constructor refuses it below
                continue
            if earlier is None:
                first_line[key] = line
            else:
                name = _key_path(path, key_node)
                lines = f"line {line}" if earlier == line else f"lines {earlier} and {line}"
                raise _DuplicateKey(name, f"is defined twice ({lines})")
        return super().construct_mapping(node, deep=deep)


def _key_path(path: str, key_node: yaml.Node) -> str:
    name = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
    return f"{path}.{name}" if path else name


def _explicit_keys(root: yaml.Node) -> dict[int, tuple[str, list[yaml.Node]]]:
    """Each mapping node's path (`models.m`) and the key nodes written in it."""
    found: dict[int, tuple[str, list[yaml.Node]]] = {}
    seen: set[int] = set()
    queue: deque[tuple[yaml.Node, str]] = deque([(root, "")])
    while queue:
        node, path = queue.popleft()
        if id(node) in seen:  # an alias: the node was met already
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            pairs = [(k, v) for k, v in node.value if k.tag != _MERGE_TAG]
            found[id(node)] = (path, [k for k, _ in pairs])
            queue.extend((value_node, _key_path(path, key_node)) for key_node, value_node in pairs)
        elif isinstance(node, yaml.SequenceNode):
            queue.extend((item, f"{path}[{i}]") for i, item in enumerate(node.value))
    return found


def load_settings(path: str | Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read and check `path`; raise ConfigError with file, key and problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, "", f"cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(source, "", "is not UTF-8 text") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no Python tags
    except _DuplicateKey as exc:
        raise ConfigError(source, exc.key, exc.problem) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(source, "", f"is not valid YAML{where}") from None
    return parse_settings(data, source, os.environ if environ is None else environ)
