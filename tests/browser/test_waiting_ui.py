"""While people wait: the Waiting view, queued switches, the history of switches, GPU
memory over time, cooling-down models and a page that lost its event stream.

A real switchd with demo engines on the simulated 95.59 GB card: `big` loads slowly
(4 s) so that requests and switches can pile up behind it; `small` does not fit beside
it, `mid` does; `wide` and `small` do not fit together; `broken` dies while loading.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Locator, Page, expect

from tests.browser.conftest import (
    WAIT_MS,
    JsErrors,
    check_screenshot,
    open_live,
    wait_until_idle,
)
from tests.integration.server import Server, engine_cmd, write_config

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "queue-and-history.png"
COOLDOWN_SECONDS = 120  # longer than the test: the line must not expire while it runs


def waiting_models() -> dict[str, Any]:
    def fast(size_gb: float) -> dict[str, Any]:
        return {"cmd": engine_cmd(0.5), "size_gb": size_gb, "load_time_seconds": 1}

    return {
        "big": {"cmd": engine_cmd(4.0), "size_gb": 80, "load_time_seconds": 4},
        "wide": fast(75),
        "small": fast(24),
        "mid": fast(10),
        "broken": {"cmd": engine_cmd(0.3, "--fail-after", "0.2"), "size_gb": 5},
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    started = write_config(
        tmp_path_factory.mktemp("waiting"),
        waiting_models(),
        min_residency_seconds=1,
        load_failure_cooldown_seconds=COOLDOWN_SECONDS,
    )
    started.start()
    yield started
    if started.process is not None and started.process.poll() is None:
        started.stop()


@pytest.fixture
def api(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def status_of(api: httpx.Client) -> dict[str, Any]:
    response = api.get("/v1/models/status")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def switch(api: httpx.Client, model: str) -> str:
    """Switch and wait until it is ready; the job's id."""
    response = api.post("/v1/models/switch", params={"target_model": model, "wait": "ready"})
    assert response.status_code == 200, response.text
    job: str = response.json()["job"]
    return job


def unload_all(api: httpx.Client) -> None:
    response = api.post("/v1/models/unload", params={"model": "all"})
    assert response.status_code == 200, response.text


def chat_requests(url: str, model: str, count: int) -> tuple[ThreadPoolExecutor, list[Future[int]]]:
    """`count` proxied chat requests for `model`, each in its own thread; their statuses."""

    def ask() -> int:
        body = {"model": model, "messages": [{"role": "user", "content": "hello"}]}
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code

    pool = ThreadPoolExecutor(count)
    return pool, [pool.submit(ask) for _ in range(count)]


def switch_in_page(page: Page, model: str, button: str = "Switch") -> None:
    page.get_by_label("Model", exact=True).select_option(model, timeout=WAIT_MS)
    page.get_by_role("button", name=button, exact=True).click(timeout=WAIT_MS)


def history_items(page: Page) -> Locator:
    return page.locator("#history > li")


# ---- queue: requests waiting for a model, and a switch queued behind another ------------


def test_waiting_requests_and_a_queued_switch(
    page: Page, server: Server, api: httpx.Client
) -> None:
    wait_until_idle(api)
    # Something for the history and the memory chart to show in the screenshot.
    switch(api, "mid")
    unload_all(api)
    open_live(page, server.url)
    waiting = page.locator("#waiting")
    expect(waiting.locator("#nothing-waits")).to_have_text("Nothing waits.", timeout=WAIT_MS)
    expect(history_items(page).first.locator(".from-to")).to_have_text(
        "mid → unload all", timeout=WAIT_MS
    )

    # big loads for 4 s: while it does, a second switch queues and requests wait.
    switch_in_page(page, "big")
    expect(page.locator("#stage-text")).to_contain_text("big", timeout=WAIT_MS)
    switch_button = page.locator("#switch-button")
    expect(switch_button).to_have_text("Join switch", timeout=WAIT_MS)  # big is selected
    switch_button.click(timeout=WAIT_MS)
    note = page.locator("#queue-note")
    expect(note).to_have_text("Joined the switch to big already running.", timeout=WAIT_MS)

    pool, answers = chat_requests(server.url, "small", 3)
    try:
        page.get_by_label("Model", exact=True).select_option("mid", timeout=WAIT_MS)
        expect(switch_button).to_have_text("Queue switch", timeout=WAIT_MS)
        switch_button.click(timeout=WAIT_MS)
        expect(note).to_contain_text(
            "Queued behind big (position 1): switch to mid", timeout=WAIT_MS
        )
        queued = waiting.locator('#waiting-switches li[data-target="mid"]')
        expect(queued).to_have_text("mid queued, position 1 (after big)", timeout=WAIT_MS)
        expect(queued).to_have_attribute("data-position", "1", timeout=WAIT_MS)

        # No event says a request started waiting: the page reads the status every 2 s.
        small = waiting.locator('#waiting-requests li[data-model="small"]')
        expect(small).to_contain_text(
            re.compile(r"^small 3 waiting, wanted for [\d.]+ s$"), timeout=WAIT_MS
        )
        expect(waiting.locator("#nothing-waits")).to_be_hidden(timeout=WAIT_MS)
        expect(page.locator("#memory-chart path.line")).to_have_count(1, timeout=WAIT_MS)
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True, timeout=WAIT_MS)
        # The "Then: mid (queued)" note does not split big's one, updated, loading line.
        assert page.locator('#timeline li[data-stage="loading"]').count() <= 1

        # big ready, mid next, then small's requests get their model.
        assert [answer.result(timeout=60) for answer in answers] == [200, 200, 200]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    expect(queued).to_have_count(0, timeout=WAIT_MS)
    expect(small).to_have_count(0, timeout=WAIT_MS)
    expect(waiting.locator("#nothing-waits")).to_be_visible(timeout=WAIT_MS)
    expect(note).to_be_hidden(timeout=WAIT_MS)
    expect(switch_button).to_have_text("Switch", timeout=WAIT_MS)
    # The demand switch that served them is in the history, with what it put aside.
    newest = history_items(page).first
    expect(newest.locator(".to")).to_have_text("small", timeout=WAIT_MS)
    expect(newest.locator(".cause")).to_have_text("demand", timeout=WAIT_MS)
    expect(newest.locator(".from")).to_have_text("big", timeout=WAIT_MS)

    check_screenshot(SCREENSHOT)


# ---- history: newest first, from what to what, and a bar of its stages ------------------


def test_history_lists_switches_newest_first_with_their_stages(
    page: Page, server: Server, api: httpx.Client
) -> None:
    wait_until_idle(api)
    unload_all(api)
    open_live(page, server.url)
    first = switch(api, "small")
    expect(page.locator(f'#history > li[data-job="{first}"]')).to_have_count(1, timeout=WAIT_MS)
    second = switch(api, "wide")  # 75 + 24 GB do not fit: small is unloaded for it

    items = history_items(page)
    expect(items.first).to_have_attribute("data-job", second, timeout=WAIT_MS)
    expect(items.nth(1)).to_have_attribute("data-job", first, timeout=WAIT_MS)
    newest, older = items.nth(0), items.nth(1)
    expect(newest.locator(".from-to")).to_have_text("small → wide", timeout=WAIT_MS)
    expect(older.locator(".from-to")).to_have_text("nothing put aside → small", timeout=WAIT_MS)
    for item in (newest, older):
        expect(item.locator(".cause")).to_have_text("explicit", timeout=WAIT_MS)
        expect(item.locator(".outcome")).to_have_text("succeeded", timeout=WAIT_MS)
        expect(item.locator(".seconds")).to_have_text(re.compile(r"^[\d.]+ s$"), timeout=WAIT_MS)
        expect(item.locator("time")).to_have_text(re.compile(r"^\d\d:\d\d:\d\d$"), timeout=WAIT_MS)

    jobs = {
        job["id"]: job for job in api.get("/v1/switches", params={"limit": 20}).json()["switches"]
    }
    for job_id, item in ((second, newest), (first, older)):
        # One segment per stage, but the last: result is the moment it ended.
        stages = [entry["stage"] for entry in jobs[job_id]["timeline"]]
        assert stages[-1] == "result", stages
        segments = item.locator(".stage-bar .seg")
        expect(segments).to_have_count(len(stages) - 1, timeout=WAIT_MS)
        shown = [segments.nth(i).get_attribute("data-stage") for i in range(len(stages) - 1)]
        assert shown == stages[:-1]
        for i in range(len(stages) - 1):
            expect(segments.nth(i)).to_have_attribute(
                "title", re.compile(rf"^{stages[i]}: [\d.]+ s \(from [\d.]+ s\)$"), timeout=WAIT_MS
            )
    bar = newest.locator(".stage-bar")
    expect(bar.locator(".seg.unloading")).to_have_count(2, timeout=WAIT_MS)  # unload, unloaded
    expect(bar.locator('.seg.loading[data-stage="start"]')).to_have_count(1, timeout=WAIT_MS)
    expect(bar).to_have_attribute(
        "aria-label", re.compile(r"^Stages: memory_check "), timeout=WAIT_MS
    )


# ---- memory over time --------------------------------------------------------------------


def last_point(d: str) -> tuple[float, float]:
    x, y = d.split()[-2:]
    return float(x), float(y)


def test_memory_chart_ends_at_the_memory_used_now(
    page: Page, server: Server, api: httpx.Client
) -> None:
    wait_until_idle(api)
    open_live(page, server.url)
    switch(api, "mid")
    device = status_of(api)["gpu"]["devices"][0]
    used, total = device["used_gb"], device["total_gb"]
    line = page.locator('#memory-chart path.line[data-device="0"]')
    expect(page.locator("#memory-chart path.line")).to_have_count(1, timeout=WAIT_MS)
    expect(line).to_have_attribute("data-last-gb", f"{used:.2f}", timeout=WAIT_MS)
    expect(line).to_have_attribute("data-total-gb", f"{total:.2f}", timeout=WAIT_MS)
    d = line.get_attribute("d") or ""
    assert d.startswith("M "), d
    assert " L " in d, d
    x, y = last_point(d)
    assert x == pytest.approx(1000, abs=1)  # now: the right edge
    assert y == pytest.approx(100 - 100 * used / total, abs=0.05)  # the top is the total
    axis = page.locator("#memory-chart .y-axis")
    expect(axis).to_contain_text(f"{total:.2f} GB", timeout=WAIT_MS)
    expect(axis).to_contain_text("0 GB", timeout=WAIT_MS)
    expect(page.locator("#memory-chart .x-axis")).to_have_text("-5 min-2.5 minnow", timeout=WAIT_MS)
    expect(page.locator("#memory-chart .chart-legend")).to_have_text(
        f"GPU 0: {used:.2f} of {total:.2f} GB used now", timeout=WAIT_MS
    )


@pytest.fixture
def two_gpu_server(tmp_path: Path) -> Iterator[Server]:
    models = {
        "left": {"cmd": engine_cmd(0.3), "size_gb": 30, "gpus": [0]},
        "right": {"cmd": engine_cmd(0.3), "size_gb": 12, "gpus": [1]},
    }
    started = write_config(tmp_path, models, simulated_gpu={"total_gb": 47.79, "devices": 2})
    started.start()
    yield started
    started.stop()


def test_memory_chart_has_a_line_per_device(
    browser: Browser, two_gpu_server: Server, js_errors: JsErrors
) -> None:
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    js_errors.watch(page, "test_memory_chart_has_a_line_per_device")
    try:
        open_live(page, two_gpu_server.url)
        with httpx.Client(base_url=two_gpu_server.url, timeout=60) as api:
            switch(api, "left")
            switch(api, "right")
            devices = status_of(api)["gpu"]["devices"]
        lines = page.locator("#memory-chart path.line")
        expect(lines).to_have_count(2, timeout=WAIT_MS)
        for device in devices:
            line = page.locator(f'#memory-chart path.line[data-device="{device["index"]}"]')
            expect(line).to_have_attribute(
                "data-last-gb", f"{device['used_gb']:.2f}", timeout=WAIT_MS
            )
        assert [device["used_gb"] for device in devices] == [30, 12]
    finally:
        context.close()


# ---- cooling down after a failed load ----------------------------------------------------


def test_a_model_that_failed_to_load_shows_its_cooldown(
    page: Page, server: Server, api: httpx.Client
) -> None:
    wait_until_idle(api)
    open_live(page, server.url)
    body = {"model": "broken", "messages": [{"role": "user", "content": "hello"}]}
    failed = api.post("/v1/chat/completions", json=body)
    assert failed.status_code == 503, failed.text
    model = status_of(api)["models"]["broken"]
    assert model["failures"] == 1, model
    assert model["cooldown_until"], model

    # HH:MM:SS in the browser's time zone.
    until = datetime.fromisoformat(model["cooldown_until"].replace("Z", "+00:00"))
    offset = page.evaluate("iso => new Date(iso).getTimezoneOffset()", model["cooldown_until"])
    local = (until - timedelta(minutes=offset)).strftime("%H:%M:%S")
    line = page.locator('#models tr[data-model="broken"] .cooldown')
    expect(line).to_have_text(f"cooling down until {local} (1 failure)", timeout=WAIT_MS)
    expect(line).to_have_attribute("title", re.compile("requests for it get 503"), timeout=WAIT_MS)
    expect(page.locator('#models tr[data-model="broken"] .status')).to_have_text(
        "failed", timeout=WAIT_MS
    )
    expect(page.locator(".cooldown")).to_have_count(1, timeout=WAIT_MS)  # only that one


# ---- the event stream is lost: stale figures, controls off, until a fresh snapshot -----


def test_stale_while_the_stream_is_lost_until_the_restart(
    page: Page, server: Server, api: httpx.Client
) -> None:
    wait_until_idle(api)
    switch(api, "small")
    open_live(page, server.url)
    page.get_by_label("Model", exact=True).select_option("small", timeout=WAIT_MS)
    main = page.locator("main")
    banner = page.locator("#stale-banner")
    buttons = [
        page.get_by_role("button", name="Switch", exact=True),
        page.get_by_role("button", name="Unload", exact=True),
        page.get_by_role("button", name="Send", exact=True),
    ]
    for button in buttons:
        expect(button).to_be_enabled(timeout=WAIT_MS)
    expect(main).not_to_have_class(re.compile(r"\bstale\b"), timeout=WAIT_MS)
    expect(banner).to_be_hidden(timeout=WAIT_MS)

    try:
        server.stop()
        expect(page.locator("#connection")).to_have_text("Reconnecting…", timeout=WAIT_MS)
        expect(main).to_have_class(re.compile(r"\bstale\b"), timeout=WAIT_MS)
        expect(banner).to_be_visible(timeout=WAIT_MS)
        expect(banner).to_have_text(
            "Connection lost — reconnecting; the figures below may be out of date.",
            timeout=WAIT_MS,
        )
        for button in buttons:
            expect(button).to_be_disabled(timeout=WAIT_MS)
        opacity = page.evaluate(
            "() => getComputedStyle(document.querySelector('#waiting')).opacity"
        )
        assert float(opacity) < 1
    finally:
        server.start()

    expect(page.locator("#connection")).to_have_text("Live", timeout=WAIT_MS)
    expect(main).not_to_have_class(re.compile(r"\bstale\b"), timeout=WAIT_MS)
    expect(banner).to_be_hidden(timeout=WAIT_MS)
    # The fresh switchd started no engine: its snapshot says so, and small cannot be
    # unloaded; switching and chat are back.
    expect(page.locator('#models tr[data-model="small"] .status')).to_have_text(
        "exited", timeout=WAIT_MS
    )
    expect(buttons[0]).to_be_enabled(timeout=WAIT_MS)
    expect(buttons[1]).to_be_disabled(timeout=WAIT_MS)
    expect(buttons[2]).to_be_enabled(timeout=WAIT_MS)
    page.get_by_label("Model", exact=True).select_option("mid", timeout=WAIT_MS)
    buttons[0].click(timeout=WAIT_MS)
    expect(page.locator("#progress-text")).to_have_text("100%", timeout=WAIT_MS)
    expect(buttons[1]).to_be_enabled(timeout=WAIT_MS)  # mid runs: it can be unloaded


# Last, so it covers every page above.
def test_no_javascript_errors(js_errors: JsErrors) -> None:
    if js_errors.pages == 0:
        pytest.skip("no test that opens a page was selected")
    assert js_errors.errors == []
