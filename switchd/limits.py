"""Bounded resources: how long a client may take to send a request, and how much
of everyone's request bodies switchd holds in memory at once.

- Headers: switchd's server protocol (protocol.py) closes a connection whose
  request headers are not complete within `header_read_timeout_seconds`.
- Bodies: a request body is read with an idle timeout per chunk, and every body
  being held counts against one budget (`max_buffered_body_bytes`); past it a
  request is answered 503 at once instead of the server growing without bound.
- Connections: uvicorn's `limit_concurrency` answers 503 past
  `max_connections`, and logs it.
"""

from __future__ import annotations

import asyncio
from typing import Any


class BodyBudget:
    """Bytes of request bodies held in memory at once, across every request."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def hold(self) -> BodyHold:
        """A share of the budget for one request (`with`), returned when it ends."""
        return BodyHold(self)


class BodyHold:
    """One request's share of the budget. A class, not a generator context manager:
    it is on every proxied request's path (bench/proxy.py)."""

    __slots__ = ("_budget", "bytes")

    def __init__(self, budget: BodyBudget) -> None:
        self._budget = budget
        self.bytes = 0

    def __enter__(self) -> BodyHold:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._budget.held -= self.bytes
        self.bytes = 0

    def take(self, size: int) -> bool:
        """Count `size` more bytes of this request's body; False when over the budget."""
        if self._budget.held + size > self._budget.limit:
            return False
        self._budget.held += size
        self.bytes += size
        return True


class BodyTimeout(Exception):
    """The client stopped sending its body."""


async def next_chunk(receive: Any, seconds: float) -> dict[str, Any]:
    """The next ASGI message, or BodyTimeout when none comes within `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            message: dict[str, Any] = await receive()
            return message
    except TimeoutError:
        raise BodyTimeout from None
