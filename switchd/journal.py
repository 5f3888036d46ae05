"""The event journal: every event but engine `log` lines, as JSON lines on disk.

So `Last-Event-ID` resumes across restarts of switchd, and a collector that was
down while switchd restarted still gets what happened.

Format: `state_dir/journal/events-<after>.jsonl`, segment files whose name is
the id of the last event journaled before the segment opened (zero-padded to
20 digits, so names sort as ids do): a segment holds every journaled event
with an id above `after`, up to the next segment's `after`. Each line is
exactly what `/v1/events` sends as the event's data: `{"id", "event", "ts", …}`.
A segment is closed past `segment_bytes`; the oldest ones are removed while
all of them together exceed `max_bytes`.

Engine `log` lines are not journaled: they are many, rate-limited and
droppable on every stream already, and a failed load's error carries its
engine's last lines. A resume served from the journal gets stages and states.

Writing never blocks the event loop: `append` puts the encoded line on a queue
and one writer thread writes whatever is queued, then `flush`es it to the
kernel at once (a `kill -9` of switchd loses only lines still in the queue:
those published in the last moments, measured in tests/integration/
test_collectors.py) and `fsync`s at most every FSYNC_SECONDS (a power cut may
lose up to that much more).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from switchd import wire
from switchd.events import Event, EventBus

log = logging.getLogger(__name__)

DIRECTORY = "journal"
PREFIX = "events-"
SUFFIX = ".jsonl"
SEGMENTS = 8  # a journal is about this many segments: the oldest goes as a whole
MIN_SEGMENT_BYTES = 64 * 1024
FSYNC_SECONDS = 1.0
DRAIN_SECONDS = 5.0  # the longest a reader waits for the writer to catch up


def segment_name(after: int) -> str:
    return f"{PREFIX}{after:020d}{SUFFIX}"


def segment_after(path: Path) -> int | None:
    """The `after` id in a segment's name, or None for a file that is no segment."""
    name = path.name
    if not (name.startswith(PREFIX) and name.endswith(SUFFIX)):
        return None
    digits = name[len(PREFIX) : -len(SUFFIX)]
    return int(digits) if digits.isascii() and digits.isdigit() else None


def parse_line(line: str) -> Event | None:
    """An event back from its journal line; None for a line cut short by a crash."""
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    event_id, name = data.pop("id", None), data.pop("event", None)
    if not isinstance(event_id, int) or not isinstance(name, str):
        return None
    return Event(event_id, name, data)


@dataclass(frozen=True)
class Found:
    """What the journal on disk held at start."""

    last_id: int  # 0: nothing journaled yet
    covered_after: int | None  # resumes from ids at or above this are served; None: empty


class Journal:
    """One writer thread, fed by `append` (from the event loop, never blocking)."""

    def __init__(self, state_dir: Path, max_bytes: int) -> None:
        self.directory = state_dir / DIRECTORY
        self.max_bytes = max_bytes
        self.segment_bytes = max(MIN_SEGMENT_BYTES, max_bytes // SEGMENTS)
        self._queue: queue.SimpleQueue[tuple[int, str] | None] = queue.SimpleQueue()
        self._lock = threading.Condition()
        self._appended = 0  # the last id handed to the writer
        self._written = 0  # the last id the writer wrote (and flushed)
        self._thread: threading.Thread | None = None
        self._file: IO[str] | None = None
        self._size = 0
        self._synced = 0.0
        self._dirty = False
        self.covered_after: int | None = None
        self.last_id = 0
        self._in_file = 0  # the last id written to a segment (the writer's own)
        self._floor = 0  # where this run's ids start: no segment opens before it

    # ---- start and stop: called off the event loop (asyncio.to_thread) ----------

    def open(self) -> Found:
        """Read what earlier runs left; `start` the writer once the bus's ids are known."""
        self.directory.mkdir(parents=True, exist_ok=True)
        segments = self._segments()
        if segments:
            self.covered_after = segments[0][0]
            after, newest = segments[-1]
            self.last_id = after
            for event in self._read(newest):
                self.last_id = max(self.last_id, event.id)
        self._appended = self._written = self._in_file = self.last_id
        return Found(self.last_id, self.covered_after)

    def start(self, bus_last_id: int) -> None:
        """Start writing; this run's first event gets an id above `bus_last_id`."""
        self._floor = bus_last_id
        if self.covered_after is None:  # this run's first segment will say so
            self.covered_after = bus_last_id
        self._thread = threading.Thread(target=self._write_on, name="switchd-journal", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Write what is queued, sync it, stop the thread."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join()
        self._thread = None

    # ---- from the event loop -------------------------------------------------------

    def append(self, event: Event) -> None:
        """A bus listener: queue the event's line for the writer; never blocks."""
        if event.name == wire.LOG or self._thread is None:
            return
        self._appended = event.id
        self._queue.put((event.id, event.json()))

    # ---- readers: off the event loop ---------------------------------------------

    def covers(self, last_id: int) -> bool:
        """Whether every journaled event after `last_id` is still on disk."""
        return self.covered_after is not None and last_id >= self.covered_after

    def read_after(self, last_id: int) -> list[Event]:
        """Every journaled event with an id above `last_id`, once the writer has
        written all that was appended before this call."""
        target = self._appended
        with self._lock:
            self._lock.wait_for(lambda: self._written >= target, timeout=DRAIN_SECONDS)
        found: list[Event] = []
        segments = self._segments()
        # The segments that may hold ids above last_id: from the last one opened at or
        # before it on.
        first = 0
        for index, (after, _) in enumerate(segments):
            if after <= last_id:
                first = index
        for _, path in segments[first:]:
            found.extend(event for event in self._read(path) if event.id > last_id)
        return found

    # ---- the writer thread ---------------------------------------------------------

    def _write_on(self) -> None:
        try:
            while True:
                item: tuple[int, str] | None = self._queue.get()
                batch: list[tuple[int, str]] = []
                stop = item is None
                if item is not None:
                    batch.append(item)
                while not stop:  # everything queued now, in one write
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                    else:
                        batch.append(more)
                if batch:
                    self._write(batch)
                self._sync(force=stop)
                if stop:
                    return
        except Exception:
            log.exception("the event journal stopped writing")
        finally:
            if self._file is not None:
                with contextlib.suppress(OSError):
                    self._file.close()
                self._file = None

    def _write(self, batch: list[tuple[int, str]]) -> None:
        for event_id, line in batch:
            if self._file is None or self._size >= self.segment_bytes:
                self._rotate()
            assert self._file is not None
            text = line + "\n"
            self._file.write(text)
            self._size += len(text.encode())
            self._in_file = event_id
        assert self._file is not None
        self._file.flush()  # to the kernel: a kill -9 of switchd can no longer lose it
        self._dirty = True
        with self._lock:
            self._written = batch[-1][0]
            self.last_id = self._written
            self._lock.notify_all()

    def _sync(self, *, force: bool) -> None:
        now = time.monotonic()
        due = force or now - self._synced >= FSYNC_SECONDS
        if self._file is not None and self._dirty and due:
            os.fsync(self._file.fileno())
            self._synced, self._dirty = now, False

    def _rotate(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        # Every journaled event after this id is in this segment or a later one; ids
        # between the last one written and this run's first were never journaled.
        path = self.directory / segment_name(max(self._in_file, self._floor))
        self._file = path.open("a", encoding="utf-8")
        self._size = path.stat().st_size
        if self.covered_after is None:
            self.covered_after = max(self._in_file, self._floor)
        self._prune()

    def _prune(self) -> None:
        """Remove the oldest segments while the journal is over its bound."""
        segments = self._segments()
        sizes = [path.stat().st_size for _, path in segments]
        total = sum(sizes)
        index = 0
        while total > self.max_bytes and index < len(segments) - 1:
            segments[index][1].unlink(missing_ok=True)
            total -= sizes[index]
            index += 1
        if index:
            self.covered_after = segments[index][0]

    def _segments(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.directory.iterdir():
            after = segment_after(path)
            if after is not None:
                found.append((after, path))
        return sorted(found)

    @staticmethod
    def _read(path: Path) -> list[Event]:
        events: list[Event] = []
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:  # pruned meanwhile
            return events
        for line in text.splitlines():
            event = parse_line(line)
            if event is not None:
                events.append(event)
        return events


def first_id(found: Found, boot_id: int) -> int:
    """The id the bus counts on from (its next event gets one more): boot time in
    microseconds, or the last journaled id when that is later (a clock set back)."""
    return max(boot_id, found.last_id)


async def missed_since(bus: EventBus, journal: Journal | None, last_id: int) -> list[Event] | None:
    """What a reader resuming after `last_id` missed: memory's ring when it holds it
    all, else the journal for what came before the ring; None when neither has it
    (a gap). The journal has no engine lines: a resume served from it gets none.

    The caller subscribes right after, with no await between: the ring's part is
    taken last, synchronously, so nothing published meanwhile is lost or doubled."""
    ring = bus.missed_since(last_id)
    if ring is not None or journal is None or not journal.covers(last_id):
        return ring
    published = bus.last_id  # the journal's read has everything up to here
    older = await asyncio.to_thread(journal.read_after, last_id)
    oldest = bus.oldest_id
    if oldest is None:
        return older
    if oldest > published + 1:  # the ring moved past what the journal's read reached
        return None
    return [event for event in older if event.id < oldest] + bus.held_after(last_id)
