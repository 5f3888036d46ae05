"""At 360 px the page shows the same facts as on a desktop: each model a card of
labelled fields, and GPU bar labels that do not fit moved to a legend under the bar."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import (
    API_KEY,
    WAIT_MS,
    JsErrors,
    check_screenshot,
    horizontal_scroll_width,
    open_live,
    wait_until_idle,
)
from tests.integration.server import Server

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "narrow-360.png"
WIDTH = 360

# Bar segments that show their label, and those whose label was moved to the legend.
SEGMENTS = """() => {
  const spans = [...document.querySelectorAll('#devices .bar > span')];
  return {
    clipped: spans.filter((s) => !s.classList.contains('narrow') && s.scrollWidth > s.clientWidth)
      .map((s) => s.textContent),
    moved: spans.filter((s) => s.classList.contains('narrow') && !s.dataset.sleeping)
      .map((s) => s.dataset.name),
    shown: spans.filter((s) => !s.classList.contains('narrow')).map((s) => s.dataset.name),
  };
}"""


def label_of(page: Page, selector: str) -> str:
    """The label CSS puts before a cell of a model's card."""
    content: str = page.eval_on_selector(selector, "el => getComputedStyle(el, '::before').content")
    return content.strip('"')


def test_360_px_shows_every_fact_without_sideways_scroll(
    page: Page, ui_server: Server, api: httpx.Client
) -> None:
    wait_until_idle(api)
    for model in ("gpt-oss-20b", "mistral-7b-v0.1"):
        response = api.post("/v1/models/switch", params={"target_model": model, "wait": "ready"})
        assert response.status_code == 200, response.text
    models = wait_until_idle(api)["models"]
    page.set_viewport_size({"width": WIDTH, "height": 800})
    open_live(page, ui_server.url, API_KEY)
    rows = page.locator("#models tbody tr")
    expect(rows).to_have_count(len(models), timeout=WAIT_MS)
    expect(page.locator("#history > li")).to_have_count(2, timeout=WAIT_MS)
    assert horizontal_scroll_width(page) <= WIDTH

    # Every model: its status, size and load time, labelled and inside the screen.
    for name, model in models.items():
        row = page.locator(f'#models tr[data-model="{name}"]')
        expect(row.locator(".status")).to_have_text(model["status"], timeout=WAIT_MS)
        expected = {
            "Status": model["status"],
            "Size": re.compile(r"^[\d.]+ GB$"),
            "Load time": re.compile(r"^~[\d.]+ s$"),
        }
        for label, text in expected.items():
            selector = f'#models tr[data-model="{name}"] td[data-label="{label}"]'
            cell = page.locator(selector)
            expect(cell).to_be_visible(timeout=WAIT_MS)
            expect(cell).to_have_text(text, timeout=WAIT_MS)
            assert label_of(page, selector) == label
            box = cell.bounding_box()
            assert box is not None
            assert box["x"] >= 0, (name, label, box)
            assert box["x"] + box["width"] <= WIDTH, (name, label, box)

    # No bar label cut: those that do not fit are in the legend, with their size.
    segments = page.evaluate(SEGMENTS)
    assert segments["clipped"] == []
    assert "mistral-7b-v0.1" in segments["moved"], segments
    legend = page.locator("#devices .bar-legend")
    expect(legend).to_be_visible(timeout=WAIT_MS)
    expect(legend.locator("li")).to_have_count(len(segments["moved"]), timeout=WAIT_MS)
    for name in segments["moved"]:
        held = models[name]["gpu_memory_used_gb"]
        expect(legend.locator(f'li[data-name="{name}"]')).to_have_text(
            f"{name} {held:.1f} GB", timeout=WAIT_MS
        )
    for name in ("gpt-oss-20b", "mistral-7b-v0.1"):
        assert name in segments["moved"] + segments["shown"], segments

    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True, timeout=WAIT_MS)
    check_screenshot(SCREENSHOT)

    # Wider, the labels fit again: back in the bar, and the legend goes.
    page.set_viewport_size({"width": 1100, "height": 900})
    expect(legend).to_be_hidden(timeout=WAIT_MS)
    mistral = page.locator('#devices .bar > span[data-name="mistral-7b-v0.1"]')
    expect(mistral).not_to_have_class(re.compile(r"\bnarrow\b"), timeout=WAIT_MS)
    assert page.evaluate(SEGMENTS)["clipped"] == []


# Last, so it covers every page above.
def test_no_javascript_errors(js_errors: JsErrors) -> None:
    if js_errors.pages == 0:
        pytest.skip("no test that opens a page was selected")
    assert js_errors.errors == []
