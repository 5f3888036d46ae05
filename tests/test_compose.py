"""compose.yaml, the Dockerfile and examples/switchd.yaml agree with each other."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from switchd.config import RuntimeKind, load_settings

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_compose_file_validates() -> None:
    env = {**os.environ, "SWITCHD_API_KEYS": "k"}
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "compose.yaml"), "--profile", "engines", "config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert set(services) == {
        "switchd",
        "vllm-gpt-oss-120b",
        "vllm-gpt-oss-20b",
        "vllm-deepseek-coder-33b-instruct",
        "vllm-mistral-7b-v0.1",
    }


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_compose_refuses_to_run_switchd_without_api_keys() -> None:
    env = {k: v for k, v in os.environ.items() if k != "SWITCHD_API_KEYS"}
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "compose.yaml"), "config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "set SWITCHD_API_KEYS" in result.stderr


def test_switchd_service_reaches_docker_and_nvml_and_reports_health() -> None:
    switchd = compose()["services"]["switchd"]
    assert "/var/run/docker.sock:/var/run/docker.sock" in switchd["volumes"]
    assert "./examples/switchd.yaml:/etc/switchd/switchd.yaml:ro" in switchd["volumes"]
    assert switchd["environment"]["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    devices = switchd["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["utility"]}]
    assert "8080:8080" in switchd["ports"]
    assert "/health" in " ".join(switchd["healthcheck"]["test"])
    assert switchd["group_add"] == ["${DOCKER_GID:-999}"]


def test_engines_are_created_not_started_and_reserve_the_gpu() -> None:
    services = compose()["services"]
    engines = {name: s for name, s in services.items() if name != "switchd"}
    for name, engine in engines.items():
        assert engine["profiles"] == ["engines"], name
        assert engine["container_name"] == name
        devices = engine["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"], name
        assert engine["restart"] == "no", name


def test_example_config_names_the_compose_containers() -> None:
    settings = load_settings(ROOT / "examples" / "switchd.yaml", {})
    assert settings.runtime is RuntimeKind.DOCKER
    services = compose()["services"]
    for spec in settings.models.values():
        assert spec.container in services, spec.name
        assert spec.url == f"http://{spec.container}:8000"
        command = services[spec.container]["command"]
        assert command[command.index("--served-model-name") + 1] == spec.name


def test_image_runs_switchd_as_a_non_root_user_on_the_mounted_config() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users
    assert users[-1] not in ("root", "0")
    assert 'CMD ["serve", "--config", "/etc/switchd/switchd.yaml"]' in lines
    assert compose()["services"]["switchd"]["command"][-1] == "/etc/switchd/switchd.yaml"
