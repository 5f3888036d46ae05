"""`/v1/events` to many watchers: each event encoded once, its bytes shared.

sse-starlette gives every response a task group (the stream, a ping, a
disconnect and a shutdown listener) and every event a new ServerSentEvent,
encoded again for each reader; with a thousand watchers that was most of the
cost of an event. Here a watcher is its bus Subscription, one task listening
for its disconnect, and a loop that writes everything queued for it at once,
as bytes encoded once on the Event (`Event.sse()`). A watcher that stops
reading is let go after SEND_TIMEOUT_SECONDS (or by the bus, when its queue
is full), without slowing the others. Job streams, few and short, stay on
sse-starlette.
"""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import Gauge
from sse_starlette import EventSourceResponse
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from switchd.events import Subscription

PING = b": ping\r\n\r\n"
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx in front: do not buffer
]


class Shutdown:
    """Set once the server is asked to stop: every watcher then ends its stream
    properly, so uvicorn's graceful shutdown is not held up by open streams."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self._watchers: set[Subscription] = set()

    def add(self, subscription: Subscription) -> None:
        self._watchers.add(subscription)

    def discard(self, subscription: Subscription) -> None:
        self._watchers.discard(subscription)

    def set(self) -> None:
        self.event.set()
        for subscription in list(self._watchers):
            subscription.wake()


async def watch_for_exit(shutdown: Shutdown) -> None:
    """Set `shutdown` when the server is asked to stop (SIGTERM, Ctrl-C).

    The signal is heard the way sse-starlette hears it for the job streams, through
    its one shared watcher of uvicorn's exit flag: both kinds of stream end together.
    """
    await EventSourceResponse._listen_for_exit_signal()
    shutdown.set()


class EventStream(Response):
    """One watcher's stream: a Response only to starlette's routing, which calls it
    as the plain ASGI app it is (nothing of Response's body handling is used)."""

    def __init__(
        self,
        subscription: Subscription,
        snapshot: bytes,
        *,
        retry_milliseconds: int,
        shutdown: Shutdown,
        streams: Gauge,
        ping_seconds: float,
        send_timeout_seconds: float,
    ) -> None:
        self._subscription = subscription
        self._snapshot = snapshot  # its first event; empty on a resume
        # Rides on the first event, in its block: a block of its own would reach
        # httpx-sse and the like as an event with empty data.
        self._hint = f"retry: {retry_milliseconds}\r\n".encode()
        self._shutdown = shutdown
        self._streams = streams
        self._ping_seconds = ping_seconds
        self._send_timeout_seconds = send_timeout_seconds
        self._gone = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        subscription = self._subscription
        listener = asyncio.create_task(self._listen(receive))
        self._shutdown.add(subscription)
        self._streams.inc()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            if await self._stream(send):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (TimeoutError, OSError):
            pass  # a reader that stopped reading, or a socket gone: let it go
        finally:
            self._streams.dec()
            self._shutdown.discard(subscription)
            subscription.close()
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _stream(self, send: Send) -> bool:
        """Write events as they come, all that is queued in one write; True when the
        stream should end properly (shutdown), False when the reader is gone."""
        subscription = self._subscription
        events = self._snapshot
        while True:
            events += b"".join(event.sse() for event in subscription.queued())
            if events:
                if self._hint:  # the last field of the first event's block
                    end = events.index(b"\r\n\r\n") + 2
                    events, self._hint = events[:end] + self._hint + events[end:], b""
                await self._send(send, events)
                events = b""
                continue
            if self._gone or subscription.dropped:
                return False
            if self._shutdown.event.is_set():
                return True
            try:
                async with asyncio.timeout(self._ping_seconds):
                    await subscription.wait()
            except TimeoutError:
                await self._send(send, PING)  # keeps proxies from closing an idle stream

    async def _send(self, send: Send, data: bytes) -> None:
        async with asyncio.timeout(self._send_timeout_seconds):
            await send({"type": "http.response.body", "body": data, "more_body": True})

    async def _listen(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._gone = True
        self._subscription.wake()
