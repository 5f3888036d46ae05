"""What a first run showed: the memory chart starts full on a page load (switchd's own
samples), and switches that found their model serving already are one line in the
history, with their count, rather than a list of no-ops."""

from __future__ import annotations

import re
import time

import httpx
from playwright.sync_api import Page, expect

from tests.browser.conftest import API_KEY, WAIT_MS, open_live, wait_until_idle
from tests.integration.server import Server

TARGET = "gpt-oss-20b"


def switch(api: httpx.Client, model: str) -> None:
    response = api.post("/v1/models/switch", params={"target_model": model, "wait": "ready"})
    assert response.status_code == 200, response.text


def test_the_memory_chart_starts_with_switchds_recent_samples(
    page: Page, ui_server: Server, api: httpx.Client
) -> None:
    deadline = time.monotonic() + 30
    while len(api.get("/v1/gpu/history").json()["samples"]) < 4:  # 2 s apart: 6 s of them
        assert time.monotonic() < deadline, "switchd keeps no memory samples"
        time.sleep(0.2)
    open_live(page, ui_server.url, API_KEY)
    # x = 1000 is now, 300 s per 1000 units. The line must begin at least 4 s before the
    # page itself was opened (performance.now(): ms since then): samples the page could
    # not have taken, switchd's (read after the page's first status, so waited for).
    page.wait_for_function(
        """() => {
          const path = document.querySelector("#memory-chart path.line");
          const d = path ? path.getAttribute("d") || "" : "";
          const before = performance.now() / 1000 + 4;
          return d.startsWith("M ") && Number(d.split(" ")[1]) < 1000 - (before * 1000) / 300;
        }""",
        timeout=WAIT_MS,
    )
    d = page.locator("#memory-chart path.line").first.get_attribute("d") or ""
    assert d.count(" L ") + d.count("L ") >= 3, d


def test_no_op_switches_are_one_line_with_their_count(
    page: Page, ui_server: Server, api: httpx.Client
) -> None:
    wait_until_idle(api)
    switch(api, TARGET)  # a load, unless it ran already
    for _ in range(3):
        switch(api, TARGET)  # serving: nothing to do
    open_live(page, ui_server.url, API_KEY)
    items = page.locator("#history > li")
    newest = items.first
    expect(newest).to_have_class(re.compile(r"\bnoop\b"), timeout=WAIT_MS)
    expect(newest.locator(".from-to")).to_have_text(f"{TARGET} was serving already")
    expect(newest.locator(".repeat")).to_have_text("\N{MULTIPLICATION SIGN}3")
    expect(newest.locator(".stage-bar")).to_have_count(0)
    # The one that loaded it (or an earlier test's job) is the next line: no-ops took one.
    expect(items.nth(1)).not_to_have_class(re.compile(r"\bnoop\b"), timeout=WAIT_MS)
    assert items.count() <= 8
