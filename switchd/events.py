"""The server's event stream: ids, a replay ring and bounded subscribers.

Every event gets the next id of one server-wide sequence, so `/v1/events`
and a switch's own stream agree on ids and `Last-Event-ID` works for both.
A subscriber that stops reading is dropped: a slow log collector must never
slow a switch or the other subscribers.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

RING_SIZE = 2048
SUBSCRIBER_QUEUE_SIZE = 1024


@dataclass(frozen=True)
class Event:
    id: int
    name: str  # the SSE `event:` field: a stage, `model_state` or `snapshot`
    data: Mapping[str, Any]

    def json(self) -> str:
        return json.dumps(self.data, separators=(",", ":"))


class Subscription:
    """One reader of the bus: replayed events first, then live ones."""

    def __init__(self, bus: EventBus, replay: list[Event]) -> None:
        self._bus = bus
        # Room for the whole replay on top of the live allowance.
        capacity = SUBSCRIBER_QUEUE_SIZE + len(replay)
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(capacity)
        for event in replay:
            self._queue.put_nowait(event)
        self.dropped = False

    def offer(self, event: Event) -> None:
        """Called by the bus; never blocks."""
        if self.dropped:
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped = True
            self._bus.unsubscribe(self)
            # Make room for the end marker so the reader wakes up and leaves.
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            while (event := await self._queue.get()) is not None:
                yield event
        finally:
            self._bus.unsubscribe(self)

    def close(self) -> None:
        self._bus.unsubscribe(self)


class EventBus:
    def __init__(self, ring_size: int = RING_SIZE, first_id: int | None = None) -> None:
        self._ring: deque[Event] = deque(maxlen=ring_size)
        self._subscribers: set[Subscription] = set()
        self._listeners: list[Callable[[Event], None]] = []
        # Ids start at the boot time in microseconds, so an id from an earlier run of
        # switchd is always older than this run's: its client gets a fresh snapshot,
        # never this run's events replayed as if they followed its own.
        self._last_id = time.time_ns() // 1000 if first_id is None else first_id

    @property
    def last_id(self) -> int:
        return self._last_id

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def publish(self, name: str, data: Mapping[str, Any]) -> Event:
        self._last_id += 1
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
