"""`switchd events`: follow `/v1/events` as one JSON object a line, for collectors.

Each line is the event's own JSON (`id`, `event`, `ts` and its fields). The
follower reconnects by itself with backoff when switchd goes away, resuming
with `Last-Event-ID`. With `--cursor-file`, the id of each event is committed
after its line is written and flushed (a temporary file, then `os.replace`):
a follower killed at any moment and started again with the same file loses
nothing; the last line may come twice (a collector dedupes by `id`), and within
one run it never does.

`--since ID` starts after that id; `--since TIME` (ISO 8601) starts from the
oldest event switchd still holds (asking, then following the `gap` event's
`oldest`) and prints those from TIME on. `--output journal` writes the fields
systemd-journald takes natively (MESSAGE, PRIORITY, SWITCHD_EVENT, …), one
JSON object a line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import httpx

from switchd.client import SseParser

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
DEDUPE_IDS = 10_000  # (id, event) pairs remembered within a run


def read_cursor(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def commit_cursor(path: Path, event_id: int) -> None:
    """Atomically: a reader of the file sees the old id or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{event_id}\n")
    os.replace(tmp, path)


def parse_since(text: str) -> tuple[int | None, float | None]:
    """`--since`: an event id, or a time (epoch seconds of it)."""
    if text.isascii() and text.isdigit():
        return int(text), None
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return None, moment.timestamp()


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event name, data) of each SSE block; the data is decoded later, where a block
    that is not JSON is skipped rather than ending the follower."""
    parser = SseParser()
    for line in lines:
        if (block := parser.feed_block(line)) is not None:
            yield block[0], block[2]


PRIORITIES = {"error": 3, "gap": 4, "log": 7}


def journal_fields(event: dict[str, Any]) -> dict[str, str]:
    """The event as systemd-journald's native fields (upper-case keys, string values)."""
    name = str(event.get("event"))
    message = event.get("message") or f"{name} {event.get('model', '')}".strip()
    fields = {
        "MESSAGE": str(message),
        "PRIORITY": str(PRIORITIES.get(name, 6)),
        "SYSLOG_IDENTIFIER": "switchd",
        "SWITCHD_ID": str(event.get("id")),
        "SWITCHD_EVENT": name,
        "SWITCHD_TS": str(event.get("ts")),
    }
    for key in ("job", "kind", "cause", "model", "stage", "error", "from", "to"):
        if event.get(key) is not None:
            fields[f"SWITCHD_{key.upper()}"] = str(event[key])
    fields["SWITCHD_DATA"] = json.dumps(event, separators=(",", ":"))
    return fields


class Follower:
    def __init__(
        self,
        url: str,
        key: str | None,
        *,
        cursor_file: Path | None,
        since: str | None,
        output: str = "json",
        out: TextIO = sys.stdout,
        err: TextIO = sys.stderr,
    ) -> None:
        self.url = url.rstrip("/") + "/v1/events"
        self.headers = {"Accept": "text/event-stream"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.cursor_file = cursor_file
        self.output = output
        self.out = out
        self.err = err
        since_id, self.since_time = parse_since(since) if since else (None, None)
        self.cursor = read_cursor(cursor_file)
        if self.cursor is None:
            self.cursor = since_id if since_id is not None else (1 if self.since_time else None)
        self._seen: deque[tuple[int, str]] = deque(maxlen=DEDUPE_IDS)
        self._seen_set: set[tuple[int, str]] = set()
        self._rewound = False

    def run(self) -> int:
        backoff = BACKOFF_FIRST
        while True:
            try:
                with (
                    httpx.Client(timeout=httpx.Timeout(10.0, read=None)) as client,
                    client.stream("GET", self.url, headers=self._headers()) as response,
                ):
                    if response.status_code in (400, 401, 403):
                        response.read()
                        print(f"switchd events: {response.text}", file=self.err)
                        return 2
                    response.raise_for_status()
                    backoff = BACKOFF_FIRST
                    for name, data in sse_events(response.iter_lines()):
                        self._take(name, data)
            except _Restart:
                continue
            except (httpx.HTTPError, OSError) as exc:
                reason = str(exc) or type(exc).__name__
                print(f"switchd events: {reason}; again in {backoff:g} s", file=self.err)
            time.sleep(backoff)
            backoff = min(BACKOFF_MAX, backoff * 2)

    def _headers(self) -> dict[str, str]:
        if self.cursor is None:
            return self.headers
        return {**self.headers, "Last-Event-ID": str(self.cursor)}

    def _take(self, name: str, data: str) -> None:
        try:
            event = json.loads(data)
        except ValueError:
            return
        if not isinstance(event, dict) or not isinstance(event.get("id"), int):
            return
        event_id: int = event["id"]
        oldest = event.get("oldest")
        rewind = name == "gap" and self.since_time is not None and not self._rewound
        if rewind and isinstance(oldest, int):  # --since TIME: from the oldest held, once
            self._rewound = True
            self.cursor = oldest - 1
            raise _Restart
        pair = (event_id, name)
        if pair not in self._seen_set:
            if self._wanted(event):
                self._write(event)
            self._remember(pair)
        self.cursor = event_id
        if self.cursor_file is not None:
            commit_cursor(self.cursor_file, event_id)  # after the line is out

    def _wanted(self, event: dict[str, Any]) -> bool:
        if self.since_time is None or not isinstance(event.get("ts"), str):
            return True
        moment = datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()
        return moment >= self.since_time

    def _write(self, event: dict[str, Any]) -> None:
        shown = journal_fields(event) if self.output == "journal" else event
        self.out.write(json.dumps(shown, separators=(",", ":")) + "\n")
        self.out.flush()

    def _remember(self, pair: tuple[int, str]) -> None:
        if len(self._seen) == self._seen.maxlen:
            self._seen_set.discard(self._seen[0])
        self._seen.append(pair)
        self._seen_set.add(pair)


class _Restart(httpx.HTTPError):
    """Reconnect now with the new cursor (a `gap` under --since TIME)."""

    def __init__(self) -> None:
        super().__init__("starting from the oldest event held")


def add_follow_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cursor-file", type=Path, metavar="FILE", help="resume from, and commit to, this file"
    )
    parser.add_argument("--since", metavar="ID|TIME", help="an event id, or an ISO 8601 time")
    parser.add_argument(
        "--output", choices=["json", "journal"], default="json", help="journal: journald fields"
    )


def follow_command(args: argparse.Namespace, url: str) -> int:
    if "://" not in url:
        url = f"http://{url}"
    follower = Follower(
        url, args.key, cursor_file=args.cursor_file, since=args.since, output=args.output
    )
    try:
        return follower.run()
    except KeyboardInterrupt:
        return 0
