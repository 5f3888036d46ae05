"""The web UI in a real Chromium against a real switchd with demo engines (issue 5)."""

from __future__ import annotations

import itertools
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Locator, Page, expect

from tests.browser.conftest import API_KEY, WAIT_MS, JsErrors, check_screenshot
from tests.integration.server import Server, engine_cmd, write_config

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "switch-in-progress.png"
HUNG_SLEEP = ("--enable-sleep-mode", "--sleep-seconds", "600")  # a /sleep that never answers

# Records, in page, every value the progress bar's `value` attribute takes and
# whether the Message box was disabled at that moment, plus every change of the
# Message box's `disabled` attribute. Values are rebuilt from oldValue, so a
# batch of several changes in one task loses none.
RECORDER = """() => {
  const bar = document.getElementById("progress");
  const box = document.getElementById("message");
  window.__progress = [];
  window.__lockedAt = [];
  window.__disabled = [];
  const onBar = (records) => {
    const values = records.slice(1).map((r) => r.oldValue);
    values.push(bar.getAttribute("value"));
    for (const value of values) {
      window.__progress.push(Number(value));
      window.__lockedAt.push(box.disabled);
    }
  };
  const onBox = (records) => {
    for (const r of records) window.__disabled.push(r.target.hasAttribute("disabled"));
  };
  window.__observers = [
    new MutationObserver(onBar), new MutationObserver(onBox),
  ];
  window.__observers[0].observe(bar, {
    attributes: true, attributeFilter: ["value"], attributeOldValue: true,
  });
  window.__observers[1].observe(box, { attributes: true, attributeFilter: ["disabled"] });
}"""


def key_field(page: Page) -> Locator:
    """The password field. get_by_label("API key") also finds its section, see below."""
    return page.get_by_role("textbox", name="API key", exact=True)


def open_live(page: Page, server: Server) -> None:
    """Open the page, give the key, and wait until its event stream is live."""
    page.goto(server.url + "/", timeout=WAIT_MS)
    key = key_field(page)
    expect(key).to_be_visible(timeout=WAIT_MS)
    key.fill(API_KEY)
    page.get_by_role("button", name="Save key").click(timeout=WAIT_MS)
    expect(page.locator("#connection")).to_have_text("Live", timeout=WAIT_MS)


def switch_via_api(api: httpx.Client, model: str, *, wait_ready: bool = True) -> dict[str, Any]:
    params = {"target_model": model, **({"wait": "ready"} if wait_ready else {})}
    response = api.post("/v1/models/switch", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def models_status(api: httpx.Client) -> dict[str, Any]:
    response = api.get("/v1/models/status")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_until_idle(api: httpx.Client, within: float = 20.0) -> None:
    """No switch running, nor a load beside one (a previous test's may still be finishing)."""
    deadline = time.monotonic() + within
    while (status := models_status(api))["switch"] is not None or status["beside"]:
        assert time.monotonic() < deadline, "a switch was still running"
        time.sleep(0.1)


def progress_values(page: Page) -> list[float]:
    values: list[float] = page.evaluate("() => window.__progress")
    return values


def row_status(page: Page, model: str) -> Locator:
    return page.locator(f'#models tr[data-model="{model}"] .status')


def assert_monotonic_to_100(values: list[float]) -> None:
    assert values, "the progress bar never changed"
    assert values[-1] == 100, values
    assert all(a <= b for a, b in itertools.pairwise(values)), (
        f"the progress bar went back: {values}"
    )


# ---- 1: the API key --------------------------------------------------------------


def test_asks_for_the_key_once_and_keeps_it(page: Page, ui_server: Server) -> None:
    page.goto(ui_server.url + "/", timeout=WAIT_MS)
    key = key_field(page)
    expect(key).to_be_visible(timeout=WAIT_MS)
    expect(key).to_have_attribute("type", "password", timeout=WAIT_MS)
    expect(page.locator("#connection")).to_have_text("API key needed", timeout=WAIT_MS)
    key.fill(API_KEY)
    key.press("Enter")  # the keyboard submits the form as the button does

    expect(page.locator("#connection")).to_have_text("Live", timeout=WAIT_MS)
    expect(key).to_be_hidden(timeout=WAIT_MS)
    rows = page.locator("#models tbody tr")
    expect(rows).to_have_count(4, timeout=WAIT_MS)
    for name in ("gpt-oss-120b", "gpt-oss-20b", "deepseek-coder-33b-instruct", "mistral-7b-v0.1"):
        expect(page.locator(f'#models tr[data-model="{name}"]')).to_be_visible(timeout=WAIT_MS)
        expect(page.locator(f'#model option[value="{name}"]')).to_have_count(1, timeout=WAIT_MS)
    expect(page.locator("#devices .device")).to_have_count(1, timeout=WAIT_MS)
    stored = page.evaluate("() => Object.values(localStorage)")
    assert API_KEY in stored

    page.reload(timeout=WAIT_MS)
    expect(page.locator("#connection")).to_have_text("Live", timeout=WAIT_MS)
    expect(key_field(page)).to_be_hidden(timeout=WAIT_MS)
    expect(rows).to_have_count(4, timeout=WAIT_MS)


def test_a_refused_key_is_asked_again(page: Page, ui_server: Server) -> None:
    page.goto(ui_server.url + "/", timeout=WAIT_MS)
    key = key_field(page)
    key.fill("not-the-key")
    page.get_by_role("button", name="Save key").click(timeout=WAIT_MS)
    expect(page.locator("#key-error")).to_have_text(re.compile("refused"), timeout=WAIT_MS)
    expect(key).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#connection")).to_have_text("API key needed", timeout=WAIT_MS)
    key.fill(API_KEY)
    page.get_by_role("button", name="Save key").click(timeout=WAIT_MS)
    expect(page.locator("#connection")).to_have_text("Live", timeout=WAIT_MS)
    expect(key).to_be_hidden(timeout=WAIT_MS)
    expect(page.locator("#models tbody tr")).to_have_count(4, timeout=WAIT_MS)


def test_only_the_field_is_labelled_api_key(page: Page, ui_server: Server) -> None:
    page.goto(ui_server.url + "/", timeout=WAIT_MS)
    expect(key_field(page)).to_be_visible(timeout=WAIT_MS)
    expect(page.get_by_label("API key")).to_have_count(1, timeout=2_000)


# ---- 2: a switch with an unload, and the screenshot --------------------------------


def test_switch_with_unload_moves_the_bar_to_100_and_locks_the_chat(
    page: Page, ui_server: Server, api: httpx.Client
) -> None:
    wait_until_idle(api)
    switch_via_api(api, "gpt-oss-120b")
    open_live(page, ui_server)
    expect(row_status(page, "gpt-oss-120b")).to_have_text("running", timeout=WAIT_MS)
    message = page.get_by_label("Message", exact=True)
    expect(message).to_be_enabled(timeout=WAIT_MS)

    page.get_by_label("Model", exact=True).select_option("gpt-oss-20b", timeout=WAIT_MS)
    page.evaluate(RECORDER)
    page.get_by_role("button", name="Switch", exact=True).click(timeout=WAIT_MS)

    banner = page.locator("#banner")
    expect(banner).to_be_visible(timeout=WAIT_MS)
    expect(message).to_be_disabled(timeout=WAIT_MS)
    # Mid-load, with the engine's first log lines: the screenshot for docs/ and the README.
    page.wait_for_function(
        "() => { const v = Number(document.getElementById('progress').value);"
        " return v > 40 && v < 95 && document.getElementById('log').textContent; }",
        timeout=WAIT_MS,
    )
    shown = page.evaluate("() => Number(document.getElementById('progress').value)")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True, timeout=WAIT_MS)
    assert 40 < shown < 95
    expect(banner).to_be_visible(timeout=WAIT_MS)
    expect(message).to_be_disabled(timeout=WAIT_MS)

    expect(page.locator("#progress-text")).to_have_text("100%", timeout=WAIT_MS)
    expect(banner).to_have_class(re.compile(r"\bdone\b"), timeout=WAIT_MS)
    expect(message).to_be_enabled(timeout=WAIT_MS)
    expect(page.locator("#stage-text")).to_have_text(
        re.compile(r"gpt-oss-20b.* is ready"), timeout=WAIT_MS
    )

    values = progress_values(page)
    assert_monotonic_to_100(values)
    assert len(set(values)) >= 4, f"too few distinct values: {values}"
    locked_at: list[bool] = page.evaluate("() => window.__lockedAt")
    during = [locked for value, locked in zip(values, locked_at, strict=True) if 0 < value < 100]
    assert during, f"no value seen between 0 and 100: {values}"
    assert all(during), f"the Message box was enabled during the switch: {values} {locked_at}"
    disabled: list[bool] = page.evaluate("() => window.__disabled")
    assert disabled[0] is True, disabled
    assert disabled[-1] is False, disabled

    timeline = page.locator("#timeline")
    expect(timeline).to_contain_text("Unloading gpt-oss-120b", timeout=WAIT_MS)
    expect(timeline).to_contain_text("gpt-oss-120b unloaded: 80.00 GB freed", timeout=WAIT_MS)
    expect(timeline).to_contain_text(
        re.compile(r"gpt-oss-20b is ready \(loaded in [\d.]+ s\)"), timeout=WAIT_MS
    )
    log = page.locator("#log")
    expect(log).to_contain_text("Loading model weights for gpt-oss-20b", timeout=WAIT_MS)
    expect(log).to_contain_text("Loading safetensors checkpoint shards: 4/4", timeout=WAIT_MS)
    expect(row_status(page, "gpt-oss-20b")).to_have_text("running", timeout=WAIT_MS)
    expect(row_status(page, "gpt-oss-120b")).to_have_text("exited", timeout=WAIT_MS)

    check_screenshot(SCREENSHOT)


# ---- 3: chat streams ---------------------------------------------------------------


def test_chat_streams_an_answer(page: Page, ui_server: Server, api: httpx.Client) -> None:
    wait_until_idle(api)
    switch_via_api(api, "gpt-oss-20b")
    open_live(page, ui_server)
    page.get_by_label("Model", exact=True).select_option("gpt-oss-20b", timeout=WAIT_MS)
    page.evaluate(
        """() => {
          window.__lengths = [];
          const messages = document.getElementById("messages");
          new MutationObserver(() => {
            const answers = messages.querySelectorAll(".message.assistant .text");
            const last = answers[answers.length - 1];
            if (last) window.__lengths.push(last.textContent.length);
          }).observe(messages, { childList: true, subtree: true, characterData: true });
        }"""
    )
    said = "how does switching between two large models work on one GPU"
    message = page.get_by_label("Message", exact=True)
    message.fill(said)
    page.get_by_role("button", name="Send", exact=True).click(timeout=WAIT_MS)

    answer = page.locator(".message.assistant .text").last
    expect(page.locator(".message.user .text").last).to_have_text(said, timeout=WAIT_MS)
    # Seen part-way: some text, not all of it yet.
    page.wait_for_function(
        "() => { const a = [...document.querySelectorAll('.message.assistant .text')].pop();"
        " return a && a.textContent.length > 0 && !a.textContent.endsWith('GPU'); }",
        timeout=WAIT_MS,
    )
    early = len(answer.text_content(timeout=WAIT_MS) or "")
    expected = f"Hello from gpt-oss-20b. You said: {said}"
    expect(answer).to_have_text(expected, timeout=WAIT_MS)
    assert 0 < early < len(expected)
    lengths: list[int] = page.evaluate("() => window.__lengths")
    grown = sorted(set(lengths))
    assert len(grown) >= 5, f"the answer did not stream: {lengths}"
    assert lengths == sorted(lengths), lengths
    expect(message).to_be_enabled(timeout=WAIT_MS)
    expect(message).to_be_focused(timeout=WAIT_MS)


# ---- 4: chat to a model that is not loaded ----------------------------------------


def test_sending_to_a_model_not_loaded_shows_the_switch_then_the_answer(
    page: Page, ui_server: Server, api: httpx.Client
) -> None:
    wait_until_idle(api)
    target = "mistral-7b-v0.1"
    if models_status(api)["models"][target]["status"] == "running":
        response = api.post("/v1/models/unload", params={"model": target})
        assert response.status_code == 200, response.text
    open_live(page, ui_server)
    expect(row_status(page, target)).to_have_text("exited", timeout=WAIT_MS)
    page.get_by_label("Model", exact=True).select_option(target, timeout=WAIT_MS)
    page.evaluate(RECORDER)
    message = page.get_by_label("Message", exact=True)
    message.fill("are you there?")
    message.press("Enter")

    answer = page.locator(".message.assistant .text").last
    expect(page.locator("#banner")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#stage-text")).to_contain_text(target, timeout=WAIT_MS)
    expect(message).to_be_disabled(timeout=WAIT_MS)
    page.wait_for_function(
        "() => { const v = Number(document.getElementById('progress').value);"
        " return v >= 30 && v < 100; }",
        timeout=WAIT_MS,
    )
    assert (answer.text_content(timeout=WAIT_MS) or "") == ""  # the switch comes first

    expect(answer).to_have_text(f"Hello from {target}. You said: are you there?", timeout=WAIT_MS)
    expect(page.locator("#progress-text")).to_have_text("100%", timeout=WAIT_MS)
    assert_monotonic_to_100(progress_values(page))
    expect(message).to_be_enabled(timeout=WAIT_MS)
    expect(row_status(page, target)).to_have_text("running", timeout=WAIT_MS)


# ---- 5: a switch started elsewhere -------------------------------------------------


def test_a_switch_started_through_the_api_shows_live(
    page: Page, ui_server: Server, api: httpx.Client
) -> None:
    wait_until_idle(api)
    target = "deepseek-coder-33b-instruct"
    if models_status(api)["models"][target]["status"] == "running":
        response = api.post("/v1/models/unload", params={"model": target})
        assert response.status_code == 200, response.text
    open_live(page, ui_server)
    page.evaluate(RECORDER)

    switch_via_api(api, target, wait_ready=False)  # returns once the engine started

    banner = page.locator("#banner")
    expect(banner).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#stage-text")).to_contain_text(target, timeout=WAIT_MS)
    expect(page.get_by_label("Message", exact=True)).to_be_disabled(timeout=WAIT_MS)
    expect(page.locator("#progress-text")).to_have_text("100%", timeout=WAIT_MS)
    expect(banner).to_have_class(re.compile(r"\bdone\b"), timeout=WAIT_MS)
    expect(page.locator("#stage-text")).to_contain_text(target, timeout=WAIT_MS)
    values = progress_values(page)
    assert_monotonic_to_100(values)
    assert any(0 < value < 100 for value in values), f"not seen live: {values}"
    expect(row_status(page, target)).to_have_text("running", timeout=WAIT_MS)
    expect(page.locator(f'#model option[value="{target}"]')).to_have_text(
        f"{target} (running)", timeout=WAIT_MS
    )


def test_a_load_beside_the_switch_on_show_is_noted_not_followed(page: Page, tmp_path: Path) -> None:
    # v (60 GB) hangs in /sleep (given up after 8 s) during the switch to t (40 GB);
    # u (5 GB) fits beside both and loads meanwhile, beside the switch on show.
    models = {
        "v": {"cmd": engine_cmd(0.3, *HUNG_SLEEP), "size_gb": 60, "standby": ["sleep2"]},
        "t": {"cmd": engine_cmd(0.5), "size_gb": 40},
        "u": {"cmd": engine_cmd(0.5), "size_gb": 5},
    }
    server = write_config(tmp_path, models, api_keys=[API_KEY], engine_call_timeout_seconds=8)
    server.start()
    headers = {"Authorization": f"Bearer {API_KEY}"}
    try:
        with (
            httpx.Client(base_url=server.url, headers=headers, timeout=30) as api,
            ThreadPoolExecutor(1) as pool,
        ):
            switch_via_api(api, "v")
            open_live(page, server)
            page.evaluate(RECORDER)
            switching = pool.submit(switch_via_api, api, "t")
            deadline = time.monotonic() + 10
            while (models_status(api)["switch"] or {}).get("stage") != "sleep":
                assert time.monotonic() < deadline, "the switch never reached its sleep"
                time.sleep(0.05)
            chat = {"model": "u", "messages": [{"role": "user", "content": "hi"}]}
            answer = api.post("/v1/chat/completions", json=chat)
            assert answer.status_code == 200, answer.text
            assert models_status(api)["switch"]["stage"] == "sleep"  # still hung
            switching.result(timeout=30)

            timeline = page.locator("#timeline")
            expect(timeline).to_contain_text("Beside it: loading u…", timeout=WAIT_MS)
            expect(timeline).to_contain_text("Beside it: u is ready.", timeout=WAIT_MS)
            banner = page.locator("#banner")
            expect(banner).to_have_class(re.compile(r"\bdone\b"), timeout=WAIT_MS)
            # The banner followed the switch to t to its end, not the other load.
            expect(page.locator("#stage-text")).to_contain_text("t", timeout=WAIT_MS)
            stages = timeline.locator("li").all_inner_texts()
            assert stages[0].startswith("t needs"), stages
            assert stages[-1] == "Model 't' is ready", stages
            assert_monotonic_to_100(progress_values(page))
            expect(row_status(page, "u")).to_have_text("running", timeout=WAIT_MS)
            expect(row_status(page, "t")).to_have_text("running", timeout=WAIT_MS)
    finally:
        server.stop()


# ---- 6: switchd restarts -----------------------------------------------------------


def test_the_page_recovers_after_a_server_restart(
    page: Page, ui_server: Server, api: httpx.Client
) -> None:
    wait_until_idle(api)
    switch_via_api(api, "gpt-oss-20b")
    open_live(page, ui_server)
    expect(row_status(page, "gpt-oss-20b")).to_have_text("running", timeout=WAIT_MS)

    ui_server.stop()
    expect(page.locator("#connection")).to_have_text("Reconnecting…", timeout=WAIT_MS)
    ui_server.start()
    expect(page.locator("#connection")).to_have_text("Live", timeout=WAIT_MS)
    # The fresh switchd started no engine: the page shows its state, not the old one.
    expect(row_status(page, "gpt-oss-20b")).to_have_text("exited", timeout=WAIT_MS)

    page.evaluate(RECORDER)
    target = "mistral-7b-v0.1"
    switch_via_api(api, target, wait_ready=False)
    expect(page.locator("#banner")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#stage-text")).to_contain_text(target, timeout=WAIT_MS)
    expect(page.locator("#progress-text")).to_have_text("100%", timeout=WAIT_MS)
    values = progress_values(page)
    assert_monotonic_to_100(values)
    assert any(0 < value < 100 for value in values), f"not seen live: {values}"
    expect(row_status(page, target)).to_have_text("running", timeout=WAIT_MS)
    expect(page.get_by_label("Message", exact=True)).to_be_enabled(timeout=WAIT_MS)


def test_a_restart_ends_the_stream_cleanly(
    page: Page, ui_server: Server, api: httpx.Client
) -> None:
    wait_until_idle(api)
    open_live(page, ui_server)
    cut: list[str] = []
    page.on("console", lambda m: cut.append(m.text) if "ERR_INCOMPLETE" in m.text else None)
    before = len(ui_server.log())
    try:
        ui_server.stop()
        expect(page.locator("#connection")).to_have_text("Reconnecting…", timeout=WAIT_MS)
    finally:
        ui_server.start()
    stopping = ui_server.log()[before:]
    expect(page.locator("#connection")).to_have_text("Live", timeout=WAIT_MS)
    assert "ASGI callable returned without completing response" not in stopping
    assert cut == []


# ---- 8: a phone-sized screen -------------------------------------------------------


def test_usable_at_360_px(page: Page, ui_server: Server, api: httpx.Client) -> None:
    wait_until_idle(api)
    page.set_viewport_size({"width": 360, "height": 800})
    open_live(page, ui_server)
    # With the banner, its timeline and the engine log on show, too.
    switch_via_api(api, "gpt-oss-120b")
    expect(page.locator("#progress-text")).to_have_text("100%", timeout=WAIT_MS)
    expect(page.locator("#log")).to_contain_text("Capturing CUDA graphs", timeout=WAIT_MS)
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= 360, f"the page scrolls sideways: {width} px wide"
    expect(page.get_by_role("button", name="Switch", exact=True)).to_be_visible(timeout=WAIT_MS)
    expect(page.get_by_label("Message", exact=True)).to_be_visible(timeout=WAIT_MS)
    expect(page.get_by_label("Model", exact=True)).to_be_visible(timeout=WAIT_MS)
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible(timeout=WAIT_MS)


# ---- 7: no JavaScript errors, last so it covers every page above -------------------


def test_no_javascript_errors(js_errors: JsErrors) -> None:
    if js_errors.pages == 0:
        pytest.skip("no test that opens a page was selected")
    assert js_errors.errors == []
