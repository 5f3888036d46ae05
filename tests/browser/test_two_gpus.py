"""The UI on a host of two GPUs: one bar per card, each showing what is on that card."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, expect

from tests.browser.conftest import WAIT_MS
from tests.integration.server import Server, engine_cmd, write_config

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture(scope="module")
def two_gpu_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    models = {
        "gpt-oss-120b": {"cmd": engine_cmd(0.3), "size_gb": 80, "gpus": [0, 1]},
        "gpt-oss-20b": {"cmd": engine_cmd(0.3), "size_gb": 30, "gpu_count": 1},
        "mistral-7b-v0.1": {"cmd": engine_cmd(0.3), "size_gb": 24, "gpu_count": 1},
    }
    server = write_config(
        tmp_path_factory.mktemp("two-gpus"),
        models,
        simulated_gpu={"total_gb": 47.79, "devices": 2},
    )
    server.start()
    yield server
    server.stop()


def test_each_card_shows_the_models_placed_on_it(browser: Browser, two_gpu_server: Server) -> None:
    with httpx.Client(base_url=two_gpu_server.url, timeout=30) as api:
        for model in ("gpt-oss-20b", "mistral-7b-v0.1"):
            switched = api.post(
                "/v1/models/switch", params={"target_model": model, "wait": "ready"}
            )
            assert switched.status_code == 200, switched.text
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    try:
        page.goto(two_gpu_server.url + "/", timeout=WAIT_MS)
        bars = page.locator("#devices .device .bar")
        expect(bars).to_have_count(2, timeout=WAIT_MS)
        # 30 + 24 GB do not fit on one 47.79 GB card: mistral was placed on the other.
        expect(bars.nth(0)).to_contain_text("gpt-oss-20b 30.0 GB", timeout=WAIT_MS)
        expect(bars.nth(1)).to_contain_text("mistral-7b-v0.1 24.0 GB", timeout=WAIT_MS)
        expect(bars.nth(0)).not_to_contain_text("mistral", timeout=WAIT_MS)
        expect(bars.nth(1)).not_to_contain_text("gpt-oss-20b", timeout=WAIT_MS)
        # The models table says where each model runs, or may run.
        devices = page.locator("#models .devices")
        row = '#models tr[data-model="{}"] .devices'
        expect(page.locator(row.format("gpt-oss-20b"))).to_have_text("on GPU 0", timeout=WAIT_MS)
        expect(page.locator(row.format("mistral-7b-v0.1"))).to_have_text("on GPU 1")
        expect(page.locator(row.format("gpt-oss-120b"))).to_have_text("on GPUs 0, 1")
        expect(devices).to_have_count(3)
        page.screenshot(path=str(DOCS / "two-gpus.png"), full_page=True)
    finally:
        context.close()
