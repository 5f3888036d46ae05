"""Standby tiers in the UI: a model put to sleep instead of stopped, and woken again.

Two models that do not fit together on the simulated 95.59 GB card, both with vLLM's
sleep mode (the demo engine's). Loads take about 2 s, so that a level-1 wake, as switchd
estimates it before one is measured, beats the cold load (else it stops the model).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Locator, Page, expect

from tests.browser.conftest import WAIT_MS, JsErrors, check_screenshot
from tests.integration.server import Server, engine_cmd, write_config

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "sleeping.png"
SLEEPY = ("--enable-sleep-mode", "--sleep-seconds", "0.05", "--wake-seconds", "0.05")


@pytest.fixture(scope="module")
def standby_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    def model(size_gb: float) -> dict[str, object]:
        return {
            "cmd": engine_cmd(2.0, *SLEEPY),
            "size_gb": size_gb,
            "load_time_seconds": 2,
            "standby": ["sleep1", "sleep2"],
        }

    server = write_config(
        tmp_path_factory.mktemp("standby"),
        {"big": model(80), "small": model(24)},
        standby_host_ram_gb=200,
        simulated_gpu={"total_gb": 95.59, "release_delay_seconds": 0.2},
    )
    server.start()
    yield server
    server.stop()


def switch_in_page(page: Page, model: str) -> None:
    page.get_by_label("Model", exact=True).select_option(model, timeout=WAIT_MS)
    page.get_by_role("button", name="Switch", exact=True).click(timeout=WAIT_MS)


def wait_until_done(page: Page, first_line: str | re.Pattern[str]) -> None:
    """`first_line` is in this job's timeline only (it is emptied per job), so the
    `done` seen next is this job's, not the last one's."""
    expect(page.locator("#timeline")).to_contain_text(first_line, timeout=WAIT_MS)
    expect(page.locator("#banner")).to_have_class(re.compile(r"\bdone\b"), timeout=WAIT_MS)
    expect(page.locator("#progress-text")).to_have_text("100%", timeout=WAIT_MS)


def row(page: Page, model: str) -> Locator:
    return page.locator(f'#models tr[data-model="{model}"]')


def badge(page: Page, model: str) -> Locator:
    return row(page, model).locator(".status")


def option(page: Page, model: str) -> Locator:
    return page.locator(f'#model option[value="{model}"]')


def test_a_model_put_to_sleep_and_woken(page: Page, standby_server: Server) -> None:
    page.goto(standby_server.url + "/", timeout=WAIT_MS)
    expect(page.locator("#connection")).to_have_text("Live", timeout=WAIT_MS)
    expect(page.locator("#models tbody tr")).to_have_count(2, timeout=WAIT_MS)
    timeline = page.locator("#timeline")
    bar = page.locator("#devices .device .bar")
    sleeping_segment = bar.locator(".model.sleeping")

    # 1: big loads cold, with nothing to put aside.
    switch_in_page(page, "big")
    wait_until_done(page, "Starting big")
    expect(badge(page, "big")).to_have_text("running", timeout=WAIT_MS)

    # 2: small does not fit beside big: big is put to sleep, not stopped.
    switch_in_page(page, "small")
    wait_until_done(page, "Sleeping big (level 1)")
    expect(timeline).to_contain_text(
        re.compile(r"small needs 24\.00 GB; [\d.]+ GB free: sleeping big…"), timeout=WAIT_MS
    )
    expect(timeline).to_contain_text(
        re.compile(r"Sleeping big \(level 1\): wakes in ~[\d.]+ s instead of an? [\d.]+ s load"),
        timeout=WAIT_MS,
    )
    expect(timeline).to_contain_text(
        re.compile(r"big asleep \(level 1\): 78\.50 GB freed in [\d.]+ s, 1\.50 GB kept"),
        timeout=WAIT_MS,
    )
    expect(timeline).not_to_contain_text("Unloading big", timeout=WAIT_MS)
    expect(timeline).to_contain_text(
        re.compile(r"small is ready \(loaded in [\d.]+ s\)"), timeout=WAIT_MS
    )

    expect(badge(page, "small")).to_have_text("running", timeout=WAIT_MS)
    expect(badge(page, "big")).to_have_text("sleeping · level 1", timeout=WAIT_MS)
    expect(badge(page, "big")).to_have_attribute(
        "title", re.compile(r"wakes in ~[\d.]+ s"), timeout=WAIT_MS
    )
    expect(row(page, "big")).to_contain_text(re.compile(r"wakes in ~[\d.]+ s"), timeout=WAIT_MS)
    memory = row(page, "big").locator("td").nth(2)
    expect(memory).to_contain_text("1.50 GB", timeout=WAIT_MS)
    expect(memory).to_contain_text("asleep; 80.00 GB awake", timeout=WAIT_MS)
    expect(row(page, "small").locator("td").nth(2)).to_have_text("24.00 GB", timeout=WAIT_MS)

    expect(sleeping_segment).to_have_count(1, timeout=WAIT_MS)
    expect(sleeping_segment).to_have_text("big asleep 1.5 GB", timeout=WAIT_MS)
    expect(bar.locator(".model.running")).to_have_text("small 24.0 GB", timeout=WAIT_MS)
    expect(bar).to_have_attribute("aria-label", re.compile("big asleep 1.5 GB"), timeout=WAIT_MS)
    expect(page.locator("#devices .bar-note")).to_contain_text(
        re.compile(r"big asleep \(level 1\): 1\.5 GB kept, wakes in ~[\d.]+ s"), timeout=WAIT_MS
    )
    expect(page.locator("#devices .device-label")).to_contain_text(
        "25.50 of 95.59 GB used", timeout=WAIT_MS
    )
    expect(option(page, "big")).to_have_text("big (sleeping)", timeout=WAIT_MS)

    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True, timeout=WAIT_MS)
    check_screenshot(SCREENSHOT)
    page.set_viewport_size({"width": 360, "height": 800})  # the notes fit a phone too
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= 360, f"the page scrolls sideways: {width} px wide"
    page.set_viewport_size({"width": 1100, "height": 900})

    # 3: back to big: it is woken, not loaded; small goes to sleep in its turn.
    switch_in_page(page, "big")
    wait_until_done(page, "Waking big (level 1)")
    expect(timeline).to_contain_text(
        re.compile(r"big needs [\d.]+ GB; [\d.]+ GB free: sleeping small…"), timeout=WAIT_MS
    )
    expect(timeline).to_contain_text(
        re.compile(r"small asleep \(level 1\): 22\.50 GB freed in [\d.]+ s, 1\.50 GB kept"),
        timeout=WAIT_MS,
    )
    expect(timeline).to_contain_text(
        re.compile(r"Waking big \(level 1\): about [\d.]+ s instead of an? [\d.]+ s load…"),
        timeout=WAIT_MS,
    )
    expect(timeline).to_contain_text(
        re.compile(r"big woke in [\d.]+ s \(level 1\), taking back 78\.50 GB\."), timeout=WAIT_MS
    )
    expect(timeline).to_contain_text(
        re.compile(r"big is ready \(woke in [\d.]+ s\)"), timeout=WAIT_MS
    )
    expect(timeline).not_to_contain_text("Starting big", timeout=WAIT_MS)

    expect(badge(page, "big")).to_have_text("running", timeout=WAIT_MS)
    expect(row(page, "big").locator("td").nth(2)).to_have_text("80.00 GB", timeout=WAIT_MS)
    expect(badge(page, "small")).to_have_text("sleeping · level 1", timeout=WAIT_MS)
    expect(row(page, "small").locator("td").nth(2)).to_contain_text("1.50 GB", timeout=WAIT_MS)
    expect(sleeping_segment).to_have_count(1, timeout=WAIT_MS)
    expect(sleeping_segment).to_have_text("small asleep 1.5 GB", timeout=WAIT_MS)
    expect(bar.locator(".model.running")).to_have_text("big 80.0 GB", timeout=WAIT_MS)
    expect(option(page, "big")).to_have_text("big (running)", timeout=WAIT_MS)
    expect(option(page, "small")).to_have_text("small (sleeping)", timeout=WAIT_MS)
    expect(page.get_by_label("Message", exact=True)).to_be_enabled(timeout=WAIT_MS)


# Last, so it covers every page above.
def test_no_javascript_errors(js_errors: JsErrors) -> None:
    if js_errors.pages == 0:
        pytest.skip("no test that opens a page was selected")
    assert js_errors.errors == []
