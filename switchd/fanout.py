"""`/v1/events` to many watchers: each event encoded once, its bytes shared.

sse-starlette gives every response a task group (the stream, a ping, a
disconnect and a shutdown listener) and every event a new ServerSentEvent,
encoded again for each reader; with a thousand watchers that was most of the
cost of an event. Here a watcher is its bus Subscription, told when its client
leaves (`protocol.watch_leaving`: no task of its own under switchd's protocol),
and a loop that writes everything queued for it at once, as bytes encoded once
on the Event (`Event.sse()`). Job streams, few and short,
stay on sse-starlette.

No watcher has a timer of its own: a timeout around each wait (for the ping) and
each send (for a reader that stopped reading) was two timers scheduled and
cancelled per watcher per event. One clock, kept by `Shutdown` for all of them,
looks at every watcher about once a second instead: one that has written nothing
for its `ping_seconds` is woken to send a `: ping`, and one whose write has been
blocked for its `send_timeout_seconds` is let go (its task cancelled, the cancel
turned into the end of its stream), without slowing the others. The bus lets go
of a reader whose queue is full, too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from prometheus_client import Gauge
from sse_starlette import EventSourceResponse
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from switchd.events import Subscription
from switchd.protocol import client_state, watch_leaving

PING = b": ping\r\n\r\n"
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx in front: do not buffer
]
CLOCK_SECONDS = 1.0  # how often the watchers' clock looks at every watcher


class Shutdown:
    """Every live watcher, and their one clock.

    Set once the server is asked to stop: every watcher then ends its stream
    properly, so uvicorn's graceful shutdown is not held up by open streams.

    The clock is one task, started with the first watcher and ended with the last
    one, or by `close` (the app's lifespan ends): every `clock_seconds` it pings
    the idle watchers and lets go of the stalled ones (`EventStream.tick`).
    `clock` is the time they are measured in (a test may drive it).
    """

    def __init__(
        self,
        clock_seconds: float = CLOCK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.event = asyncio.Event()
        self.clock_seconds = clock_seconds
        self.clock = clock
        self._watchers: set[EventStream] = set()
        self._ticking: asyncio.Task[None] | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._watchers)

    @property
    def ticking(self) -> asyncio.Task[None] | None:
        """The clock's task while there are watchers to look at, else None."""
        return self._ticking

    def add(self, watcher: EventStream) -> None:
        self._watchers.add(watcher)
        if self._ticking is None and not self._closed:
            self._ticking = asyncio.create_task(self._tick_on(), name="switchd-sse-clock")

    def discard(self, watcher: EventStream) -> None:
        self._watchers.discard(watcher)
        if not self._watchers:
            self._stop_clock()

    def set(self) -> None:
        self.event.set()
        for watcher in list(self._watchers):
            watcher.wake()

    def close(self) -> None:
        """The app stops: the clock stops with it, and no watcher starts it again."""
        self._closed = True
        self._stop_clock()

    def tick(self) -> None:
        """Ping the idle watchers and let go of the stalled ones, as of now."""
        now = self.clock()
        for watcher in list(self._watchers):
            watcher.tick(now)

    async def _tick_on(self) -> None:
        while True:
            await asyncio.sleep(self.clock_seconds)
            self.tick()

    def _stop_clock(self) -> None:
        if self._ticking is not None:
            self._ticking.cancel()
            self._ticking = None


async def watch_for_exit(shutdown: Shutdown) -> None:
    """Set `shutdown` when the server is asked to stop (SIGTERM, Ctrl-C), and close it
    when this task is cancelled (the lifespan ends).

    The signal is heard the way sse-starlette hears it for the job streams, through
    its one shared watcher of uvicorn's exit flag: both kinds of stream end together.
    """
    try:
        await EventSourceResponse._listen_for_exit_signal()
        shutdown.set()
        await asyncio.Future()  # the streams end; the clock runs until the lifespan ends
    finally:
        shutdown.close()


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
        # For the clock: when the last write began, whether it is still under way, and
        # whether the clock asked for a ping or let this watcher go.
        self._written = 0.0
        self._sending = False
        self._ping_due = False
        self._let_go = False
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0  # cancel requests its task had before this stream began

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        subscription = self._subscription
        self._task = asyncio.current_task()
        if self._task is not None:
            self._cancelling = self._task.cancelling()
        self._written = self._shutdown.clock()
        stop_watching = watch_leaving(scope, receive, self._left)
        self._gone = stop_watching is None
        self._shutdown.add(self)
        self._streams.inc()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            if await self._stream(send):
                end: Message = {"type": "http.response.body", "body": b"", "more_body": False}
                await self._send(send, end)
        except TimeoutError:  # a reader that stopped reading: let go
            if (client := client_state(scope)) is not None:
                client.drop()
        except OSError:
            pass  # a socket gone
        finally:
            self._streams.dec()
            self._shutdown.discard(self)
            subscription.close()
            if stop_watching is not None:
                stop_watching()

    async def _stream(self, send: Send) -> bool:
        """Write events as they come, all that is queued in one write; True when the
        stream should end properly (shutdown), False when the reader is gone."""
        subscription = self._subscription
        shutdown = self._shutdown.event
        events = self._snapshot
        while True:
            queued = subscription.queued()
            if queued or events:
                if queued:
                    events += b"".join([event.sse() for event in queued])
                if self._hint:  # the last field of the first event's block
                    end = events.index(b"\r\n\r\n") + 2
                    events, self._hint = events[:end] + self._hint + events[end:], b""
                await self._send(
                    send, {"type": "http.response.body", "body": events, "more_body": True}
                )
                events = b""
            elif self._gone or subscription.dropped:
                return False
            elif shutdown.is_set():
                return True
            elif self._ping_due:
                self._ping_due = False
                if self._shutdown.clock() - self._written >= self._ping_seconds:
                    # Keeps proxies from closing an idle stream.
                    await self._send(
                        send, {"type": "http.response.body", "body": PING, "more_body": True}
                    )
            # At once when something came during the send, or the reader is woken
            # (gone, the server stops, a ping is due); else until the next event.
            await subscription.wait()

    async def _send(self, send: Send, message: Message) -> None:
        """`send`, which the clock lets go of (TimeoutError) when it stays blocked."""
        self._written = self._shutdown.clock()
        self._sending = True
        try:
            await send(message)
        except asyncio.CancelledError:
            task = self._task
            if self._let_go and task is not None and task.uncancel() <= self._cancelling:
                raise TimeoutError("the reader stopped reading") from None
            raise  # a cancel of its own (the server stops): not the clock's
        finally:
            self._sending = False

    def tick(self, now: float) -> None:
        """The clock's look at this watcher."""
        if self._sending:
            if now - self._written >= self._send_timeout_seconds and not self._let_go:
                self._let_go = True
                if self._task is not None:
                    self._task.cancel()
        elif now - self._written >= self._ping_seconds:
            self._ping_due = True
            self._subscription.wake()

    def wake(self) -> None:
        self._subscription.wake()

    def _left(self) -> None:
        self._gone = True
        self._subscription.wake()
