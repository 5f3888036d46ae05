"""Settings and model specs from a YAML file plus the environment.

Every key of the file is a field of the dataclasses below, defined once: its
default is the field's default, and its metadata (`key(...)`) says how the file
writes it, its bounds and what it means. The parser, the known keys an error
lists and the JSON Schema (switchd/schema.py) are all read from there.

Every problem is reported as a ConfigError naming the file, the key and what
is wrong, so an operator fixes a bad file in one go instead of guessing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shlex
import types
import typing
from collections import deque
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, TypeVar

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


@dataclass(frozen=True)
class Key:
    """How the config file writes one field (the field's metadata, from `key()`)."""

    doc: str  # what it means: the JSON Schema's description
    name: str = ""  # its key in the file, where that is not the field's name
    minimum: float = 0.0  # for numbers and whole numbers
    maximum: float | None = None  # for numbers: a share, say
    custom: bool = False  # read by code of its own below; `schema` then says what it takes
    schema: Mapping[str, Any] = field(default_factory=dict)  # added to the generated schema
    flat: bool = False  # a nested dataclass whose keys sit in the parent's mapping
    env: str = ""  # an environment variable that adds to it


_KEY = "switchd.config"


def key(doc: str, **options: Any) -> dict[str, Key]:
    """A field's metadata: `field(default=..., metadata=key("what it means"))`."""
    return {_KEY: Key(doc, **options)}


def keyed_fields(cls: type) -> Iterator[tuple[dataclasses.Field[Any], Key, Any]]:
    """Each field of dataclass `cls` that the file sets: (field, its Key, its type)."""
    hints = typing.get_type_hints(cls)
    for each in dataclasses.fields(cls):
        meta = each.metadata.get(_KEY)
        if meta is not None:
            yield each, meta, hints[each.name]


def known_keys(cls: type) -> set[str]:
    """The keys a mapping read as `cls` may have, its flat parts' included."""
    known: set[str] = set()
    for each, meta, hint in keyed_fields(cls):
        known |= known_keys(hint) if meta.flat else {meta.name or each.name}
    return known


def is_required(each: dataclasses.Field[Any]) -> bool:
    return each.default is MISSING and each.default_factory is MISSING


class RuntimeKind(StrEnum):
    DOCKER = "docker"
    PROCESS = "process"


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


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
    total_gb: float = field(
        default=95.59, metadata=key("memory of each simulated card, GiB", minimum=0.01)
    )
    devices: int = field(default=1, metadata=key("how many simulated cards", minimum=1))
    # Real drivers lag, and the verify-freed path should be exercised.
    release_delay_seconds: float = field(
        default=0.0,
        metadata=key("how long a stopped engine's memory takes to show as free again"),
    )
    # The simulated card's truth, which switchd must measure and learn, never read.
    sleep_residue_gb: float = field(
        default=1.5,
        metadata=key("what a sleeping engine still holds in all (its CUDA context, buffers), GiB"),
    )


class Tier(StrEnum):
    """How an engine can be put aside without stopping it (`standby:` in a model)."""

    SLEEP1 = "sleep1"  # vLLM sleep level 1: weights kept in host RAM
    SLEEP2 = "sleep2"  # vLLM sleep level 2: weights discarded, reloaded on wake
    RELEASE = "release"  # SGLang's release/resume memory occupation

    @property
    def uses_host_ram(self) -> bool:
        return self is Tier.SLEEP1


class Capability(StrEnum):
    """What a model can be asked for, as clients read it from `/v1/models`."""

    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDINGS = "embeddings"
    VISION = "vision"
    TOOLS = "tools"


# JSON Schema pieces shared by several keys.
_NON_EMPTY = {"type": "string", "pattern": r"\S"}
_WORDS = {
    "anyOf": [_NON_EMPTY, {"type": "array", "items": {"type": "string"}, "minItems": 1}],
}
_URL_PATH = {"type": ["string", "null"], "pattern": r"^/"}
_BEARER_KEYS = {"type": ["array", "null"], "items": {"type": "string", "pattern": r"\S"}}


@dataclass(frozen=True)
class DockerOptions:
    """How switchd creates a model's container itself (`image:` models).

    Its keys sit directly in the model's mapping (`flat`).
    """

    volumes: tuple[str, ...] = field(
        default=(),
        metadata=key(
            'host paths mounted in the container, "host:container[:ro]"',
            custom=True,
            schema={"type": "array", "items": {"type": "string", "pattern": ":"}},
        ),
    )
    network: str | None = field(default=None, metadata=key("the Docker network to join"))
    ports: Mapping[str, tuple[str, int]] = field(  # "8000/tcp": (ip, port)
        default_factory=dict,
        metadata=key(
            'published ports, compose-style "[IP:]HOST_PORT:CONTAINER_PORT"',
            custom=True,
            schema={
                "type": "array",
                "items": {"type": "string", "pattern": r"^([^:]*:)?[0-9]+:[0-9]+$"},
            },
        ),
    )
    port: int = field(
        default=8000,
        metadata=key(
            "the engine's port inside the container",
            custom=True,
            schema={"type": "integer", "minimum": 1, "maximum": 65535},
        ),
    )
    shm_size: str | None = field(default=None, metadata=key("the container's /dev/shm size"))
    ipc: str | None = field(default=None, metadata=key("the container's IPC mode"))
    request_gpus: bool = field(
        default=True, metadata=key("ask Docker for the model's GPUs (device requests)")
    )
    gpu_count: int | None = field(  # also `gpus: N`
        default=None,
        metadata=key(
            "any N devices (instead of `gpus`)",
            custom=True,
            schema={"type": "integer", "minimum": 1},
        ),
    )
    remove: bool = field(
        default=False, metadata=key("remove the container on unload instead of keeping it stopped")
    )


# A model's name reaches Docker (container names, labels) and engines' command lines
# (${MODEL}): plain characters only, though a HuggingFace-style `org/name` must work.
MAX_MODEL_NAME = 128
_MODEL_NAME = re.compile(r"[A-Za-z0-9._:/-]+")


@dataclass(frozen=True)
class ModelSpec:
    # Rules across keys, for the JSON Schema (the parser says them in its own words).
    FILE_RULES: ClassVar[Mapping[str, Any]] = {
        "anyOf": [{"required": ["cmd"]}, {"required": ["container"]}, {"required": ["image"]}],
        "allOf": [
            {"not": {"required": ["container", "image"]}},
            {"not": {"required": ["gpus", "gpu_count"]}},
        ],
    }

    name: str
    size_gb: float = field(
        metadata=key("GPU memory it needs until switchd has measured it, GiB (required)")
    )
    cmd: tuple[str, ...] = field(
        default=(),
        metadata=key(
            "process runtime: the engine's command line (a string split like a shell, or a list)",
            custom=True,
            schema=_WORDS,
        ),
    )
    container: str | None = field(
        default=None, metadata=key("docker: the container to start and stop (made by compose)")
    )
    image: str | None = field(
        default=None, metadata=key("docker: the image of a container switchd creates itself")
    )
    command: tuple[str, ...] = field(
        default=(),
        metadata=key(
            "docker: the command of a container switchd creates", custom=True, schema=_WORDS
        ),
    )
    url: str | None = field(
        default=None,
        metadata=key(
            "the engine's base URL; without it switchd derives one",
            custom=True,
            schema={"type": ["string", "null"], "pattern": "^https?://"},
        ),
    )
    load_time_seconds: float = field(
        default=30.0, metadata=key("load time estimate until switchd has measured it")
    )
    health_path: str = field(
        default="/health",
        metadata=key("the engine's health check path", custom=True, schema=_URL_PATH),
    )
    pinned: bool = field(default=False, metadata=key("never unloaded to make room"))
    aliases: tuple[str, ...] = field(
        default=(),
        metadata=key(
            "other names clients may use for it",
            custom=True,
            schema={"type": "array", "items": {"type": "string", "minLength": 1}},
        ),
    )
    ttl_seconds: float = field(default=0.0, metadata=key("unload after this long idle; 0: never"))
    gpus: tuple[int, ...] | None = field(  # None: every device
        default=None,
        metadata=key(
            "the devices it occupies: all, a count N (any N), or device indexes",
            custom=True,
            schema={
                "anyOf": [
                    {"const": "all"},
                    {"type": "null"},
                    {"type": "integer", "minimum": 1},
                    {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                ],
                "default": "all",
            },
        ),
    )
    env: Mapping[str, str] = field(
        default_factory=dict,
        metadata=key(
            "environment variables of the engine",
            custom=True,
            schema={
                "type": "object",
                "additionalProperties": {"type": ["string", "number", "boolean"]},
            },
        ),
    )
    api_key: str | None = field(
        default=None, metadata=key("sent to the engine instead of the client's key")
    )
    docker: DockerOptions = field(
        default=DockerOptions(),
        metadata=key("docker: how switchd creates its container", flat=True),
    )
    priority: int = field(
        default=0,
        metadata=key("breaks ties between models whose waiters waited as long", minimum=-1000),
    )
    gb_per_device: float | None = field(
        default=None,
        metadata=key("its need per device, where it is not an even split, GiB", minimum=0.01),
    )
    standby: tuple[Tier, ...] = field(  # cheapest wake first
        default=(),
        metadata=key(
            "how it can sleep instead of stopping: [sleep1, sleep2] (vLLM) or [release] (SGLang)",
            custom=True,
            schema={
                "type": "array",
                "items": {"enum": [tier.value for tier in Tier]},
                "uniqueItems": True,
                "if": {"contains": {"const": Tier.RELEASE.value}},
                "then": {"maxItems": 1},
            },
        ),
    )
    weights_gb: float | None = field(
        default=None,
        metadata=key(
            "what a level-1 sleep keeps in host RAM (else its footprint), GiB", minimum=0.01
        ),
    )
    wake_check_path: str = field(
        default="/v1/completions",
        metadata=key("the one tiny request after a wake", custom=True, schema=_URL_PATH),
    )
    load_progress_in_stream: bool | None = field(
        default=None,
        metadata=key(
            "stage and queue progress as reasoning chunks in a streamed chat answer that must "
            "wait for its load; null: as the top-level `load_progress_in_stream` says"
        ),
    )
    context_length: int | None = field(
        default=None,
        metadata=key(
            "its context length in tokens, listed by /v1/models while unloaded too; "
            "null: learned from the engine once it ran (vLLM's max_model_len, llama.cpp's n_ctx)",
            minimum=1,
        ),
    )
    capabilities: tuple[Capability, ...] | None = field(
        default=None,
        metadata=key(
            "what it can be asked for, listed by /v1/models; null: chat and completion",
            custom=True,
            schema={
                "type": ["array", "null"],
                "items": {"enum": [c.value for c in Capability]},
                "uniqueItems": True,
            },
        ),
    )


DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


@dataclass(frozen=True)
class Settings:
    models: Mapping[str, ModelSpec] = field(
        metadata=key(
            "the catalog: each model's name and its settings (required)",
            custom=True,
            schema={
                "minProperties": 1,
                "propertyNames": {
                    "pattern": rf"^(?![-/])(?!.*\.\.)[A-Za-z0-9._:/-]{{1,{MAX_MODEL_NAME}}}$",
                    "not": {"const": "all"},
                },
            },
        )
    )
    source: str = "<defaults>"
    host: str = field(
        default=DEFAULT_HOST,
        metadata=key(
            "HOST:PORT to serve on (IPv6 as [::1]:8080)",
            name="listen",
            custom=True,
            schema={
                "type": "string",
                "pattern": ".:[0-9]+$",
                "default": f"{DEFAULT_HOST}:{DEFAULT_PORT}",
            },
        ),
    )
    port: int = field(
        default=DEFAULT_PORT, metadata=key("the port of `listen`", name="listen", custom=True)
    )
    api_keys: tuple[str, ...] = field(
        default=(),
        metadata=key(
            "admin keys: everything", custom=True, env="SWITCHD_API_KEYS", schema=_BEARER_KEYS
        ),
    )
    inference_keys: tuple[str, ...] = field(
        default=(),
        metadata=key(
            "keys for the OpenAI routes, and reading",
            custom=True,
            env="SWITCHD_INFERENCE_KEYS",
            schema=_BEARER_KEYS,
        ),
    )
    read_keys: tuple[str, ...] = field(
        default=(),
        metadata=key(
            "keys for status, models, events, metrics",
            custom=True,
            env="SWITCHD_READ_KEYS",
            schema=_BEARER_KEYS,
        ),
    )
    cors_allow_origins: tuple[str, ...] = field(
        default=(),
        metadata=key(
            "browser origins allowed to call the API",
            custom=True,
            schema={
                "type": ["array", "null"],
                "items": {"type": "string", "pattern": r"^(\*|https?://.*)$"},
            },
        ),
    )
    runtime: RuntimeKind = field(
        default=RuntimeKind.DOCKER, metadata=key("how engines run: containers or local processes")
    )
    gpu: GpuKind = field(
        default=GpuKind.AUTO, metadata=key("auto: NVML if present, else simulated")
    )
    simulated_gpu: SimulatedGpuSettings = field(
        default=SimulatedGpuSettings(), metadata=key("the GPU switchd simulates (`gpu: simulated`)")
    )
    eviction: EvictionPolicy = field(
        default=EvictionPolicy.LARGEST_FIRST, metadata=key("which models to unload to make room")
    )
    auto_switch: bool = field(default=True, metadata=key("the proxy loads a model on demand"))
    request_timeout_seconds: float = field(
        default=600.0, metadata=key("how long a proxied request may wait for its model")
    )
    drain_timeout_seconds: float = field(
        default=30.0, metadata=key("how long requests in flight may finish before an unload")
    )
    health_timeout_seconds: float = field(
        default=900.0,
        metadata=key("how long a load may take to answer its health check", minimum=0.1),
    )
    memory_release_timeout_seconds: float = field(
        default=30.0, metadata=key("how long an unloaded engine's GPU memory may take to come back")
    )
    stop_grace_seconds: float = field(
        default=10.0, metadata=key("between SIGTERM and SIGKILL when stopping an engine")
    )
    engine_call_timeout_seconds: float = field(
        default=30.0,
        metadata=key(
            "the longest an engine's sleep or is_sleeping call may take (a hung sleep stops it)",
            minimum=0.1,
        ),
    )
    max_body_bytes: int = field(
        default=32 * 1024 * 1024, metadata=key("the largest request body", minimum=1)
    )
    # Bounded resources (switchd/limits.py).
    max_buffered_body_bytes: int = field(
        default=256 * 1024 * 1024, metadata=key("all request bodies held at once", minimum=1)
    )
    body_read_timeout_seconds: float = field(
        default=30.0, metadata=key("the longest pause inside a request body", minimum=0.1)
    )
    header_read_timeout_seconds: float = field(
        default=10.0, metadata=key("how long a client may take to send its headers", minimum=0.1)
    )
    max_connections: int = field(
        default=2048, metadata=key("connections open at once; past it 503", minimum=1)
    )
    max_waiting_requests: int = field(
        default=512, metadata=key("proxied requests waiting for a load; past it 503")
    )
    # The scheduler (switchd/policy.py): a loaded model keeps the GPU at least its
    # residency (this floor or its learned load time, the larger), then at most
    # max_hold_seconds while requests for models that do not fit beside it wait.
    min_residency_seconds: float = field(
        default=5.0, metadata=key("the least time a loaded model keeps the GPU")
    )
    max_hold_seconds: float = field(
        default=60.0,
        metadata=key("the most time past its residency a model keeps the GPU while others wait"),
    )
    # Between the two, the hold scales with what switching away and back costs, so
    # that switching takes at most this share of the GPU's time (switchd/policy.py).
    max_switching_share: float = field(
        default=0.2,
        metadata=key(
            "the share of the GPU's time switches may take while models contend; the hold "
            "is what keeps switching to it",
            minimum=0.01,
            maximum=1.0,
        ),
    )
    # After a failed load, requests for that model are refused (503 + Retry-After)
    # for this long, doubling per consecutive failure up to the maximum.
    load_failure_cooldown_seconds: float = field(
        default=10.0, metadata=key("how long a model's requests are refused after a failed load")
    )
    max_load_failure_cooldown_seconds: float = field(
        default=300.0, metadata=key("the cooldown's ceiling as it doubles per failure")
    )
    standby_host_ram_gb: float | None = field(
        default=None,
        metadata=key("host RAM level-1 sleeps may hold in all, GiB; null: half of MemAvailable"),
    )
    load_progress_in_stream: bool = field(
        default=False,
        metadata=key("streamed chat answers that wait for a load get its progress as reasoning"),
    )
    # Restarts and config (switchd/reload.py, runtime/process.py adoption).
    keep_engines_on_exit: bool = field(
        default=False,
        metadata=key(
            "a stop leaves process engines running, for the next switchd to adopt"
            " (upgrades without reloading models)"
        ),
    )
    preload: tuple[str, ...] = field(
        default=(),
        metadata=key(
            "models loaded at start, in order (each waits its turn if it does not fit)",
            custom=True,
            schema={"type": ["array", "null"], "items": {"type": "string"}},
        ),
    )
    # What DESIGN.md documents and every loaded file got; "~" is expanded on construction.
    state_dir: Path = field(
        default=Path("~/.local/state/switchd"),
        metadata=key("what switchd learns (load times, footprints) and its engines' pid files"),
    )

    journal_max_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata=key(
            "the event journal in state_dir (resumes across restarts) at most; 0: no journal",
            minimum=0,
        ),
    )
    log_format: LogFormat = field(
        default=LogFormat.TEXT,
        metadata=key("switchd's own log: text lines, or one JSON object a line (collectors)"),
    )

    def __post_init__(self) -> None:
        # One default for files and for Settings built in code: a path under the home.
        object.__setattr__(self, "state_dir", Path(self.state_dir).expanduser())

    def resolve(self, name: str) -> ModelSpec | None:
        """The model called `name` or having it as an alias."""
        spec = self.models.get(name)
        if spec is not None:
            return spec
        for candidate in self.models.values():
            if name in candidate.aliases:
                return candidate
        return None


def _null_is_default(hint: Any) -> bool:
    """Whether `null` in the file means the default, as if the key were absent.

    For a number, a boolean or a choice it is a mistake, refused by the reader.
    """
    optional = isinstance(hint, types.UnionType)
    return optional or hint in (str, Path) or dataclasses.is_dataclass(hint)


class _Reader:
    """Typed access to one mapping of the file, errors naming the full key."""

    def __init__(self, source: str, prefix: str, data: Mapping[str, Any], known: set[str]):
        self.source = source
        self.prefix = prefix
        self.data = data
        for name in data:
            if name not in known:
                allowed = ", ".join(sorted(known))
                raise self.error(str(name), f"unknown key (known keys: {allowed})")

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), problem)

    def given(self, name: str) -> bool:
        """Whether the file sets `name` to something (`null` counts as not)."""
        return self.data.get(name) is not None

    def number(self, name: str, *, minimum: float = 0.0, maximum: float | None = None) -> float:
        value = self.data.get(name)
        if value is None:
            raise self.error(name, "is required (a number)")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(name, f"must be a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .nan, .inf and -.inf
            raise self.error(name, f"must be a finite number, got {value!r}")
        if value < minimum:
            raise self.error(name, f"must be >= {minimum:g}, got {value!r}")
        if maximum is not None and value > maximum:
            raise self.error(name, f"must be <= {maximum:g}, got {value!r}")
        return float(value)

    def whole(self, name: str, *, minimum: int = 0) -> int:
        value = self.number(name, minimum=minimum)
        if value != int(value):
            raise self.error(name, f"must be a whole number, got {value!r}")
        return int(value)

    def boolean(self, name: str) -> bool:
        value = self.data.get(name)
        if not isinstance(value, bool):
            raise self.error(name, f"must be true or false, got {value!r}")
        return value

    def text(self, name: str) -> str | None:
        value = self.data.get(name)
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

    def choice(self, name: str, enum: type[_E]) -> _E:
        value: Any = self.data.get(name)
        try:
            return enum(value)
        except ValueError:
            allowed = " | ".join(member.value for member in enum)
            raise self.error(name, f"must be one of {allowed}, got {value!r}") from None

    def fields(self, cls: type) -> dict[str, Any]:
        """The fields of `cls` the file sets, read as their types say; the rest keep defaults.

        Custom and flat fields are left to the caller.
        """
        values: dict[str, Any] = {}
        for each, meta, hint in keyed_fields(cls):
            name = meta.name or each.name
            if meta.custom or meta.flat or (name not in self.data and not is_required(each)):
                continue
            if name in self.data and self.data[name] is None and _null_is_default(hint):
                continue
            values[each.name] = self.read(name, hint, meta)
        return values

    def read(self, name: str, hint: Any, meta: Key) -> Any:
        """The value of `name`, of type `hint` (float, int, bool, str, Path, a StrEnum,
        a dataclass read as a nested mapping, or one of those or None)."""
        if isinstance(hint, types.UnionType):
            (inner,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
            return self.read(name, inner, meta)
        if hint is float:
            return self.number(name, minimum=meta.minimum, maximum=meta.maximum)
        if hint is int:
            return self.whole(name, minimum=int(meta.minimum))
        if hint is bool:
            return self.boolean(name)
        if hint is str:
            return self.text(name)
        if hint is Path:
            return Path(str(self.text(name)))
        if isinstance(hint, type) and issubclass(hint, StrEnum):
            return self.choice(name, hint)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            value = self.data[name]
            if not isinstance(value, dict):
                raise self.error(name, "must be a mapping")
            nested = _Reader(self.source, f"{self.key(name)}.", value, known_keys(hint))
            return hint(**nested.fields(hint))
        raise TypeError(f"{name}: no reader for {hint!r}: give its Key custom=True")


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
    value = reader.data["ports"]
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
    values = reader.fields(DockerOptions)
    if "volumes" in reader.data:
        volumes = reader.data["volumes"]
        if not isinstance(volumes, list) or not all(
            isinstance(v, str) and ":" in v for v in volumes
        ):
            raise reader.error("volumes", 'must be a list like ["/srv/models:/models:ro"]')
        values["volumes"] = tuple(volumes)
    if "port" in reader.data:
        port = reader.number("port", minimum=1)
        if port != int(port) or port > 65535:
            raise reader.error("port", f"must be a port number, got {port!r}")
        values["port"] = int(port)
    if "ports" in reader.data:
        values["ports"] = _parse_ports(reader)
    return DockerOptions(**values, gpu_count=gpu_count)


def _parse_standby(reader: _Reader) -> tuple[Tier, ...]:
    """`standby: [sleep1, sleep2]` (vLLM), `[release]` (SGLang) or nothing (stop only)."""
    value = reader.data["standby"]
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


def _parse_capabilities(reader: _Reader) -> tuple[Capability, ...]:
    """`capabilities: [chat, tools, vision]`: each known, none twice."""
    value = reader.data["capabilities"]
    allowed = " | ".join(c.value for c in Capability)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise reader.error("capabilities", f"must be a list of ({allowed}), got {value!r}")
    found: list[Capability] = []
    for item in value:
        try:
            capability = Capability(item)
        except ValueError:
            raise reader.error("capabilities", f"unknown {item!r} (known: {allowed})") from None
        if capability in found:
            raise reader.error("capabilities", f"lists {item!r} twice")
        found.append(capability)
    return tuple(found)


def _url_path(reader: _Reader, name: str) -> str | None:
    """A path on the engine (`/health`), None where the file leaves it to the default."""
    path = reader.text(name)
    if path is not None and not path.startswith("/"):
        raise reader.error(name, f"must start with '/', got {path!r}")
    return path


def _parse_model(source: str, name: str, data: object) -> ModelSpec:
    prefix = f"models.{name}."
    if not isinstance(data, dict):
        raise ConfigError(source, f"models.{name}", "must be a mapping of model settings")
    reader = _Reader(source, prefix, data, known_keys(ModelSpec))
    # Only what the file gives: every other field keeps its dataclass default.
    values: dict[str, Any] = {"cmd": reader.words("cmd")}
    container = reader.text("container")
    image = reader.text("image")
    if not values["cmd"] and not container and not image:
        raise ConfigError(
            source,
            f"models.{name}",
            "needs `cmd` (process runtime) or `container`/`image` (docker)",
        )
    if "aliases" in data:
        aliases = data["aliases"]
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
            raise reader.error("aliases", "must be a list of names")
        values["aliases"] = tuple(aliases)
    if "env" in data:
        env = data["env"]
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str | int | float) for k, v in env.items()
        ):
            raise reader.error("env", "must map names to strings or numbers")
        # YAML's `true` would become "True"; engines expect the spelling they were given.
        values["env"] = {
            k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()
        }
    for path_key in ("health_path", "wake_check_path"):
        path = _url_path(reader, path_key)
        if path is not None:
            values[path_key] = path
    url = reader.text("url")
    if url is not None and not url.startswith(("http://", "https://")):
        raise reader.error("url", f"must start with http:// or https://, got {url!r}")
    values["url"] = url.rstrip("/") if url else None
    values["gpus"], gpu_count = _parse_gpus(reader)
    if "gpu_count" in data:
        if "gpus" in data:
            raise reader.error("gpu_count", "give `gpus` (devices or a count) or `gpu_count`")
        gpu_count = reader.whole("gpu_count", minimum=1)
    if container and image:
        raise ConfigError(
            source,
            f"models.{name}",
            "has both `container` (one compose made) and `image` (one switchd makes): keep one",
        )
    values["command"] = reader.words("command")
    if "standby" in data:
        values["standby"] = _parse_standby(reader)
    if data.get("capabilities") is not None:
        values["capabilities"] = _parse_capabilities(reader)
    return ModelSpec(
        name=name,
        **values,
        **reader.fields(ModelSpec),
        docker=_parse_docker(reader, gpu_count),
    )


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


def _parse_preload(top: _Reader, models: Mapping[str, ModelSpec]) -> tuple[str, ...]:
    """The models to load at start, by name or alias, as their catalog names."""
    names = top.data.get("preload", []) or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise top.error("preload", "must be a list of model names")
    chosen: list[str] = []
    for name in names:
        spec = models.get(name) or next((m for m in models.values() if name in m.aliases), None)
        if spec is None:
            raise top.error("preload", f"{name!r} is not a model of `models`")
        if spec.name not in chosen:
            chosen.append(spec.name)
    return tuple(chosen)


# What a reload may change on a loaded model without restarting its engine: what
# switchd alone reads. Every other field (cmd, env, url, gpus, image, docker, standby…,
# and any field added later) is an engine setting: a change restarts the engine.
LIVE_MODEL_FIELDS = frozenset(
    {
        "size_gb",
        "load_time_seconds",
        "pinned",
        "aliases",
        "ttl_seconds",
        "api_key",
        "priority",
        "gb_per_device",
        "weights_gb",
        "wake_check_path",
        "load_progress_in_stream",
        "health_path",
    }
)


def engine_settings(spec: ModelSpec) -> dict[str, Any]:
    """The fields of `spec` its engine was started with (all but LIVE_MODEL_FIELDS)."""
    return {
        each.name: getattr(spec, each.name)
        for each in dataclasses.fields(ModelSpec)
        if each.name not in LIVE_MODEL_FIELDS
    }


def engine_digest(spec: ModelSpec) -> str:
    """A hash of the model's engine settings: the same engine for the same config
    (the pid file of an engine records it; a reload compares it)."""

    def plain(value: object) -> object:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        if isinstance(value, Mapping):
            return dict(value)
        return str(value)

    text = json.dumps(engine_settings(spec), sort_keys=True, default=plain)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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
    top = _Reader(source, "", data, known_keys(Settings))
    # Only what the file gives: every other field keeps its dataclass default.
    values: dict[str, Any] = {}
    if "listen" in data:
        values["host"], values["port"] = parse_listen(source, data["listen"])
    for each, meta, _ in keyed_fields(Settings):
        if meta.env:
            values[each.name] = _keys(top, each.name, environ, meta.env)
    origins = data.get("cors_allow_origins", []) or []
    if not isinstance(origins, list) or not all(
        isinstance(o, str) and (o == "*" or o.startswith(("http://", "https://"))) for o in origins
    ):
        raise top.error("cors_allow_origins", 'must be a list like ["https://ui.example.com"]')
    values["cors_allow_origins"] = tuple(origins)

    models_data = data.get("models")
    if not isinstance(models_data, dict) or not models_data:
        raise top.error("models", "must map at least one model name to its settings")
    models = {}
    for raw_name, model_data in models_data.items():
        name = _model_name(source, raw_name)
        models[name] = _parse_model(source, name, model_data)
    _check_names(source, models)

    values["preload"] = _parse_preload(top, models)
    settings = Settings(models=models, source=source, **values, **top.fields(Settings))
    if settings.gpu is GpuKind.SIMULATED:  # for nvml and auto: once the probe is open (app.py)
        simulated = settings.simulated_gpu
        check_devices(settings, simulated.devices, "the simulated GPU", simulated.total_gb)
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
