"""The demo's catalogs: each one loads, and the 2-card one is planned per card."""

from __future__ import annotations

from switchd.cli import demo_config
from switchd.config import load_settings


def test_the_one_card_demo() -> None:
    settings = load_settings(demo_config())
    assert (settings.simulated_gpu.devices, settings.simulated_gpu.total_gb) == (1, 95.59)
    assert sorted(settings.models) == [
        "deepseek-coder-33b-instruct",
        "gpt-oss-120b",
        "gpt-oss-20b",
        "mistral-7b-v0.1",
    ]


def test_the_two_card_demo_splits_the_big_model_and_places_the_others() -> None:
    settings = load_settings(demo_config(gpus=2))
    assert (settings.simulated_gpu.devices, settings.simulated_gpu.total_gb) == (2, 47.79)
    assert settings.models["gpt-oss-120b"].gpus == (0, 1)
    for name in ("gpt-oss-20b", "deepseek-coder-33b-instruct", "mistral-7b-v0.1"):
        assert settings.models[name].gpus is None
        assert settings.models[name].docker.gpu_count == 1
