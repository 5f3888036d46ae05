"""Every host's `/v1/events` on one resumable stream, each event with its `host`.

Resumption uses the gateway's own sequence and a bounded ring (2,048 events),
not ids that encode each host's cursor: a client keeps one plain integer, as
with one switchd. The gateway keeps each host's cursor itself (the last id it
read there) and resumes each host's stream with it, so a host's events are not
lost while the gateway reconnects to it. Ids start at the gateway's boot time
in microseconds, so an id from a gateway that ran before is never taken for a
newer one: resuming from it (or from one older than the ring) starts with an
explicit `gap` event, then a fresh `snapshot`.

Each event's JSON carries `id` (the gateway's), `event`, `ts` (the host's when
it sent one), `host`, and `host_id` (the host's own id). A host's own opening
`snapshot` arrives as `host_snapshot`, so that `snapshot` stays the whole
fleet's status. Host comings and goings are `host_state` events.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import httpx

from switchd import sse
from switchd.client import SseParser

RING = 2048
QUEUE = 1024  # events a subscriber may fall behind by before it is dropped
PING_SECONDS = 15.0
RETRY_MS = 3000
RECONNECT_SECONDS = 0.5

log = logging.getLogger(__name__)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class MergedEvents:
    def __init__(self) -> None:
        self._ring: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=RING)
        self._last = int(time.time() * 1_000_000)
        self._subscribers: set[asyncio.Queue[bytes | None]] = set()

    @property
    def last_id(self) -> int:
        return self._last

    def publish(self, name: str, data: dict[str, Any]) -> int:
        self._last += 1
        body = {**data, "id": self._last, "event": name}
        body.setdefault("ts", now_iso())
        block = sse.block(self._last, name, json.dumps(body, separators=(",", ":")))
        self._ring.append((self._last, block))
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(block)
            except asyncio.QueueFull:
                # A reader that does not read is dropped, never slowing the others.
                self._subscribers.discard(queue)
                with contextlib.suppress(asyncio.QueueFull):
                    queue.get_nowait()
                    queue.put_nowait(None)
        return self._last

    def replay(self, after: int) -> list[bytes] | None:
        """The events after `after`, or None when the ring no longer holds them all."""
        if after > self._last:
            return None  # from another gateway's run, or made up
        if after == self._last:
            return []
        if not self._ring or self._ring[0][0] > after + 1:
            return None
        return [block for event_id, block in self._ring if event_id > after]

    def subscribe(self) -> asyncio.Queue[bytes | None]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[bytes | None]) -> None:
        self._subscribers.discard(queue)

    async def stream(
        self, after: int | None, status: Callable[[], dict[str, Any]]
    ) -> AsyncIterator[bytes]:
        """A subscriber's bytes: what it missed (or a gap and a snapshot), then live."""
        queue = self.subscribe()  # first, so nothing between the two is lost
        try:
            missed = None if after is None else self.replay(after)
            if missed is None:
                opening = b""
                if after is not None:
                    oldest = self._ring[0][0] if self._ring else self._last
                    gap = {"id": self._last, "event": "gap", "ts": now_iso(), "from": after}
                    gap["oldest"] = oldest
                    gap["message"] = "Events since that id cannot be replayed: a fresh snapshot"
                    opening += sse.block(None, "gap", json.dumps(gap, separators=(",", ":")))
                body = {**status(), "id": self._last, "event": "snapshot", "ts": now_iso()}
                snap = sse.block(self._last, "snapshot", json.dumps(body, separators=(",", ":")))
                yield sse.with_retry(opening + snap, RETRY_MS)
            elif missed:
                yield sse.with_retry(b"".join(missed), RETRY_MS)
            while True:
                try:
                    block = await asyncio.wait_for(queue.get(), PING_SECONDS)
                except TimeoutError:
                    yield sse.PING
                    continue
                if block is None:
                    return
                yield block
        finally:
            self.unsubscribe(queue)


class HostFollower:
    """Reads one host's `/v1/events` into the merged stream, resuming with the last id
    it saw there, until cancelled."""

    def __init__(self, host: str, url: str, events: MergedEvents, http: httpx.AsyncClient) -> None:
        self.host, self.url = host, url
        self._events, self._http = events, http
        self.cursor: str | None = None
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"events-{self.host}")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def _run(self) -> None:
        while True:
            try:
                await self._follow()
            except (httpx.HTTPError, ValueError) as exc:
                log.debug("events of %s: %s", self.host, exc)
            await asyncio.sleep(RECONNECT_SECONDS)

    async def _follow(self) -> None:
        headers = {"Accept": "text/event-stream"}
        if self.cursor is not None:
            headers["Last-Event-ID"] = self.cursor
        timeout = httpx.Timeout(5.0, read=PING_SECONDS * 2)
        url = f"{self.url}/v1/events"
        async with self._http.stream("GET", url, headers=headers, timeout=timeout) as answer:
            if answer.status_code == 400 and self.cursor is not None:
                self.cursor = None  # a cursor the host no longer takes: start afresh
                return
            answer.raise_for_status()
            parser = SseParser()
            async for line in answer.aiter_lines():
                event = parser.feed(line)
                if event is None:
                    continue
                data = dict(event.data) if isinstance(event.data, dict) else {"data": event.data}
                host_id = event.id if event.id is not None else data.get("id")
                name = str(data.get("event") or event.name)
                if name == "snapshot":
                    name = "host_snapshot"
                data.update(host=self.host, host_id=host_id)
                self._events.publish(name, data)
                if host_id is not None:
                    self.cursor = str(host_id)
