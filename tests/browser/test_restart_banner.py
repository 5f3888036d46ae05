"""A switch cut by a restart of switchd: the page's progress banner does not stay
frozen mid-load. With the journal, the resumed stream replays the job's
`shutting_down` error; without one, the fresh snapshot lists no running job and
the banner goes.

A kill -9 of switchd alone leaves its engines running, to be adopted by the next
one (issue 23), which then follows the load in a job of its own: the kill-9 cases
here are a crash of switchd and its engine together (the host's power, the OOM
killer taking both), where the cut job has nothing left to follow."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import API_KEY, WAIT_MS, JsErrors, open_live, ui_models
from tests.integration.server import Server, engine_cmd, write_config

TARGET = "mistral-7b-v0.1"


# How switchd goes away, and whether it keeps a journal.
WAYS = {"sigterm-journal": 64 * 1024 * 1024, "kill-9-journal": 64 * 1024 * 1024, "kill-9": 0}


@pytest.fixture(params=list(WAYS), ids=list(WAYS))
def slow_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    models = ui_models()
    models[TARGET].update(cmd=engine_cmd(60.0), load_time_seconds=60)  # still loading
    server = write_config(
        tmp_path, models, api_keys=[API_KEY], journal_max_bytes=WAYS[request.param]
    )
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.stop()


def kill_engine(state_dir: Path, model: str) -> None:
    """SIGKILL to the engine's process group, named in the pid file switchd left."""
    record = json.loads((state_dir / "engines" / f"{model}.json").read_text(encoding="utf-8"))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(int(record["pid"]), signal.SIGKILL)


def test_a_restart_mid_switch_clears_the_progress_banner(
    page: Page, slow_server: Server, request: pytest.FixtureRequest
) -> None:
    open_live(page, slow_server.url, API_KEY)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    response = httpx.post(
        f"{slow_server.url}/v1/models/switch",
        params={"target_model": TARGET},
        headers=headers,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    banner = page.locator("#banner")
    expect(banner).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#stage-text")).to_contain_text(TARGET, timeout=WAIT_MS)

    way = request.node.callspec.id
    assert slow_server.process is not None
    if way.startswith("kill-9"):
        slow_server.process.send_signal(signal.SIGKILL)  # it says nothing: the page finds out
        slow_server.process.wait()
        kill_engine(slow_server.state_dir, TARGET)
    else:
        slow_server.stop()
    slow_server.start()
    expect(page.locator("#connection")).to_have_text("Live", timeout=WAIT_MS)
    if way.startswith("kill-9"):
        # A snapshot (no journal) or a status read after the resume: no job runs.
        expect(banner).to_be_hidden(timeout=WAIT_MS)
    else:  # the job's end, told by the stream as switchd stopped
        expect(banner).to_have_class(re.compile(r"\bfailed\b"), timeout=WAIT_MS)
        expect(page.locator("#stage-text")).to_contain_text("shutting down", timeout=WAIT_MS)
    # Nothing stays locked: the chat can be used again.
    expect(page.get_by_label("Message", exact=True)).to_be_enabled(timeout=WAIT_MS)


def test_no_javascript_errors(js_errors: JsErrors) -> None:
    assert js_errors.pages >= len(WAYS)
    assert js_errors.errors == []
