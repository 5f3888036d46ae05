"""Every event stream switchd serves (a job's, `/v1/events`): one writer.

A stream is a source of events (a bus Subscription, or a job's own events,
`JobEvents`) and a loop that writes everything queued for it at once, as bytes
encoded once on the Event (`Event.sse()`, switchd/sse.py), told when its client
leaves (`protocol.watch_leaving`: no task of its own under switchd's protocol)
and when the server stops (`protocol.watch_stopping`: uvicorn asks each
connection to shut down), then ending properly, with last words if it has any.

sse-starlette, which served the job streams, is not used: it gives every
response a task group (the stream, a ping, a disconnect and a shutdown
listener) and every event a new ServerSentEvent, encoded again for each reader;
with a thousand watchers that was most of the cost of an event (measured with
its public API on /v1/events: p99 828 ms and 58 KiB a watcher at 1,000, against
68 ms and 22 KiB here), and it heard the server stop only through its private
parts.

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
import logging
import time
from collections.abc import Callable
from typing import Protocol

from prometheus_client import Gauge
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from switchd.events import Event
from switchd.jobs import Job
from switchd.protocol import client_state, watch_leaving, watch_stopping
from switchd.sse import HEADERS, PING, with_retry

log = logging.getLogger(__name__)

CLOCK_SECONDS = 1.0  # how often the watchers' clock looks at every watcher


class Shutdown:
    """Every live watcher, and their one clock.

    `set`: every watcher ends its stream properly, as each does when the server
    tells its connection to stop (an app served in-process is stopped so).

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
        # Run once when the server begins to stop, before any stream ends: the
        # scheduler ends its jobs there, so every open stream still tells their end.
        self.on_stopping: list[Callable[[], None]] = []

    def stopping(self) -> None:
        """The server begins to stop (a stream heard it, or `set`): run `on_stopping`."""
        hooks, self.on_stopping = self.on_stopping, []
        for hook in hooks:
            try:
                hook()
            except Exception:  # the streams end properly all the same
                log.exception("while switchd began to stop")

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
        self.stopping()
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


class Source(Protocol):
    """What a stream writes from: a bus Subscription, or a job's events."""

    @property
    def dropped(self) -> bool:
        """It let its reader go (fell too far behind): the stream is cut."""

    def queued(self) -> list[Event]:
        """Everything there is for the reader now, without waiting."""

    async def wait(self) -> None:
        """Until something is queued, or `wake`, since `queued()` was last taken."""

    def wake(self) -> None: ...

    def close(self) -> None: ...


class JobEvents:
    """A job's events after `after`, as a stream's source: every one it keeps, then
    live ones, until it ends (`finished`)."""

    def __init__(self, job: Job, after: int) -> None:
        self._job = job
        self._after = after
        self._pending: list[Event] = []
        self._woken = asyncio.Event()  # few streams, short: no need to spare an Event
        self._follower: asyncio.Task[None] | None = None
        self._taken = after  # the last id handed to the stream
        self._ended = False
        self.dropped = False  # a job keeps all it emitted: no reader is let go

    def finished(self) -> bool:
        """The job ended and its reader has taken every event."""
        return self._ended and not self._pending

    def queued(self) -> list[Event]:
        self._woken.clear()
        taken, self._pending = self._pending, []
        if taken:
            self._taken = taken[-1].id
        return taken

    def unsent(self) -> list[Event]:
        """The job's events the stream has not taken yet (its follower may not have
        seen them): what it ends with when the server stops."""
        return [event for event in self._job.events if event.id > self._taken]

    async def wait(self) -> None:
        if self._follower is None:  # started with the stream, not with the answer
            self._follower = asyncio.create_task(self._follow(), name="switchd-job-stream")
        if not self._pending and not self._ended:
            await self._woken.wait()

    def wake(self) -> None:
        self._woken.set()

    def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()

    async def _follow(self) -> None:
        async for event in self._job.follow():
            if event.id > self._after:
                self._pending.append(event)
                self.wake()
        self._ended = True
        self.wake()


def never() -> bool:
    return False


def nothing() -> bytes:
    return b""


class EventStream(Response):
    """One reader's stream: a Response only to starlette's routing, which calls it
    as the plain ASGI app it is (nothing of Response's body handling is used).

    `first`: what it starts with (the snapshot; empty on a resume); `finished`:
    when the source will give no more (a job ended), so the stream ends;
    `last_words`: what it ends with when the server stops.
    """

    def __init__(
        self,
        source: Source,
        first: bytes,
        *,
        retry_milliseconds: int,
        shutdown: Shutdown,
        streams: Gauge,
        ping_seconds: float,
        send_timeout_seconds: float,
        finished: Callable[[], bool] = never,
        last_words: Callable[[], bytes] = nothing,
    ) -> None:
        self._source = source
        self._first = first
        self._retry = retry_milliseconds  # rides on the first event; 0 once it went
        self._finished = finished
        self._last_words = last_words
        self._stopping = False  # the server stops: told by this stream's connection
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
        source = self._source
        self._task = asyncio.current_task()
        if self._task is not None:
            self._cancelling = self._task.cancelling()
        self._written = self._shutdown.clock()
        stop_watching = watch_leaving(scope, receive, self._left)
        self._gone = stop_watching is None
        stop_hearing = watch_stopping(scope, self._stop)
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
            source.close()
            if stop_watching is not None:
                stop_watching()
            if stop_hearing is not None:
                stop_hearing()

    async def _stream(self, send: Send) -> bool:
        """Write events as they come, all that is queued in one write; True when the
        stream should end properly (its source finished, the server stops), False
        when the reader is gone."""
        source = self._source
        shutdown = self._shutdown.event
        events = self._first
        while True:
            queued = source.queued()
            if queued or events:
                if queued:
                    events += b"".join([event.sse() for event in queued])
                await self._write(send, events)
                events = b""
                # Looked at again before waiting: the server may have begun to stop
                # with these (the ends of the jobs it cut) as the stream's last events.
                continue
            if self._gone or source.dropped:
                return False
            elif self._finished():
                return True
            elif self._stopping or shutdown.is_set():
                if last := self._last_words():
                    await self._write(send, last)
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
            await source.wait()

    async def _write(self, send: Send, events: bytes) -> None:
        """Whole event blocks; the first carries the reconnection delay."""
        if self._retry:
            events, self._retry = with_retry(events, self._retry), 0
        await self._send(send, {"type": "http.response.body", "body": events, "more_body": True})

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
            self._source.wake()

    def wake(self) -> None:
        self._source.wake()

    def _left(self) -> None:
        self._gone = True
        self._source.wake()

    def _stop(self) -> None:
        self._stopping = True
        self._shutdown.stopping()  # jobs end now: their last events are queued first
        self._source.wake()
