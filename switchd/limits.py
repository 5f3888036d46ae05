"""Bounded resources: how long a client may take to send a request, and how much
of everyone's request bodies switchd holds in memory at once.

- Headers: uvicorn has no timeout for a request's headers, so 300 connections
  sending a byte now and then (slowloris) stay open forever. The protocol below
  closes a connection whose request headers are not complete within
  `header_read_timeout_seconds`, with a log line.
- Bodies: a request body is read with an idle timeout per chunk, and every body
  being held counts against one budget (`max_buffered_body_bytes`); past it a
  request is answered 503 at once instead of the server growing without bound.
- Connections: uvicorn's `limit_concurrency` answers 503 past
  `max_connections`, and logs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


class BodyBudget:
    """Bytes of request bodies held in memory at once, across every request."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[BodyHold]:
        """A share of the budget for one request, returned when it ends."""
        share = BodyHold(self)
        try:
            yield share
        finally:
            self.held -= share.bytes
            share.bytes = 0


class BodyHold:
    def __init__(self, budget: BodyBudget) -> None:
        self._budget = budget
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


# A connection closed with answer bytes still unsent is cut off after this long: a
# client that stopped reading (an event stream's watcher let go) never takes them,
# and a plain close would wait for it, holding the socket and its buffer for good.
UNSENT_CLOSE_SECONDS = 5.0


def guarded_protocol(
    header_timeout_seconds: float, unsent_close_seconds: float = UNSENT_CLOSE_SECONDS
) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, closing connections slow to send their headers,
    each response's writes through a ResponseTransport."""

    class GuardedProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()
            self.cycle.transport = ResponseTransport(
                self.transport, self.loop, unsent_close_seconds
            )

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                where = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
                log.warning(
                    "closed the connection of %s: no complete request headers within %g s",
                    where,
                    header_timeout_seconds,
                )
                self.transport.close()

    return GuardedProtocol


class ResponseTransport(asyncio.Transport):
    """What one response writes through (uvicorn's cycle has it as its transport).

    - Its status line and headers leave together with the first piece of its body,
      when that comes in the same turn of the loop. uvicorn writes the headers at
      once, then the body: two writes, two packets, and a client woken twice, for
      what is most often one small answer; measured on the proxy (bench/proxy.py),
      one write saves CPU on both sides. Headers alone still leave at the end of the
      loop's turn, so a stream that starts slowly is not held back.
    - Closed with bytes still unsent, the connection is cut off (abort) after
      `unsent_close_seconds` unless they went by then.
    """

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        unsent_close_seconds: float = UNSENT_CLOSE_SECONDS,
    ) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._unsent_close_seconds = unsent_close_seconds
        self._first = True
        self._held = b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        data = bytes(data)
        if self._first:  # the status line and headers
            self._first = False
            self._held = data
            self._loop.call_soon(self._flush)
        elif self._held:
            data, self._held = self._held + data, b""
            self._transport.write(data)
        else:
            self._transport.write(data)

    def _flush(self) -> None:
        held, self._held = self._held, b""
        if held and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()
        if self._transport.get_write_buffer_size():
            self._loop.call_later(self._unsent_close_seconds, self._cut_off)

    def _cut_off(self) -> None:
        if self._transport.get_write_buffer_size():  # (0 once it is all sent and closed)
            self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()
