"""The client commands: `switchd status`, `switchd switch`, `switchd unload`.

They talk to a running switchd over HTTP and print what a person reads; every
failure is one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import httpx

from switchd import wire
from switchd.states import Stage

BAR_WIDTH = 24
EXIT_FAILED = 1  # the server said no (switch failed, unknown model…)
EXIT_UNREACHABLE = 2  # no answer, or not authorised


class ClientError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class ServerEvent:
    name: str
    id: str | None
    data: dict[str, Any]


class SseParser:
    """Turns Server-Sent Event lines into events; comments, retry and pings are skipped."""

    def __init__(self) -> None:
        self._name = "message"
        self._id: str | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> ServerEvent | None:
        """One line in; the event it completes, if any."""
        if not line:
            event = None
            if self._data:
                event = ServerEvent(self._name, self._id, json.loads("\n".join(self._data)))
            self._name, self._id, self._data = "message", None, []
            return event
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._name = value
        elif field == "id":
            self._id = value
        elif field == "data":
            self._data.append(value)
        return None


def parse_sse(lines: Iterator[str]) -> Iterator[ServerEvent]:
    parser = SseParser()
    for line in lines:
        if (event := parser.feed(line)) is not None:
            yield event


def progress_bar(fraction: float) -> str:
    fraction = max(0.0, min(1.0, fraction))
    # Floor, not round: a full bar and "100%" only once the job is really done.
    filled = int(fraction * BAR_WIDTH)
    return "[" + "#" * filled + "." * (BAR_WIDTH - filled) + f"] {int(fraction * 100):3d}%"


class Client:
    def __init__(self, url: str, key: str | None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def _check(self, response: httpx.Response) -> None:
        if response.status_code == 401:
            raise ClientError(
                f"{self.url} refused the API key (401): pass --key or set SWITCHD_API_KEY",
                EXIT_UNREACHABLE,
            )
        if response.status_code >= 400:
            response.read()
            try:
                body = response.json()
                message = body.get("message") or body.get("error", {}).get("message")
            except (ValueError, AttributeError):
                message = None
            raise ClientError(f"{message or response.text} (HTTP {response.status_code})")

    def _unreachable(self, exc: httpx.TransportError) -> ClientError:
        return ClientError(f"cannot reach switchd at {self.url}: {exc}", EXIT_UNREACHABLE)

    def get(self, path: str) -> dict[str, Any]:
        try:
            response = self._http.get(path)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        self._check(response)
        body: dict[str, Any] = response.json()
        return body

    def stream(self, path: str, params: dict[str, str]) -> Iterator[ServerEvent]:
        """POST and follow the event stream until the job's last event."""
        headers = {"Accept": "text/event-stream"}
        timeout = httpx.Timeout(30.0, read=None)  # loading can be quiet for a while
        try:
            with self._http.stream(
                "POST", path, params=params, headers=headers, timeout=timeout
            ) as response:
                self._check(response)
                yield from parse_sse(response.iter_lines())
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None


def show_status(client: Client, out: TextIO) -> int:
    status = client.get("/v1/models/status")
    gpu = status["gpu"]
    out.write(
        f"GPU ({gpu['source']}): {gpu['used_gb']:.2f} of {gpu['total_gb']:.2f} GB used, "
        f"{gpu['available_gb']:.2f} GB free\n"
    )
    rows = [("MODEL", "STATUS", "SIZE GB", "LOAD S", "IN FLIGHT", "")]
    for name, model in status["models"].items():
        note = "pinned" if model["pinned"] else ""
        if model.get("error"):
            note = model["error"].splitlines()[0]
        rows.append(
            (
                name,
                model["status"],
                f"{model['size_gb']:g}",
                f"{model['estimated_load_time_seconds']:g}",
                str(model["in_flight"]),
                note,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        out.write("  ".join([*cells, row[5]]).rstrip() + "\n")
    switch = status.get("switch")
    if switch:
        out.write(
            f"switching to {switch['target']}: {switch['stage']} "
            f"{progress_bar(switch['progress'])}\n"
        )
    return 0


def follow_job(client: Client, path: str, params: dict[str, str], out: TextIO) -> int:
    """Print each stage with a progress bar; the exit code says how the job ended."""
    live = out.isatty()
    redraw = False
    for event in client.stream(path, params):
        data = event.data
        if event.name == wire.LOG:
            line = f"    | {data['line']}"
        else:
            line = f"{progress_bar(data['progress'])}  {event.name:<12} {data['message']}"
        if redraw:
            out.write("\r\x1b[2K")
        # On a terminal, repeated `loading` lines overwrite each other.
        redraw = live and event.name == Stage.LOADING
        out.write(line if redraw else line + "\n")
        out.flush()
        if event.name == wire.ERROR:
            return EXIT_FAILED
        if event.name == wire.RESULT:
            return 0
    raise ClientError("the event stream ended before the switch did", EXIT_UNREACHABLE)


def run_client(command: str, url: str, key: str | None, model: str | None) -> int:
    client = Client(url, key)
    try:
        if command == "status":
            return show_status(client, sys.stdout)
        assert model is not None
        if command == "switch":
            return follow_job(client, "/v1/models/switch", {"target_model": model}, sys.stdout)
        return follow_job(client, "/v1/models/unload", {"model": model}, sys.stdout)
    except ClientError as error:
        sys.stdout.flush()
        print(f"switchd: {error}", file=sys.stderr)
        return error.exit_code
    finally:
        client.close()
