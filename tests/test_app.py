"""create_app's wiring: the UI's routes and headers, and CORS only where allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from switchd.app import create_app, static_dir, ui_routes
from switchd.config import SimulatedGpuSettings
from switchd.gpu import SimulatedGpu
from switchd.proxy import Proxy
from tests.fakes import FakeRuntime, make_settings


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


def ui_app(tmp_path: Path, **settings: Any) -> Starlette:
    return create_app(
        make_settings(tmp_path, **settings),
        runtime=FakeRuntime(),
        gpu=SimulatedGpu(SimulatedGpuSettings()),
    )


async def test_the_ui_page_has_a_content_security_policy(tmp_path: Path) -> None:
    app = ui_app(tmp_path)
    async with app.router.lifespan_context(app), client(app) as http:
        page = await http.get("/")
    assert page.status_code == 200
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy
    assert "script-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"


async def test_cors_is_off_unless_origins_are_allowed(tmp_path: Path) -> None:
    asks = {"Origin": "https://ui.example.com", "Access-Control-Request-Method": "GET"}
    closed = ui_app(tmp_path)
    async with closed.router.lifespan_context(closed), client(closed) as http:
        preflight = await http.options("/v1/models/status", headers=asks)
        plain = await http.get("/v1/models/status", headers={"Origin": asks["Origin"]})
    assert "access-control-allow-origin" not in preflight.headers
    assert "access-control-allow-origin" not in plain.headers
    opened = ui_app(tmp_path, cors_allow_origins=["https://ui.example.com"])
    async with opened.router.lifespan_context(opened), client(opened) as http:
        preflight = await http.options("/v1/models/status", headers=asks)
        other = await http.get("/v1/models/status", headers={"Origin": "https://evil.example"})
        # Engine calls take their own way past the router, under the same middleware.
        engine_call = await http.post(
            "/v1/chat/completions",
            json={"model": "no-such-model", "messages": []},
            headers={"Origin": asks["Origin"]},
        )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://ui.example.com"
    assert "access-control-allow-origin" not in other.headers
    assert engine_call.status_code == 404
    assert engine_call.json()["error"]["code"] == "model_not_found"
    assert engine_call.headers["access-control-allow-origin"] == "https://ui.example.com"


def client(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://switchd")


async def test_the_proxy_is_reached_one_way_and_the_router_answers_the_rest(
    tmp_path: Path,
) -> None:
    app = ui_app(tmp_path)
    assert not any(isinstance(getattr(r, "app", None), Proxy) for r in app.routes)
    async with app.router.lifespan_context(app), client(app) as http:
        engine_call = await http.post("/v1/chat/completions", json={"model": "nope"})
        engine_path_by_get = await http.get("/v1/chat/completions")
        own_path_by_post = await http.post("/v1/events", json={"model": "nope"})
    assert engine_call.json()["error"]["code"] == "model_not_found"  # the proxy's answer
    assert (engine_path_by_get.status_code, engine_path_by_get.headers["allow"]) == (405, "POST")
    assert engine_path_by_get.json()["error"] == "method_not_allowed"
    assert own_path_by_post.status_code == 405
    assert own_path_by_post.json() == {
        "status": "error",
        "error": "method_not_allowed",
        "message": "POST /v1/events: Method Not Allowed",
    }
