"""Settings from YAML and the environment: every key, the defaults and each refusal."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from switchd.cli import main
from switchd.config import (
    Capability,
    ConfigError,
    EvictionPolicy,
    GpuKind,
    ModelSpec,
    RuntimeKind,
    Settings,
    SimulatedGpuSettings,
    Tier,
    check_devices,
    load_settings,
    parse_settings,
)
from switchd.gpu import GpuProbe, SimulatedGpu

SOURCE = "test.yaml"

FULL_FILE = """\
listen: 0.0.0.0:9090
api_keys: [file-key-1, file-key-2]
runtime: process
gpu: simulated
simulated_gpu: {total_gb: 47.5, devices: 2, release_delay_seconds: 0.25}
eviction: smallest_sufficient
auto_switch: false
request_timeout_seconds: 120
drain_timeout_seconds: 12.5
health_timeout_seconds: 300
memory_release_timeout_seconds: 7
stop_grace_seconds: 4
state_dir: ~/switchd-state
models:
  gpt-oss-20b:
    container: vllm-gpt-oss-20b
    url: http://vllm-gpt-oss-20b:8000/
    size_gb: 40
    load_time_seconds: 15
    health_path: /v1/health
    pinned: true
    aliases: [20b, small]
    ttl_seconds: 600
    gpus: [0]
    env: {HF_HOME: /models, SHARDS: 2}
  llama:
    image: ghcr.io/ggml-org/llama.cpp:server
    command: ["-m", "/models/llama.gguf", "--port", "8000"]
    size_gb: 8.5
    gpus: [0, 1]
  local:
    cmd: "llama-server -m 'my model.gguf' --port ${PORT}"
    size_gb: 0
    gpus: all
"""


def model(**extra: Any) -> dict[str, Any]:
    """One valid model's settings, with `extra` on top (None removes a key)."""
    data: dict[str, Any] = {"cmd": "engine --port 8000", "size_gb": 10}
    for key, value in extra.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def parse(environ: dict[str, str] | None = None, /, **data: Any) -> Settings:
    data.setdefault("models", {"m": model()})
    return parse_settings(data, SOURCE, environ or {})


def refused(environ: dict[str, str] | None = None, /, **data: Any) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse(environ, **data)
    return caught.value


def write(tmp_path: Path, text: str, name: str = "switchd.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- a full file ---------------------------------------------------------------------------


def test_full_file_parses_every_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write(tmp_path, FULL_FILE)

    settings = load_settings(path, {})

    assert settings.source == str(path)
    assert (settings.host, settings.port) == ("0.0.0.0", 9090)
    assert settings.api_keys == ("file-key-1", "file-key-2")
    assert settings.runtime is RuntimeKind.PROCESS
    assert settings.gpu is GpuKind.SIMULATED
    assert settings.simulated_gpu == SimulatedGpuSettings(
        total_gb=47.5, devices=2, release_delay_seconds=0.25
    )
    assert settings.eviction is EvictionPolicy.SMALLEST_SUFFICIENT
    assert settings.auto_switch is False
    assert settings.request_timeout_seconds == 120.0
    assert settings.drain_timeout_seconds == 12.5
    assert settings.health_timeout_seconds == 300.0
    assert settings.memory_release_timeout_seconds == 7.0
    assert settings.stop_grace_seconds == 4.0
    assert settings.state_dir == tmp_path / "home" / "switchd-state"
    assert list(settings.models) == ["gpt-oss-20b", "llama", "local"]

    assert settings.models["gpt-oss-20b"] == ModelSpec(
        name="gpt-oss-20b",
        size_gb=40.0,
        container="vllm-gpt-oss-20b",
        url="http://vllm-gpt-oss-20b:8000",  # trailing slash dropped
        load_time_seconds=15.0,
        health_path="/v1/health",
        pinned=True,
        aliases=("20b", "small"),
        ttl_seconds=600.0,
        gpus=(0,),
        env={"HF_HOME": "/models", "SHARDS": "2"},
    )
    assert settings.models["llama"] == ModelSpec(
        name="llama",
        size_gb=8.5,
        image="ghcr.io/ggml-org/llama.cpp:server",
        command=("-m", "/models/llama.gguf", "--port", "8000"),
        gpus=(0, 1),
    )
    local = settings.models["local"]
    assert local.cmd == ("llama-server", "-m", "my model.gguf", "--port", "${PORT}")
    assert local.size_gb == 0.0
    assert local.gpus is None


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = parse_settings({"models": {"m": {"cmd": "engine", "size_gb": 3}}}, SOURCE, {})

    assert settings.source == SOURCE
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.api_keys == ()
    assert settings.runtime is RuntimeKind.DOCKER
    assert settings.gpu is GpuKind.AUTO
    assert settings.simulated_gpu == SimulatedGpuSettings(
        total_gb=95.59, devices=1, release_delay_seconds=0.0
    )
    assert settings.eviction is EvictionPolicy.LARGEST_FIRST
    assert settings.auto_switch is True
    assert settings.request_timeout_seconds == 600.0
    assert settings.drain_timeout_seconds == 30.0
    assert settings.health_timeout_seconds == 900.0
    assert settings.memory_release_timeout_seconds == 30.0
    assert settings.stop_grace_seconds == 10.0
    assert settings.state_dir == tmp_path / ".local" / "state" / "switchd"
    assert settings.models["m"] == ModelSpec(
        name="m",
        size_gb=3.0,
        cmd=("engine",),
        container=None,
        image=None,
        command=(),
        url=None,
        load_time_seconds=30.0,
        health_path="/health",
        pinned=False,
        aliases=(),
        ttl_seconds=0.0,
        gpus=None,
        env={},
    )


def test_null_sections_take_their_defaults() -> None:
    settings = parse(
        api_keys=None, simulated_gpu=None, models={"m": {**model(), "health_path": None}}
    )
    assert settings.api_keys == ()
    assert settings.simulated_gpu == SimulatedGpuSettings()
    assert settings.models["m"].health_path == "/health"


# --- API keys ----------------------------------------------------------------------------


def test_environment_keys_are_merged_trimmed_and_deduplicated() -> None:
    settings = parse(
        {"SWITCHD_API_KEYS": " env-1 , file-1,, env-1 ,env-2 ,"},
        api_keys=["file-1", "file-2"],
    )
    assert settings.api_keys == ("file-1", "file-2", "env-1", "env-2")


def test_environment_keys_alone() -> None:
    assert parse({"SWITCHD_API_KEYS": "k1,k2"}).api_keys == ("k1", "k2")
    assert parse({"SWITCHD_API_KEYS": " , "}).api_keys == ()


def test_file_keys_are_trimmed_like_environment_keys() -> None:
    settings = parse({"SWITCHD_API_KEYS": "k1"}, api_keys=[" k1 ", "k2"])
    assert settings.api_keys == ("k1", "k2")


@pytest.mark.parametrize("keys", ["k1", [""], ["k1", 2], {"k": "v"}])
def test_api_keys_must_be_a_list_of_non_empty_strings(keys: object) -> None:
    error = refused(api_keys=keys)
    assert (error.source, error.key) == (SOURCE, "api_keys")
    assert "must be a list of non-empty strings" in error.problem


# --- refusals: unknown keys and models ------------------------------------------------------


def test_unknown_top_level_key() -> None:
    error = refused(listn="127.0.0.1:8080")
    assert (error.source, error.key) == (SOURCE, "listn")
    assert error.problem.startswith("unknown key (known keys: ")
    assert "listen" in error.problem
    assert "models" in error.problem
    assert str(error) == f"{SOURCE}: listn: {error.problem}"


def test_unknown_model_key() -> None:
    error = refused(models={"gpt": model(foo=1)})
    assert (error.source, error.key) == (SOURCE, "models.gpt.foo")
    assert error.problem.startswith("unknown key (known keys: ")
    assert "size_gb" in error.problem


def test_unknown_simulated_gpu_key() -> None:
    error = refused(simulated_gpu={"total": 80})
    assert (error.source, error.key) == (SOURCE, "simulated_gpu.total")
    assert error.problem.startswith("unknown key")


def test_model_needs_cmd_or_container_or_image() -> None:
    error = refused(models={"gpt": {"size_gb": 10, "url": "http://x:1"}})
    assert (error.source, error.key) == (SOURCE, "models.gpt")
    assert "needs `cmd`" in error.problem
    assert "`container`/`image`" in error.problem


@pytest.mark.parametrize("which", ["container", "image"])
def test_container_or_image_alone_is_enough(which: str) -> None:
    spec = parse(models={"m": {which: "thing", "size_gb": 1}}).models["m"]
    assert getattr(spec, which) == "thing"
    assert spec.cmd == ()


def test_model_settings_must_be_a_mapping() -> None:
    error = refused(models={"gpt": "engine"})
    assert (error.source, error.key) == (SOURCE, "models.gpt")
    assert "must be a mapping" in error.problem


def test_negative_size() -> None:
    error = refused(models={"gpt": model(size_gb=-1)})
    assert (error.source, error.key) == (SOURCE, "models.gpt.size_gb")
    assert error.problem == "must be >= 0, got -1"


def test_missing_size() -> None:
    error = refused(models={"gpt": model(size_gb=None)})
    assert (error.source, error.key) == (SOURCE, "models.gpt.size_gb")
    assert error.problem == "is required (a number)"


@pytest.mark.parametrize("value", ["40", True])
def test_size_must_be_a_number(value: object) -> None:
    error = refused(models={"gpt": model(size_gb=value)})
    assert error.key == "models.gpt.size_gb"
    assert error.problem == f"must be a number, got {value!r}"


def test_negative_top_level_number() -> None:
    error = refused(drain_timeout_seconds=-5)
    assert error.key == "drain_timeout_seconds"
    assert error.problem == "must be >= 0, got -5"


def test_health_timeout_has_a_floor() -> None:
    error = refused(health_timeout_seconds=0)
    assert error.key == "health_timeout_seconds"
    assert error.problem == "must be >= 0.1, got 0"


NOT_FINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("value", NOT_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"models": {"m": model(size_gb="VALUE")}}, "models.m.size_gb"),
        ({"models": {"m": model(load_time_seconds="VALUE")}}, "models.m.load_time_seconds"),
        ({"models": {"m": model(ttl_seconds="VALUE")}}, "models.m.ttl_seconds"),
        ({"models": {"m": model(priority="VALUE")}}, "models.m.priority"),
        ({"models": {"m": model(port="VALUE")}}, "models.m.port"),
        ({"request_timeout_seconds": "VALUE"}, "request_timeout_seconds"),
        ({"max_hold_seconds": "VALUE"}, "max_hold_seconds"),
        ({"max_body_bytes": "VALUE"}, "max_body_bytes"),
        ({"max_waiting_requests": "VALUE"}, "max_waiting_requests"),
        ({"simulated_gpu": {"total_gb": "VALUE"}}, "simulated_gpu.total_gb"),
        ({"simulated_gpu": {"devices": "VALUE"}}, "simulated_gpu.devices"),
    ],
)
def test_numbers_must_be_finite(data: dict[str, Any], key: str, value: float) -> None:
    def put(node: Any) -> Any:
        if node == "VALUE":
            return value
        return {k: put(v) for k, v in node.items()} if isinstance(node, dict) else node

    error = refused(**put(data))
    assert (error.source, error.key) == (SOURCE, key)
    assert error.problem == f"must be a finite number, got {value!r}"


@pytest.mark.parametrize(
    ("text", "key", "shown"),
    [
        ("models:\n  m: {cmd: e, size_gb: .nan}\n", "models.m.size_gb", "nan"),
        ("models:\n  m: {cmd: e, size_gb: .inf}\n", "models.m.size_gb", "inf"),
        ("models:\n  m: {cmd: e, size_gb: -.inf}\n", "models.m.size_gb", "-inf"),
        (
            "request_timeout_seconds: .inf\nmodels:\n  m: {cmd: e, size_gb: 1}\n",
            "request_timeout_seconds",
            "inf",
        ),
        ("max_body_bytes: .NaN\nmodels:\n  m: {cmd: e, size_gb: 1}\n", "max_body_bytes", "nan"),
    ],
)
def test_yaml_nan_and_infinity_are_refused(tmp_path: Path, text: str, key: str, shown: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert str(caught.value) == f"{path}: {key}: must be a finite number, got {shown}"


def test_empty_models() -> None:
    models: object
    for models in ({}, None, ["m"]):
        error = refused(models=models)
        assert (error.source, error.key) == (SOURCE, "models")
        assert "at least one model" in error.problem


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(["models"], SOURCE, {})
    assert (caught.value.source, caught.value.key) == (SOURCE, "")
    assert "must be a YAML mapping" in caught.value.problem
    assert str(caught.value) == f"{SOURCE}: {caught.value.problem}"


# --- names and aliases ---------------------------------------------------------------------


def test_alias_clashing_with_a_model_name() -> None:
    error = refused(models={"a": model(), "b": model(aliases=["a"])})
    assert (error.source, error.key) == (SOURCE, "models.b.aliases")
    assert error.problem == "'a' is already a model name"


def test_alias_clashing_with_another_models_alias() -> None:
    error = refused(models={"a": model(aliases=["x"]), "b": model(aliases=["y", "x"])})
    assert (error.source, error.key) == (SOURCE, "models.b.aliases")
    assert error.problem == "'x' is already an alias of 'a'"


def test_model_named_all_is_reserved() -> None:
    error = refused(models={"m": model(), "all": model()})
    assert (error.source, error.key) == (SOURCE, "models.all")
    assert "'all' is reserved" in error.problem


def test_alias_all_names_the_aliases_key() -> None:
    error = refused(models={"m": model(aliases=["all"])})
    assert error.key == "models.m.aliases"
    assert "'all' is reserved" in error.problem


@pytest.mark.parametrize("aliases", ["x", [""], ["x", 1]])
def test_aliases_must_be_a_list_of_names(aliases: object) -> None:
    error = refused(models={"m": model(aliases=aliases)})
    assert error.key == "models.m.aliases"
    assert error.problem == "must be a list of names"


def test_resolve_by_name_and_alias() -> None:
    settings = parse(models={"big": model(aliases=["b", "large"]), "small": model()})
    assert settings.resolve("big") is settings.models["big"]
    assert settings.resolve("large") is settings.models["big"]
    assert settings.resolve("b") is settings.models["big"]
    assert settings.resolve("small") is settings.models["small"]
    assert settings.resolve("tiny") is None
    assert settings.resolve("Big") is None


@pytest.mark.parametrize("name", [None, 123, True, 1.5, ""])
def test_model_names_must_be_non_empty_strings(name: object) -> None:
    error = refused(models={"m": model(), name: model()})
    assert (error.source, error.key) == (SOURCE, "models")
    assert error.problem == f"model names must be non-empty strings, got {name!r}"


@pytest.mark.parametrize(
    ("line", "shown"), [("~", "None"), ("null", "None"), ("123", "123"), ("true", "True")]
)
def test_yaml_model_names_that_are_not_strings(tmp_path: Path, line: str, shown: str) -> None:
    path = write(tmp_path, f"models:\n  {line}: {{cmd: e, size_gb: 1}}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert str(caught.value) == (
        f"{path}: models: model names must be non-empty strings, got {shown}"
    )


CHARACTERS = "may only use ASCII letters, digits and . _ - : /"


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("my model", CHARACTERS),
        ("café", CHARACTERS),
        ("m;rm -rf ~", CHARACTERS),
        ("$(reboot)", CHARACTERS),
        ("m\n", CHARACTERS),
        ("a*", CHARACTERS),
        ("-m", "must not start with '-' or '/'"),
        ("--help", "must not start with '-' or '/'"),
        ("/models/m", "must not start with '-' or '/'"),
        ("org/../m", "must not contain '..'"),
        ("..", "must not contain '..'"),
        ("m" * 129, "is 129 characters long, at most 128 are allowed"),
    ],
)
def test_model_names_that_cannot_safely_reach_docker_or_a_command_line(
    name: str, problem: str
) -> None:
    error = refused(models={name: model()})
    assert (error.source, error.key) == (SOURCE, "models")
    assert error.problem == f"model name {name!r} {problem}"


@pytest.mark.parametrize(
    "name",
    ["gpt-oss-20b", "Qwen/Qwen3-8B", "llama3.1:8b", "org/name:q4_K_M", "m", "1b", "m" * 128],
)
def test_model_names_that_are_allowed(name: str) -> None:
    assert parse(models={name: model()}).models[name].name == name


# --- listen --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080),
        ("0.0.0.0:1", "0.0.0.0", 1),
        ("localhost:65535", "localhost", 65535),
        ("[::1]:8080", "::1", 8080),
        ("[::]:443", "::", 443),
    ],
)
def test_listen(listen: str, host: str, port: int) -> None:
    settings = parse(listen=listen)
    assert (settings.host, settings.port) == (host, port)


@pytest.mark.parametrize(
    ("listen", "fragment"),
    [
        ("localhost", "must be HOST:PORT, got 'localhost'"),
        (8080, "must be HOST:PORT, got 8080"),
        (["127.0.0.1", 8080], "must be HOST:PORT, got ['127.0.0.1', 8080]"),
        ("localhost:", "with a port 1-65535, got 'localhost:'"),
        (":8080", "with a port 1-65535, got ':8080'"),
        ("localhost:0", "with a port 1-65535, got 'localhost:0'"),
        ("localhost:70000", "with a port 1-65535, got 'localhost:70000'"),
        ("localhost:65536", "with a port 1-65535, got 'localhost:65536'"),
        ("localhost:-1", "with a port 1-65535, got 'localhost:-1'"),
        ("localhost:http", "with a port 1-65535, got 'localhost:http'"),
    ],
)
def test_bad_listen(listen: object, fragment: str) -> None:
    error = refused(listen=listen)
    assert (error.source, error.key) == (SOURCE, "listen")
    assert error.problem.endswith(fragment)


# --- choices and booleans ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("runtime", "kubernetes", "docker | process"),
        ("gpu", "cuda", "auto | nvml | simulated"),
        ("eviction", "random", "largest_first | lru | smallest_sufficient"),
        ("runtime", "Docker", "docker | process"),
        ("gpu", ["nvml"], "auto | nvml | simulated"),
    ],
)
def test_unknown_choice_lists_allowed_values(key: str, value: object, allowed: str) -> None:
    error = refused(**{key: value})
    assert (error.source, error.key) == (SOURCE, key)
    assert error.problem == f"must be one of {allowed}, got {value!r}"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("runtime", "process", RuntimeKind.PROCESS),
        ("gpu", "nvml", GpuKind.NVML),
        ("eviction", "lru", EvictionPolicy.LRU),
    ],
)
def test_choices(key: str, value: str, expected: object) -> None:
    assert getattr(parse(**{key: value}), key) is expected


@pytest.mark.parametrize("value", ["true", "false", "yes", 1, 0])
def test_auto_switch_must_be_a_real_boolean(value: object) -> None:
    error = refused(auto_switch=value)
    assert (error.source, error.key) == (SOURCE, "auto_switch")
    assert error.problem == f"must be true or false, got {value!r}"


@pytest.mark.parametrize("value", ["true", "no", 1])
def test_pinned_must_be_a_real_boolean(value: object) -> None:
    error = refused(models={"m": model(pinned=value)})
    assert (error.source, error.key) == (SOURCE, "models.m.pinned")
    assert error.problem == f"must be true or false, got {value!r}"


# --- model fields ---------------------------------------------------------------------------


@pytest.mark.parametrize("gpus", [[], [-1], [0, "1"], [True], "0", 0, [0.5], {"0": 1}])
def test_gpus_must_be_a_list_of_non_negative_ints(gpus: object) -> None:
    error = refused(models={"m": model(gpus=gpus)})
    assert (error.source, error.key) == (SOURCE, "models.m.gpus")
    assert error.problem == (f"must be all, a count, or device indexes like [0, 1], got {gpus!r}")


def test_gpus_as_a_count_asks_docker_for_any_n_devices() -> None:
    settings = parse(models={"m": model(gpus=2)})
    assert settings.models["m"].gpus is None
    assert settings.models["m"].docker.gpu_count == 2


def test_gpus_list_and_all() -> None:
    models = {"a": model(gpus=[1, 0]), "b": model(gpus="all"), "c": model()}
    settings = parse(models=models)
    assert settings.models["a"].gpus == (1, 0)
    assert settings.models["b"].gpus is None
    assert settings.models["c"].gpus is None


@pytest.mark.parametrize(
    ("devices", "gpus", "problem"),
    [
        (1, [5], "device 5 does not exist: the simulated GPU has 1 device (0)"),
        (1, [0, 1], "device 1 does not exist: the simulated GPU has 1 device (0)"),
        (2, [2], "device 2 does not exist: the simulated GPU has 2 devices (0, 1)"),
        (4, [4], "device 4 does not exist: the simulated GPU has 4 devices (0-3)"),
        (1, 3, "asks for 3 devices: the simulated GPU has 1"),
        (2, 3, "asks for 3 devices: the simulated GPU has 2"),
    ],
)
def test_gpus_beyond_the_simulated_gpu(devices: int, gpus: object, problem: str) -> None:
    error = refused(
        gpu="simulated",
        simulated_gpu={"devices": devices},
        models={"ok": model(), "m": model(gpus=gpus)},
    )
    assert (error.source, error.key, error.problem) == (SOURCE, "models.m.gpus", problem)


def test_gpus_within_the_simulated_gpu() -> None:
    models = {"a": model(gpus=[0, 1]), "b": model(gpus=2), "c": model(gpus=[1])}
    settings = parse(gpu="simulated", simulated_gpu={"devices": 2}, models=models)
    assert settings.models["a"].gpus == (0, 1)


@pytest.mark.parametrize("gpu", ["auto", "nvml"])
def test_gpus_for_nvml_are_checked_once_the_probe_is_open(gpu: str) -> None:
    models = {"a": model(gpus=[5]), "b": model(gpus=3)}
    settings = parse(gpu=gpu, simulated_gpu={"devices": 1}, models=models)
    assert settings.models["a"].gpus == (5,)
    assert settings.models["b"].docker.gpu_count == 3


@pytest.mark.parametrize(
    ("gpus", "count", "name", "problem"),
    [
        ([0], 1, "NVML", None),
        ([7, 0], 8, "NVML", None),
        ("all", 1, "NVML", None),
        (2, 2, "NVML", None),
        ([2], 2, "NVML", "device 2 does not exist: NVML has 2 devices (0, 1)"),
        ([0, 9], 8, "NVML", "device 9 does not exist: NVML has 8 devices (0-7)"),
        (
            [1],
            1,
            "the simulated GPU",
            "device 1 does not exist: the simulated GPU has 1 device (0)",
        ),
        ([0], 0, "NVML", "device 0 does not exist: NVML has no devices"),
        (3, 2, "NVML", "asks for 3 devices: NVML has 2"),
        (2, 1, "the simulated GPU", "asks for 2 devices: the simulated GPU has 1"),
    ],
)
def test_check_devices(gpus: object, count: int, name: str, problem: str | None) -> None:
    settings = parse(models={"first": model(gpus="all"), "m": model(gpus=gpus)})
    if problem is None:
        check_devices(settings, count, name)
        return
    with pytest.raises(ConfigError) as caught:
        check_devices(settings, count, name)
    assert (caught.value.source, caught.value.key) == (SOURCE, "models.m.gpus")
    assert caught.value.problem == problem


@pytest.fixture
def signals_restored() -> Iterator[None]:
    """serve() hands SIGTERM and SIGINT to uvicorn: put them back."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.mark.usefixtures("signals_restored")
@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("nvml", "device 5 does not exist: NVML has 2 devices (0, 1)"),
        ("simulated", "device 5 does not exist: the simulated GPU has 2 devices (0, 1)"),
    ],
)
def test_serve_refuses_devices_the_opened_probe_lacks_in_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    source: str,
    problem: str,
) -> None:
    async def open_probe(kind: GpuKind, simulated: SimulatedGpuSettings) -> GpuProbe:
        return SimulatedGpu(SimulatedGpuSettings(devices=2), source=source)

    async def open_runtime(settings: Settings) -> None:
        raise AssertionError("the lifespan went on past the device check")

    monkeypatch.setattr("switchd.app.open_probe", open_probe)
    monkeypatch.setattr("switchd.app.open_runtime", open_runtime)
    data = {
        "runtime": "process",
        "gpu": "auto",
        "listen": "127.0.0.1:1",  # never bound: the lifespan fails before
        "state_dir": str(tmp_path / "state"),
        "models": {"m": {"cmd": "engine", "size_gb": 1, "gpus": [5]}},
    }
    path = write(tmp_path, yaml.safe_dump(data))

    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"switchd: bad configuration: {path}: models.m.gpus: {problem}\n" in err
    assert "Traceback" not in err


def test_health_path_needs_a_leading_slash() -> None:
    error = refused(models={"m": model(health_path="health")})
    assert (error.source, error.key) == (SOURCE, "models.m.health_path")
    assert error.problem == "must start with '/', got 'health'"


@pytest.mark.parametrize("url", ["ftp://host:21", "host:8000", "HTTP//x", "ws://host:8000"])
def test_url_must_be_http(url: str) -> None:
    error = refused(models={"m": model(url=url)})
    assert (error.source, error.key) == (SOURCE, "models.m.url")
    assert error.problem == f"must start with http:// or https://, got {url!r}"


def test_https_url_is_kept_without_trailing_slashes() -> None:
    spec = parse(models={"m": model(url="https://engine.local:8443//")}).models["m"]
    assert spec.url == "https://engine.local:8443"


@pytest.mark.parametrize(
    ("cmd", "words"),
    [
        (
            "llama-server -m 'a b.gguf' --alias \"x y\"",
            ("llama-server", "-m", "a b.gguf", "--alias", "x y"),
        ),
        ("engine   --port  8000", ("engine", "--port", "8000")),
        (["engine", "--name", "a b", "'q'"], ("engine", "--name", "a b", "'q'")),
    ],
)
def test_cmd_split_like_a_shell_or_kept_as_a_list(cmd: object, words: tuple[str, ...]) -> None:
    assert parse(models={"m": model(cmd=cmd)}).models["m"].cmd == words


@pytest.mark.parametrize(
    ("cmd", "problem"),
    [
        ("engine 'unclosed", "cannot be split into words: No closing quotation"),
        ("   ", "must not be empty"),
        ([], "must not be empty"),
        (["engine", 1], "must be a string or a list of strings"),
        (42, "must be a string or a list of strings"),
    ],
)
def test_bad_cmd(cmd: object, problem: str) -> None:
    error = refused(models={"m": model(cmd=cmd)})
    assert (error.source, error.key) == (SOURCE, "models.m.cmd")
    assert error.problem == problem


def test_command_is_split_too() -> None:
    spec = parse(models={"m": model(cmd=None, image="img", command="serve --x 'a b'")})
    assert spec.models["m"].command == ("serve", "--x", "a b")


@pytest.mark.parametrize("key", ["container", "image"])
def test_container_and_image_must_be_non_empty_strings(key: str) -> None:
    error = refused(models={"m": model(**{key: " "})})
    assert error.key == f"models.m.{key}"
    assert error.problem == "must be a non-empty string, got ' '"


def test_env_values_keep_their_yaml_spelling() -> None:
    settings = parse(models={"m": model(env={"FLAG": True, "N": 2, "NAME": "x"})})
    assert dict(settings.models["m"].env) == {"FLAG": "true", "N": "2", "NAME": "x"}
    error = refused(models={"m": model(env={"EMPTY": None})})
    assert (error.key, error.problem) == ("models.m.env", "must map names to strings or numbers")


def test_env_must_be_a_mapping() -> None:
    error = refused(models={"m": model(env=["A=1"])})
    assert error.key == "models.m.env"
    assert error.problem == "must map names to strings or numbers"


@pytest.mark.parametrize(
    ("simulated", "key", "problem"),
    [
        ({"devices": 0}, "simulated_gpu.devices", "must be >= 1, got 0"),
        ({"devices": 1.5}, "simulated_gpu.devices", "must be a whole number, got 1.5"),
        ({"total_gb": 0}, "simulated_gpu.total_gb", "must be >= 0.01, got 0"),
        (
            {"release_delay_seconds": -1},
            "simulated_gpu.release_delay_seconds",
            "must be >= 0, got -1",
        ),
    ],
)
def test_bad_simulated_gpu(simulated: dict[str, Any], key: str, problem: str) -> None:
    error = refused(simulated_gpu=simulated)
    assert (error.source, error.key, error.problem) == (SOURCE, key, problem)


def test_simulated_gpu_must_be_a_mapping() -> None:
    error = refused(simulated_gpu=[80])
    assert (error.key, error.problem) == ("simulated_gpu", "must be a mapping")


# --- files ---------------------------------------------------------------------------------


def test_invalid_yaml_reports_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: 127.0.0.1:8080\nmodels:\n  m: [unclosed\n  other: 1\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert (caught.value.source, caught.value.key) == (str(path), "")
    assert caught.value.problem == "is not valid YAML at line 4"


def test_tab_indentation_reports_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  m:\n\tsize_gb: 1\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert caught.value.problem == "is not valid YAML at line 3"


DUPLICATE_MODEL = """\
runtime: process
models:
  gpt-oss-20b:
    cmd: engine
    size_gb: 24
  llama:
    cmd: engine
    size_gb: 8
  gpt-oss-20b:
    cmd: engine
    size_gb: 40
"""


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        (DUPLICATE_MODEL, "models.gpt-oss-20b", "is defined twice (lines 3 and 9)"),
        (
            "models:\n  m:\n    cmd: e\n    size_gb: 1\n    size_gb: 2\n",
            "models.m.size_gb",
            "is defined twice (lines 4 and 5)",
        ),
        (
            "models:\n  m: {cmd: e, size_gb: 1, size_gb: 2}\n",
            "models.m.size_gb",
            "is defined twice (line 2)",
        ),
        (
            "gpu: nvml\nmodels:\n  m: {cmd: e, size_gb: 1}\ngpu: simulated\n",
            "gpu",
            "is defined twice (lines 1 and 4)",
        ),
        (
            "models:\n  m: {cmd: e, size_gb: 1, env: {A: x, B: y, A: z}}\n",
            "models.m.env.A",
            "is defined twice (line 2)",
        ),
        (
            "models:\n  m: {cmd: e, size_gb: 1}\n  'm': {cmd: e, size_gb: 2}\n",
            "models.m",
            "is defined twice (lines 2 and 3)",
        ),
        (
            "models:\n  m:\n    cmd: e\n    size_gb: 1\n    ports: [{a: 1, a: 2}]\n",
            "models.m.ports[0].a",
            "is defined twice (line 5)",
        ),
    ],
    ids=["model", "model-key", "flow-mapping", "top-level", "env", "quoted", "in-a-list"],
)
def test_a_key_defined_twice_is_refused(tmp_path: Path, text: str, key: str, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert (caught.value.source, caught.value.key, caught.value.problem) == (
        str(path),
        key,
        problem,
    )


def test_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    text = (
        "models:\n"
        "  a: &a {cmd: engine, size_gb: 1, env: &env {X: '1', Y: '1'}}\n"
        "  b: &b {<<: *a, size_gb: 2}\n"
        "  c: {<<: [*b], size_gb: 3, env: {<<: *env, X: '3'}}\n"
    )
    settings = load_settings(write(tmp_path, text), {})
    assert [s.size_gb for s in settings.models.values()] == [1.0, 2.0, 3.0]
    assert dict(settings.models["c"].env) == {"X": "3", "Y": "1"}
    assert settings.models["b"].cmd == ("engine",)


def test_only_safe_yaml_is_loaded(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  m: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert caught.value.problem == "is not valid YAML at line 2"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert (caught.value.source, caught.value.key) == (str(path), "")
    assert caught.value.problem == "cannot be read: No such file or directory"


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("models:\n  caf\xe9: {cmd: x, size_gb: 1}\n".encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert caught.value.source == str(path)


def test_empty_file_reports_missing_models(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert (caught.value.source, caught.value.key) == (str(path), "models")


def test_error_in_file_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  m: {cmd: engine, size_gb: -2}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert str(caught.value) == f"{path}: models.m.size_gb: must be >= 0, got -2"


def test_load_reads_keys_from_given_environ(tmp_path: Path) -> None:
    path = write(tmp_path, "api_keys: [a]\nmodels:\n  m: {cmd: engine, size_gb: 1}\n")
    assert load_settings(path, {"SWITCHD_API_KEYS": "b"}).api_keys == ("a", "b")


def test_load_defaults_to_process_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHD_API_KEYS", "from-env")
    path = write(tmp_path, "models:\n  m: {cmd: engine, size_gb: 1}\n")
    assert load_settings(path).api_keys == ("from-env",)


def test_gpu_count_asks_for_any_n_devices() -> None:
    two = {"total_gb": 48, "devices": 2}
    spec = parse(gpu="simulated", simulated_gpu=two, models={"m": model(gpu_count=2)}).models["m"]
    assert (spec.gpus, spec.docker.gpu_count) == (None, 2)
    error = refused(gpu="simulated", models={"m": model(gpu_count=1, gpus=[0])})
    assert (error.key, error.problem) == (
        "models.m.gpu_count",
        "give `gpus` (devices or a count) or `gpu_count`",
    )


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        (
            {"gpus": [0]},
            "60 GB over 1 device(s) is 60.00 GB on each, more than one 48.00 GB card of "
            "the simulated GPU holds",
        ),
        (
            {"gpu_count": 1},
            "60 GB over 1 device(s) is 60.00 GB on each, more than one 48.00 GB card of "
            "the simulated GPU holds",
        ),
    ],
)
def test_a_share_per_device_larger_than_one_card_is_refused(
    settings: dict[str, Any], problem: str
) -> None:
    two = {"total_gb": 48, "devices": 2}
    error = refused(gpu="simulated", simulated_gpu=two, models={"m": model(size_gb=60, **settings)})
    assert (error.key, error.problem) == ("models.m.size_gb", problem)
    # Split over both cards (no `gpus`: every device), 30 GB each fits.
    assert parse(gpu="simulated", simulated_gpu=two, models={"m": model(size_gb=60)})


def test_gb_per_device_is_a_need_per_device_no_larger_than_a_card() -> None:
    two = {"total_gb": 48, "devices": 2}
    spec = parse(gpu="simulated", simulated_gpu=two, models={"m": model(gb_per_device=30)})
    assert spec.models["m"].gb_per_device == 30.0
    error = refused(gpu="simulated", simulated_gpu=two, models={"m": model(gb_per_device=50)})
    assert (error.key, error.problem) == (
        "models.m.gb_per_device",
        "50 GB is more than one 48.00 GB card of the simulated GPU holds",
    )


# --- standby tiers -------------------------------------------------------------------------

TIERS = "sleep1 | sleep2 | release"


def test_no_standby_means_stop_only() -> None:
    spec = parse().models["m"]
    assert (spec.standby, spec.weights_gb, spec.wake_check_path) == ((), None, "/v1/completions")
    assert parse(models={"m": model(standby=[])}).models["m"].standby == ()


@pytest.mark.parametrize(
    ("standby", "tiers"),
    [
        (["sleep1"], (Tier.SLEEP1,)),
        (["sleep2"], (Tier.SLEEP2,)),
        (["sleep1", "sleep2"], (Tier.SLEEP1, Tier.SLEEP2)),
        (["sleep2", "sleep1"], (Tier.SLEEP1, Tier.SLEEP2)),  # kept in Tier order
        (["release"], (Tier.RELEASE,)),
    ],
)
def test_standby_tiers(standby: list[str], tiers: tuple[Tier, ...]) -> None:
    assert parse(models={"m": model(standby=standby)}).models["m"].standby == tiers


def test_standby_from_a_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "models:\n"
        "  m:\n"
        "    cmd: engine\n"
        "    size_gb: 20\n"
        "    standby: [sleep2, sleep1]\n"
        "    weights_gb: 16\n"
        "    wake_check_path: /v1/chat/completions\n"
        "standby_host_ram_gb: 64\n",
    )
    settings = load_settings(path, {})
    spec = settings.models["m"]
    assert (spec.standby, spec.weights_gb, spec.wake_check_path) == (
        (Tier.SLEEP1, Tier.SLEEP2),
        16.0,
        "/v1/chat/completions",
    )
    assert settings.standby_host_ram_gb == 64.0


@pytest.mark.parametrize(
    ("standby", "problem"),
    [
        (["sleep3"], f"unknown tier 'sleep3' (known: {TIERS})"),
        (["sleep1", "Sleep2"], f"unknown tier 'Sleep2' (known: {TIERS})"),
        (["sleep1", "sleep1"], "lists 'sleep1' twice"),
        (["release", "release"], "lists 'release' twice"),
        ("sleep1", f"must be a list of tiers ({TIERS}), got 'sleep1'"),
        ([1], f"must be a list of tiers ({TIERS}), got [1]"),
        ({"sleep1": True}, f"must be a list of tiers ({TIERS}), got {{'sleep1': True}}"),
        (
            ["release", "sleep1"],
            "`release` is SGLang's, `sleep1`/`sleep2` vLLM's: one engine has one kind",
        ),
        (
            ["sleep2", "release"],
            "`release` is SGLang's, `sleep1`/`sleep2` vLLM's: one engine has one kind",
        ),
    ],
)
def test_bad_standby(standby: object, problem: str) -> None:
    error = refused(models={"m": model(standby=standby)})
    assert (error.source, error.key, error.problem) == (SOURCE, "models.m.standby", problem)
    assert str(error) == f"{SOURCE}: models.m.standby: {problem}"


def test_weights_gb() -> None:
    assert parse(models={"m": model(weights_gb=12.5)}).models["m"].weights_gb == 12.5
    assert parse(models={"m": model(weights_gb=0.01)}).models["m"].weights_gb == 0.01


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (0, "must be >= 0.01, got 0"),
        (-3, "must be >= 0.01, got -3"),
        ("16", "must be a number, got '16'"),
        (True, "must be a number, got True"),
    ],
)
def test_bad_weights_gb(value: object, problem: str) -> None:
    error = refused(models={"m": model(weights_gb=value)})
    assert (error.key, error.problem) == ("models.m.weights_gb", problem)


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/chat/completions", "/generate"])
def test_wake_check_path(path: str) -> None:
    assert parse(models={"m": model(wake_check_path=path)}).models["m"].wake_check_path == path


def test_a_null_wake_check_path_takes_the_default() -> None:
    spec = parse(models={"m": {**model(), "wake_check_path": None}}).models["m"]
    assert spec.wake_check_path == "/v1/completions"


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("v1/completions", "must start with '/', got 'v1/completions'"),
        ("http://x/v1/completions", "must start with '/', got 'http://x/v1/completions'"),
        (" ", "must be a non-empty string, got ' '"),
        (7, "must be a non-empty string, got 7"),
    ],
)
def test_bad_wake_check_path(path: object, problem: str) -> None:
    error = refused(models={"m": model(wake_check_path=path)})
    assert (error.source, error.key, error.problem) == (SOURCE, "models.m.wake_check_path", problem)


def test_standby_host_ram_gb() -> None:
    assert parse().standby_host_ram_gb is None  # half of MemAvailable at start
    assert parse(standby_host_ram_gb=48).standby_host_ram_gb == 48.0
    assert parse(standby_host_ram_gb=0).standby_host_ram_gb == 0.0  # no level-1 sleeps


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (-1, "must be >= 0, got -1"),
        ("lots", "must be a number, got 'lots'"),
        (float("inf"), "must be a finite number, got inf"),
    ],
)
def test_bad_standby_host_ram_gb(value: object, problem: str) -> None:
    error = refused(standby_host_ram_gb=value)
    assert (error.source, error.key, error.problem) == (SOURCE, "standby_host_ram_gb", problem)


def test_simulated_sleep_residue() -> None:
    assert parse().simulated_gpu.sleep_residue_gb == 1.5
    simulated = parse(simulated_gpu={"sleep_residue_gb": 0.75}).simulated_gpu
    assert simulated == SimulatedGpuSettings(sleep_residue_gb=0.75)
    assert parse(simulated_gpu={"sleep_residue_gb": 0}).simulated_gpu.sleep_residue_gb == 0.0


@pytest.mark.parametrize(
    ("value", "problem"),
    [(-1, "must be >= 0, got -1"), ("1.5", "must be a number, got '1.5'")],
)
def test_bad_simulated_sleep_residue(value: object, problem: str) -> None:
    error = refused(simulated_gpu={"sleep_residue_gb": value})
    assert (error.key, error.problem) == ("simulated_gpu.sleep_residue_gb", problem)


def test_load_progress_in_stream_is_off_unless_asked_globally_or_per_model() -> None:
    settings = parse()
    assert settings.load_progress_in_stream is False
    assert settings.models["m"].load_progress_in_stream is None  # as the global says
    on = parse(load_progress_in_stream=True, models={"m": model(load_progress_in_stream=False)})
    assert on.load_progress_in_stream is True
    assert on.models["m"].load_progress_in_stream is False


def test_a_bad_load_progress_in_stream_is_refused() -> None:
    error = refused(load_progress_in_stream="yes")
    assert (error.key, error.problem) == (
        "load_progress_in_stream",
        "must be true or false, got 'yes'",
    )
    error = refused(models={"m": model(load_progress_in_stream=1)})
    assert (error.key, error.problem) == (
        "models.m.load_progress_in_stream",
        "must be true or false, got 1",
    )


def test_settings_built_in_code_get_the_files_state_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    from_file = parse_settings({"models": {"m": model()}}, SOURCE, {})
    in_code = Settings(models=from_file.models)
    assert in_code.state_dir == from_file.state_dir == tmp_path / ".local" / "state" / "switchd"
    assert Settings(models={}, state_dir=Path("~/elsewhere")).state_dir == tmp_path / "elsewhere"


# --- model metadata --------------------------------------------------------------------------


def test_context_length_and_capabilities() -> None:
    spec = parse(models={"m": model()}).models["m"]
    assert (spec.context_length, spec.capabilities) == (None, None)
    spec = parse(
        models={"m": model(context_length=32768, capabilities=["chat", "tools", "vision"])}
    ).models["m"]
    assert spec.context_length == 32768
    assert spec.capabilities == (Capability.CHAT, Capability.TOOLS, Capability.VISION)


CAPABILITIES = "chat | completion | embeddings | vision | tools"


@pytest.mark.parametrize(
    ("capabilities", "problem"),
    [
        (["chat", "audio"], f"unknown 'audio' (known: {CAPABILITIES})"),
        (["chat", "chat"], "lists 'chat' twice"),
        ("chat", f"must be a list of ({CAPABILITIES}), got 'chat'"),
    ],
)
def test_bad_capabilities(capabilities: object, problem: str) -> None:
    error = refused(models={"m": model(capabilities=capabilities)})
    assert (error.key, error.problem) == ("models.m.capabilities", problem)


def test_context_length_is_a_positive_whole_number() -> None:
    assert refused(models={"m": model(context_length=0)}).key == "models.m.context_length"
    assert refused(models={"m": model(context_length=1.5)}).key == "models.m.context_length"
