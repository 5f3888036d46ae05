"""The chat bubble of a request whose model must load first shows that load's progress
(switchd's reasoning lines, asked with X-Switchd-Progress: on) instead of an empty box,
then the answer alone."""

from __future__ import annotations

import re

import httpx
from playwright.sync_api import Page, expect

from tests.browser.conftest import API_KEY, WAIT_MS, open_live, wait_until_idle
from tests.integration.server import Server

# Every line switchd's progress stream begins with: the time since the request came.
PROGRESS_LINE = re.compile(r"^\[\s*\d+\.\d s\] ")
RECORDER = """() => {
  window.__progress = [];
  const messages = document.getElementById("messages");
  new MutationObserver(() => {
    const shown = messages.querySelector(".message.assistant .progress");
    if (shown && shown.textContent) window.__progress.push(shown.textContent);
  }).observe(messages, { childList: true, subtree: true, characterData: true });
}"""


def test_the_chat_bubble_shows_the_load_progress_then_the_answer(
    page: Page, ui_server: Server, api: httpx.Client
) -> None:
    wait_until_idle(api)
    target = "deepseek-coder-33b-instruct"  # a 2 s load: cold in this fresh server
    assert api.get("/v1/models/status").json()["models"][target]["status"] != "running"
    open_live(page, ui_server.url, API_KEY)
    page.get_by_label("Model", exact=True).select_option(target, timeout=WAIT_MS)
    page.evaluate(RECORDER)
    message = page.get_by_label("Message", exact=True)
    message.fill("are you loaded yet?")
    message.press("Enter")

    bubble = page.locator(".message.assistant").last
    progress = bubble.locator(".progress")
    # While it loads: a progress line in the bubble, and no answer text yet.
    expect(progress).to_contain_text(target, timeout=WAIT_MS)
    expect(progress).to_have_text(PROGRESS_LINE, timeout=WAIT_MS)
    assert (bubble.locator(".text").text_content(timeout=WAIT_MS) or "") == ""

    answer = f"Hello from {target}. You said: are you loaded yet?"
    expect(bubble.locator(".text")).to_have_text(answer, timeout=WAIT_MS)
    expect(progress).to_have_count(0)  # gone once the answer began
    shown: list[str] = page.evaluate("() => window.__progress")
    assert len(shown) >= 2, shown  # it moved: more than one stage was told
    assert all(PROGRESS_LINE.match(line) for line in shown), shown
    expect(message).to_be_enabled(timeout=WAIT_MS)
