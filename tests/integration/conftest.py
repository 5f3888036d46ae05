from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.server import Server, seed_models, write_config

ServerFactory = Callable[..., Server]


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start servers on demand; every one is stopped (SIGTERM) at the end."""
    started: list[Server] = []

    def factory(models: dict[str, Any] | None = None, **settings: Any) -> Server:
        folder = tmp_path / f"server{len(started)}"
        folder.mkdir()
        server = write_config(folder, models or seed_models(), **settings)
        server.start()
        started.append(server)
        return server

    yield factory
    for server in started:
        if server.process is not None and server.process.poll() is None:
            server.stop()


@pytest.fixture
def server(make_server: ServerFactory) -> Server:
    return make_server()


@pytest.fixture
async def client(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        yield http
