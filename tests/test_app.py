"""create_app's wiring: the UI's routes exist only where its files are."""

from __future__ import annotations

from pathlib import Path

import pytest

from switchd.app import static_dir, ui_routes


def test_the_ui_is_served_from_the_checkout_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWITCHD_STATIC_DIR", raising=False)
    assert (static_dir() / "index.html").is_file()
    assert [getattr(route, "path", None) for route in ui_routes(static_dir())] == ["/", "/static"]


def test_without_ui_files_only_the_api_is_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SWITCHD_STATIC_DIR", str(tmp_path))
    assert static_dir() == tmp_path
    assert ui_routes(tmp_path) == []
    assert f"no UI at {tmp_path}" in caplog.text
