"""A client of llama.cpp's router API written only from llama.cpp's documentation
(tools/server/README.md, "Using multiple models": GET /models, POST /models/load,
POST /models/unload, GET /models/sse), knowing nothing of switchd: what a client
such as Open WebUI's llama.cpp connection does with a server that claims the API."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class Refused(Exception):
    """An error answer: its HTTP status and the OpenAI-style error object."""

    status: int
    error: dict[str, Any]


class RouterClient:
    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def models(self) -> dict[str, dict[str, Any]]:
        """GET /models: each model's entry by id."""
        answer = await self.http.get("/models")
        self._check(answer)
        return {entry["id"]: entry for entry in answer.json()["data"]}

    async def status(self, model: str) -> str:
        """The documented `status.value` of one model."""
        return str((await self.models())[model]["status"]["value"])

    async def load(self, model: str) -> None:
        self._succeeded(await self.http.post("/models/load", json={"model": model}))

    async def unload(self, model: str) -> None:
        self._succeeded(await self.http.post("/models/unload", json={"model": model}))

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """GET /models/sse: each event's JSON (`model`, `event`, `data`), as an
        EventSource's onmessage gets it: `data:` lines joined, comments skipped."""
        async with self.http.stream("GET", "/models/sse") as answer:
            if answer.status_code != 200:
                await answer.aread()
                self._check(answer)
            data: list[str] = []
            async for line in answer.aiter_lines():
                if line == "":
                    if data:
                        yield json.loads("\n".join(data))
                    data = []
                elif line.startswith(":"):
                    continue  # a comment: a keep-alive
                elif line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))

    def _succeeded(self, answer: httpx.Response) -> None:
        self._check(answer)
        assert answer.json() == {"success": True}, answer.text

    @staticmethod
    def _check(answer: httpx.Response) -> None:
        if answer.status_code != 200:
            raise Refused(answer.status_code, answer.json()["error"])
