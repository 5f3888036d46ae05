"""The JSON Schema of switchd.yaml: current, and agreeing with the parser on every file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from switchd.cli import main
from switchd.config import ConfigError, Settings, load_settings, parse_settings
from switchd.schema import config_schema, schema_text

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_FILE = ROOT / "docs" / "switchd.schema.json"
SOURCE = "test.yaml"


def validator() -> Draft202012Validator:
    return Draft202012Validator(config_schema())


def compose_config() -> Path:
    """The file compose.yaml mounts where its switchd service reads its config."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))
    switchd = compose["services"]["switchd"]
    target = switchd["command"][-1]
    mounts: list[str] = [v for v in switchd["volumes"] if v.split(":")[1] == target]
    (mount,) = mounts
    return (ROOT / mount.split(":")[0]).resolve()


SHIPPED = [
    *sorted((ROOT / "examples").glob("*.yaml")),
    *sorted((ROOT / "switchd" / "demo").glob("*.yaml")),
    compose_config(),
]


def parse(data: dict[str, Any]) -> Settings:
    return parse_settings(data, SOURCE, {})


def model(**extra: Any) -> dict[str, Any]:
    return {"cmd": "engine --port 8000", "size_gb": 10, **extra}


def with_models(**data: Any) -> dict[str, Any]:
    return {"models": {"m": model()}, **data}


# --- the published file ------------------------------------------------------------------


def test_the_committed_schema_is_current() -> None:
    assert SCHEMA_FILE.read_text(encoding="utf-8") == schema_text(), (
        "docs/switchd.schema.json is out of date: "
        "run `switchd config-schema > docs/switchd.schema.json`"
    )


def test_switchd_config_schema_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config-schema"]) == 0
    out = capsys.readouterr().out
    assert out == schema_text()
    assert json.loads(out) == config_schema()


def test_it_is_a_draft_2020_12_schema() -> None:
    schema = config_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)  # raises SchemaError


# --- the schema's keys and defaults are the parser's ---------------------------------------


def known_keys_in_error(data: dict[str, Any]) -> set[str]:
    with pytest.raises(ConfigError) as caught:
        parse(data)
    listed = caught.value.problem.removeprefix("unknown key (known keys: ")
    assert listed != caught.value.problem
    return set(listed.removesuffix(")").split(", "))


def test_each_mapping_has_the_keys_the_parser_knows() -> None:
    top = config_schema()["properties"]
    models = top["models"]["additionalProperties"]["properties"]
    simulated = top["simulated_gpu"]["properties"]
    assert known_keys_in_error(with_models(zzz=1)) == set(top)
    assert known_keys_in_error({"models": {"m": model(zzz=1)}}) == set(models)
    assert known_keys_in_error(with_models(simulated_gpu={"zzz": 1})) == set(simulated)
    assert "listen" in top
    assert {"host", "port", "source"}.isdisjoint(top)
    assert {"volumes", "port", "gpu_count"} <= set(models)  # DockerOptions' keys sit flat
    assert {"name", "docker"}.isdisjoint(models)


def defaults(schema: dict[str, Any]) -> dict[str, Any]:
    return {k: p["default"] for k, p in schema["properties"].items() if "default" in p}


def test_the_schema_shows_the_defaults_the_parser_applies() -> None:
    top = config_schema()["properties"]
    shown = defaults(config_schema())
    assert shown["listen"] == "127.0.0.1:8080"
    assert shown["state_dir"] == "~/.local/state/switchd"
    assert shown["drain_timeout_seconds"] == 30.0
    plain = parse(with_models())
    for name, value in shown.items():
        assert parse(with_models(**{name: value})) == plain, name
    for name, value in defaults(top["simulated_gpu"]).items():
        assert parse(with_models(simulated_gpu={name: value})) == plain, name
    for name, value in defaults(top["models"]["additionalProperties"]).items():
        assert parse({"models": {"m": model(**{name: value})}}) == plain, name


# --- files both accept and files both refuse -------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_validates(path: Path) -> None:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert [error.message for error in validator().iter_errors(document)] == []
    assert load_settings(path, {}).models


def test_the_shipped_configs_are_all_there() -> None:
    names = {path.relative_to(ROOT).as_posix() for path in SHIPPED}
    assert names == {
        "examples/process.yaml",
        "examples/switchd.yaml",
        "switchd/demo/demo.yaml",
        "switchd/demo/demo-2gpu.yaml",
    }


@pytest.mark.parametrize(
    "data",
    [
        with_models(api_keys=None, simulated_gpu=None, cors_allow_origins=None),
        with_models(listen="[::1]:9000", cors_allow_origins=["*", "https://ui.example.com"]),
        with_models(gpu="simulated", simulated_gpu={"devices": 2, "total_gb": 48}),
        {"models": {"m": model(gpus="all", health_path=None, env={"A": 1, "B": True})}},
        {"models": {"m": model(gpus=2, standby=["sleep2", "sleep1"], weights_gb=4)}},
        {"models": {"m": model(gpus=[0, 1], aliases=["a"], url="https://e:1/")}},
        {"models": {"m": {"image": "i", "size_gb": 1, "gpu_count": 1, "ports": ["1:2"]}}},
        {"models": {"m": {"container": "c", "size_gb": 0, "standby": ["release"]}}},
        {"models": {"Qwen/Qwen3-8B": model(), "llama3.1:8b": model(priority=-1000)}},
    ],
)
def test_files_both_accept(data: dict[str, Any]) -> None:
    assert [error.message for error in validator().iter_errors(data)] == []
    assert parse(data).models


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (with_models(listn="127.0.0.1:8080"), "listn"),
        ({}, "models"),
        ({"models": {}}, "models"),
        (with_models(listen="localhost"), "listen"),
        (with_models(drain_timeout_seconds=-5), "drain_timeout_seconds"),
        (with_models(health_timeout_seconds=0), "health_timeout_seconds"),
        (with_models(max_connections=1.5), "max_connections"),
        (with_models(auto_switch="yes"), "auto_switch"),
        (with_models(runtime="kubernetes"), "runtime"),
        (with_models(api_keys=[""]), "api_keys"),
        (with_models(cors_allow_origins=["ui.example.com"]), "cors_allow_origins"),
        (with_models(simulated_gpu={"total": 80}), "simulated_gpu.total"),
        (with_models(simulated_gpu={"devices": 0}), "simulated_gpu.devices"),
        ({"models": {"all": model()}}, "models.all"),
        ({"models": {"my model": model()}}, "models"),
        ({"models": {"m": {"cmd": "e"}}}, "models.m.size_gb"),
        ({"models": {"m": {"size_gb": 1}}}, "models.m"),
        ({"models": {"m": {"container": "c", "image": "i", "size_gb": 1}}}, "models.m"),
        ({"models": {"m": model(foo=1)}}, "models.m.foo"),
        ({"models": {"m": model(standby=["release", "sleep1"])}}, "models.m.standby"),
        ({"models": {"m": model(standby=["sleep1", "sleep1"])}}, "models.m.standby"),
        ({"models": {"m": model(gpus=[0], gpu_count=1)}}, "models.m.gpu_count"),
        ({"models": {"m": model(gpus=[])}}, "models.m.gpus"),
        ({"models": {"m": model(port=0)}}, "models.m.port"),
        ({"models": {"m": model(wake_check_path="v1")}}, "models.m.wake_check_path"),
        ({"models": {"m": model(url="ftp://x")}}, "models.m.url"),
        ({"models": {"m": model(aliases="x")}}, "models.m.aliases"),
        ({"models": {"m": model(weights_gb=0)}}, "models.m.weights_gb"),
        ({"models": {"m": model(priority=-1001)}}, "models.m.priority"),
    ],
)
def test_files_both_refuse(data: dict[str, Any], key: str) -> None:
    assert list(validator().iter_errors(data)) != []
    with pytest.raises(ConfigError) as caught:
        parse(data)
    assert caught.value.key == key
