"""The server's event stream: ids, a replay ring and bounded subscribers.

Every event gets the next id of one server-wide sequence, so `/v1/events`
and a switch's own stream agree on ids and `Last-Event-ID` works for both.

A subscriber's queue holds two kinds of event under separate bounds. Stage
and state events are never given up: a subscriber whose SUBSCRIBER_QUEUE_SIZE
of them is full truly does not read and is dropped, so a stalled collector
never slows a switch or the other subscribers. Engine `log` lines are
droppable: past LOG_QUEUE_SIZE queued lines the oldest are skipped, never a
stage, and the reader is told once, in order, how many it missed. Before any
of that, `LogRate` keeps an engine that prints thousands of lines from
flooding the bus in the first place.

Every event is self-describing on the wire: its JSON carries its `id`, its
`event` name and a `ts` (added when the publisher gave none), so a log
collector that keeps only the data lines loses nothing.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from switchd import sse, wire
from switchd.units import iso_timestamp

RING_SIZE = 2048
SUBSCRIBER_QUEUE_SIZE = 1024  # stage and state events a reader may fall behind by
LOG_QUEUE_SIZE = 256  # log lines a reader may fall behind by; older ones are skipped

# What one load may publish as `log` events: a token bucket per job.
LOG_LINES_PER_SECOND = 100.0
LOG_BURST = 200
LOG_SUMMARY_SECONDS = 1.0  # lines held back are summed up at most this often
LOG_RATE_KEYS = 64  # loads tracked at once; the oldest is forgotten past it


@dataclass(frozen=True)
class Event:
    id: int
    name: str  # the SSE `event:` field: a stage, `log`, `model_state`, `snapshot` or `gap`
    data: Mapping[str, Any]
    # Encoded once, however many streams send it.
    _json: str | None = field(default=None, init=False, repr=False, compare=False)

    _sse: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def json(self) -> str:
        encoded = self._json
        if encoded is None:
            encoded = json.dumps(
                {"id": self.id, "event": self.name, **self.data}, separators=(",", ":")
            )
            object.__setattr__(self, "_json", encoded)
        return encoded

    def sse(self) -> bytes:
        """The event as one Server-Sent Events block, encoded once for every reader."""
        block = self._sse
        if block is None:
            block = sse.block(self.id, self.name, self.json())
            object.__setattr__(self, "_sse", block)
        return block


def opening(
    last_id: int, status: Mapping[str, Any], asked: int | None, oldest: int | None
) -> bytes:
    """What `/v1/events` starts with when it cannot resume: the status as a
    `snapshot`, after a `gap` event when a resume after `asked` was refused (with
    `oldest`, the oldest id still held). Both carry `last_id`, so the reader's next
    resume asks for what follows them."""
    ts = iso_timestamp(time.time())
    blocks = b""
    if asked is not None:
        message = f"events after {asked} are no longer held: a fresh snapshot follows"
        gap = {"ts": ts, "asked": asked, "oldest": oldest, "message": message}
        blocks = Event(last_id, wire.GAP, gap).sse()
    reason = "connect" if asked is None else "gap"
    return blocks + Event(last_id, wire.SNAPSHOT, {"ts": ts, "reason": reason, **status}).sse()


def skipped_notice(last: Event, lines: int) -> Event:
    """The `log` event that tells a reader `lines` engine lines were skipped for it.

    It has the shape of the log line it stands in for (the last one skipped: same
    job fields and id), with `line` and `message` saying what happened and
    `skipped` the count, so a reader that shows `line` needs nothing new."""
    text = f"{lines} engine log lines skipped: this reader fell behind"
    return Event(last.id, wire.LOG, {**last.data, "line": text, "message": text, "skipped": lines})


def _lines_in(event: Event) -> int:
    """Engine lines a `log` event stands for: one, or a summary's count."""
    skipped = event.data.get("skipped")
    return skipped if isinstance(skipped, int) and skipped > 0 else 1


class Subscription:
    """One reader of the bus: replayed events first, then live ones, in id order."""

    def __init__(self, bus: EventBus, replay: list[Event]) -> None:
        self._bus = bus
        self._events: deque[Event] = deque()  # stages and states: never skipped
        self._logs: deque[Event] = deque()  # engine lines: the oldest go first
        for event in replay:
            (self._logs if event.name == wire.LOG else self._events).append(event)
        # Room for the whole replay on top of the live allowances.
        self._events_room = SUBSCRIBER_QUEUE_SIZE + len(self._events)
        self._logs_room = LOG_QUEUE_SIZE + len(self._logs)
        self._skipped = 0  # lines skipped since the reader was last told
        self._last_skipped: Event | None = None
        # Its reader's wake-up: a flag, and the future of a reader waiting for it.
        # One reader per subscription, so no asyncio.Event (and its list of waiters,
        # its checks) on the path of every event to every reader.
        self._woken = False
        self._waiter: asyncio.Future[None] | None = None
        self.skipped_total = 0  # every line this reader missed
        self.dropped = False

    def offer(self, event: Event) -> None:
        """Called by the bus; never blocks."""
        if self.dropped:
            return
        if event.name == wire.LOG:
            if len(self._logs) >= self._logs_room:
                self._skip(self._logs.popleft())
            self._logs.append(event)
        elif len(self._events) >= self._events_room:
            self._drop()
            return
        else:
            self._events.append(event)
        self.wake()

    def _skip(self, event: Event) -> None:
        lines = _lines_in(event)
        self._skipped += lines
        self.skipped_total += lines
        self._last_skipped = event

    def _drop(self) -> None:
        self.dropped = True
        self._bus.unsubscribe(self)
        # Free what it held; the reader wakes up and leaves.
        self._events.clear()
        self._logs.clear()
        self._skipped, self._last_skipped = 0, None
        self.wake()

    def _next(self) -> Event | None:
        """The queued event with the lowest id, the notice of skipped lines in its place."""
        event = self._events[0] if self._events else None
        log = self._logs[0] if self._logs else None
        if log is not None and (event is None or log.id < event.id):
            event = log
        last = self._last_skipped
        # Every queued line is newer than the skipped ones: the notice goes before them.
        if last is not None and (event is None or last.id < event.id):
            notice = skipped_notice(last, self._skipped)
            self._skipped, self._last_skipped = 0, None
            return notice
        if event is log and log is not None:
            return self._logs.popleft()
        if event is not None:
            return self._events.popleft()
        return None

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            while True:
                event = self._next()
                if event is not None:
                    yield event
                elif self.dropped:
                    return
                else:
                    self._woken = False
                    await self._woken_up()
        finally:
            self._bus.unsubscribe(self)

    def wake(self) -> None:
        """Wake its reader: something came, the connection went away, the server stops."""
        self._woken = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _woken_up(self) -> None:
        if self._woken:
            return
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    async def wait(self) -> None:
        """Until something is queued for it, or `wake`, since it last took `queued()`."""
        if self._events or self._logs or self._last_skipped is not None or self.dropped:
            return
        await self._woken_up()

    def queued(self) -> list[Event]:
        """Every event queued for this reader now, without waiting; it stays subscribed."""
        self._woken = False  # what woke it is taken now; `wait` waits for what is next
        taken: list[Event] = []
        while (event := self._next()) is not None:
            taken.append(event)
        return taken

    def close(self) -> None:
        self._bus.unsubscribe(self)


@dataclass
class _Allowance:
    tokens: float
    refilled: float  # when `tokens` was last topped up
    source: str  # the model whose lines these are
    held: int = 0  # lines held back, not yet summed up
    held_since: float = 0.0  # when the first of them came


class LogRate:
    """How many engine lines each load may publish: a token bucket per key (a job).

    Lines past it are counted instead of published, and the count is due as one
    summary at most every `every` seconds, checked on the next line, so no timer
    is needed; `flush` hands over what is left when the load ends."""

    def __init__(
        self,
        rate: float = LOG_LINES_PER_SECOND,
        burst: int = LOG_BURST,
        every: float = LOG_SUMMARY_SECONDS,
        max_keys: int = LOG_RATE_KEYS,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.every = every
        self.max_keys = max_keys
        self._allowances: dict[str, _Allowance] = {}

    def admit(self, key: str, source: str, now: float) -> tuple[bool, int]:
        """Whether this line may be published, and how many held-back lines (this one
        included when it is held) are due now as one summary, published before it."""
        allowance = self._allowances.get(key)
        if allowance is None:
            while len(self._allowances) >= self.max_keys:  # a load no one flushed
                del self._allowances[next(iter(self._allowances))]
            allowance = self._allowances[key] = _Allowance(float(self.burst), now, source)
        allowance.source = source
        allowance.tokens = min(
            float(self.burst), allowance.tokens + (now - allowance.refilled) * self.rate
        )
        allowance.refilled = now
        admitted = allowance.tokens >= 1.0
        if admitted:
            allowance.tokens -= 1.0
        else:
            if allowance.held == 0:
                allowance.held_since = now
            allowance.held += 1
        due = 0
        if allowance.held and now - allowance.held_since >= self.every:
            due, allowance.held = allowance.held, 0
        return admitted, due

    def flush(self, key: str) -> tuple[str, int]:
        """Forget `key`: its source and the lines still held back for it."""
        allowance = self._allowances.pop(key, None)
        return ("", 0) if allowance is None else (allowance.source, allowance.held)


class EventBus:
    def __init__(self, ring_size: int = RING_SIZE, first_id: int | None = None) -> None:
        self._ring: deque[Event] = deque(maxlen=ring_size)
        self._subscribers: set[Subscription] = set()
        self._listeners: list[Callable[[Event], None]] = []
        # Ids start at the boot time in microseconds, so an id from an earlier run of
        # switchd is always older than this run's: its client gets a fresh snapshot,
        # never this run's events replayed as if they followed its own.
        # A journal from earlier runs (switchd/journal.py) passes its last id + 1 when
        # that is later, so ids stay unique and increasing across restarts.
        self._last_id = time.time_ns() // 1000 if first_id is None else first_id

    @property
    def last_id(self) -> int:
        return self._last_id

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def publish(self, name: str, data: Mapping[str, Any]) -> Event:
        self._last_id += 1
        if "ts" not in data:  # job events carry their own; model_state and the like get one
            data = {**data, "ts": iso_timestamp(time.time())}
        event = Event(self._last_id, name, data)
        self._ring.append(event)
        for listener in self._listeners:
            listener(event)
        for subscriber in list(self._subscribers):
            subscriber.offer(event)
        return event

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        """A synchronous callback for every event (metrics): must be quick, never blocks."""
        self._listeners.append(listener)

    @property
    def oldest_id(self) -> int | None:
        """The oldest id the ring still holds, None when it holds nothing."""
        return self._ring[0].id if self._ring else None

    def held_after(self, last_id: int) -> list[Event]:
        """What the ring holds after `last_id` (it may lack older ones)."""
        return [event for event in self._ring if event.id > last_id]

    def missed_since(self, last_id: int) -> list[Event] | None:
        """Events after `last_id`, or None when the ring no longer holds them all."""
        if last_id > self._last_id:
            return None  # an id from before a restart: the client needs a snapshot
        if last_id == self._last_id:
            return []
        if not self._ring or self._ring[0].id > last_id + 1:
            return None
        return [event for event in self._ring if event.id > last_id]

    def subscribe(self, replay: list[Event] | None = None) -> Subscription:
        """Live events from now on, after `replay`; atomic with publish."""
        subscription = Subscription(self, replay or [])
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)
