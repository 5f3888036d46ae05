"""A real switchd with demo engines, and Debian's Chromium driven by Playwright (sync API).

The server and the browser are shared by the module (starting them costs seconds);
each test gets its own browser context, so localStorage starts empty.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Error, Page, expect, sync_playwright

from tests.integration.server import Server, engine_cmd, seed_models, write_config

CHROMIUM = Path("/usr/bin/chromium")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every browser test is skipped, with the reason, where there is no Chromium."""
    if CHROMIUM.exists():
        return
    missing = pytest.mark.skip(
        reason=f"{CHROMIUM} is missing (Debian's chromium package); the browser tests need it"
    )
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(missing)


def check_screenshot(path: Path) -> None:
    """A real picture was written to `path` (for docs/ and the README)."""
    png = path.read_bytes()
    assert png.startswith(PNG_MAGIC)
    assert len(png) > 20_000


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
API_KEY = "ui-test-key"
WAIT_MS = 15_000  # the longest any single wait on the page may take
# Chromium logs every failed fetch to the console as an error; those are network
# events, not JavaScript errors. The first /v1/events of a page with no key yet
# gets 401 in every test; only the restart tests may see connections fail.
NETWORK_ERROR = "Failed to load resource: "
EXPECTED_EVERYWHERE = ("the server responded with a status of 401",)
EXPECTED_WHILE_RESTARTING = (
    "net::ERR_CONNECTION_REFUSED",
    "net::ERR_INCOMPLETE_CHUNKED_ENCODING",  # see test_a_restart_ends_the_stream_cleanly
)


def ui_models() -> dict[str, Any]:
    """The seed's catalog with loads slow enough (2-3 s) to watch the progress bar."""
    models = seed_models()
    models["gpt-oss-120b"]["cmd"] = engine_cmd(0.3)  # only ever loaded to be unloaded
    models["gpt-oss-20b"].update(
        cmd=engine_cmd(2.5, "--tokens-per-second", "20"), load_time_seconds=3
    )
    for name in ("deepseek-coder-33b-instruct", "mistral-7b-v0.1"):
        models[name].update(cmd=engine_cmd(2.0), load_time_seconds=2)
    return models


@dataclass
class JsErrors:
    """Uncaught exceptions and console errors of every page the tests opened."""

    pages: int = 0
    errors: list[str] = field(default_factory=list)

    def watch(self, page: Page, test: str) -> None:
        self.pages += 1
        expected: tuple[str, ...] = EXPECTED_EVERYWHERE
        if "restart" in test:
            expected += EXPECTED_WHILE_RESTARTING

        def on_page_error(error: Error) -> None:
            self.errors.append(f"{test}: pageerror: {error.message}\n{error.stack or ''}")

        def on_console(message: ConsoleMessage) -> None:
            if message.type != "error":
                return
            text = message.text
            if text.startswith(NETWORK_ERROR) and text.removeprefix(NETWORK_ERROR).startswith(
                expected
            ):
                return
            self.errors.append(f"{test}: console.error: {text} at {message.location['url']}")

        page.on("pageerror", on_page_error)
        page.on("console", on_console)


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = write_config(
        tmp_path_factory.mktemp("ui"),
        ui_models(),
        api_keys=[API_KEY],
        memory_release_timeout_seconds=5,
    )
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.stop()


@pytest.fixture(scope="module")
def api(ui_server: Server) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=ui_server.url, headers=headers, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium package")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def js_errors() -> JsErrors:
    return JsErrors()


@pytest.fixture
def page(browser: Browser, js_errors: JsErrors, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh context (empty localStorage) at a desktop width."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    context.set_default_timeout(WAIT_MS)
    opened = context.new_page()
    js_errors.watch(opened, request.node.name)
    yield opened
    context.close()


def open_live(page: Page, url: str, key: str | None = None) -> None:
    """Open the page (giving the key when the server wants one) and wait until its
    event stream is live."""
    page.goto(url + "/", timeout=WAIT_MS)
    if key is not None:
        field = page.get_by_role("textbox", name="API key", exact=True)
        expect(field).to_be_visible(timeout=WAIT_MS)
        field.fill(key)
        page.get_by_role("button", name="Save key").click(timeout=WAIT_MS)
    expect(page.locator("#connection")).to_have_text("Live", timeout=WAIT_MS)


def wait_until_idle(client: httpx.Client, within: float = 30.0) -> dict[str, Any]:
    """No job running or queued and no request waiting (an earlier test's may still be
    finishing); returns that status."""
    deadline = time.monotonic() + within
    while True:
        response = client.get("/v1/models/status")
        assert response.status_code == 200, response.text
        status: dict[str, Any] = response.json()
        if status["switch"] is None and status["beside"] == [] and status["waiting"] == 0:
            return status
        assert time.monotonic() < deadline, f"still busy: {status['switch']}, {status['beside']}"
        time.sleep(0.1)


def horizontal_scroll_width(page: Page) -> int:
    width: int = page.evaluate("() => document.scrollingElement.scrollWidth")
    return width
