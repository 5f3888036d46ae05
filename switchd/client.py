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
EXIT_UNREACHABLE = 2  # no answer, not authorised, or no address to ask
URL_FORMS = "give http://HOST:PORT, https://HOST:PORT or HOST:PORT ([::1]:PORT for IPv6)"
DETAIL = "    | "  # before each engine line under a stage or a model


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
        """One line in; the event it completes, if any (its data decoded as JSON)."""
        block = self.feed_block(line)
        return None if block is None else ServerEvent(block[0], block[1], json.loads(block[2]))

    def feed_block(self, line: str) -> tuple[str, str | None, str] | None:
        """One line in; the (event name, id, data) of the block it completes, if any."""
        if not line:
            block = None
            if self._data:
                block = (self._name, self._id, "\n".join(self._data))
            self._name, self._id, self._data = "message", None, []
            return block
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


def parse_url(source: str, value: str) -> str:
    """switchd's address from `source` (--url, SWITCHD_URL): a URL, or HOST:PORT as
    --listen takes it, meaning http://HOST:PORT. A bad one is a ClientError (exit 2)."""
    text = value.strip()
    if "://" not in text:
        text = f"http://{text}"
    problem = url_problem(text)
    if problem is not None:
        raise ClientError(f"bad {source} {value!r}: {problem}; {URL_FORMS}", EXIT_UNREACHABLE)
    return text.rstrip("/")


def url_problem(text: str) -> str | None:
    """What is wrong with `text` as switchd's address, or None."""
    if any(char.isspace() for char in text):
        return "it has a space"
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as exc:
        authority = text.partition("://")[2].partition("/")[0]
        if authority.count(":") > 1 and not authority.startswith("["):
            return "an IPv6 address goes in brackets"
        reason = str(exc)
        return reason[:1].lower() + reason[1:]
    if url.scheme not in ("http", "https"):
        return f"switchd speaks http or https, not {url.scheme}"
    if not url.host:
        return "it names no host"
    if url.port is not None and not 0 < url.port < 65536:
        return f"port {url.port} is not in 1-65535"
    return None


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

    def post(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        try:
            response = self._http.post(path, params=params)
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


def memory_line(label: str, memory: dict[str, Any]) -> str:
    return (
        f"{label}: {memory['used_gb']:.2f} of {memory['total_gb']:.2f} GB used, "
        f"{memory['available_gb']:.2f} GB free\n"
    )


def model_devices(model: dict[str, Any]) -> str:
    """The devices a model is on (`devices`), else those its config names (`gpus`), else -."""
    devices = model.get("devices") or model.get("gpus")
    if isinstance(devices, list) and devices:
        return ",".join(str(index) for index in devices)
    return "-"  # not placed yet: `gpus: all`, or any N devices (`gpu_count`)


def show_status(client: Client, out: TextIO) -> int:
    status = client.get("/v1/models/status")
    gpu = status["gpu"]
    out.write(memory_line(f"GPU ({gpu['source']})", gpu))
    # On a multi-GPU host a model needs its share free on each of its devices: each
    # device's memory, and each model's devices, are what an operator reads.
    several = len(gpu.get("devices") or []) > 1
    if several:
        for device in gpu["devices"]:
            out.write(memory_line(f"  GPU {device['index']}", device))
    header = ["MODEL", "STATUS", "SIZE GB", "LOAD S", "IN FLIGHT", *(["GPUS"] if several else [])]
    rows: list[tuple[list[str], str, list[str]]] = [(header, "", [])]
    for name, model in status["models"].items():
        note, details = ("pinned" if model["pinned"] else ""), []
        if model.get("error"):
            # The first line says what happened; the engine's last lines, below it, why.
            note, *details = model["error"].splitlines()
        cells = [
            name,
            model["status"],
            f"{model['size_gb']:g}",
            f"{model['estimated_load_time_seconds']:g}",
            str(model["in_flight"]),
            *([model_devices(model)] if several else []),
        ]
        rows.append((cells, note, details))
    widths = [max(len(cells[i]) for cells, _, _ in rows) for i in range(len(header))]
    for cells, note, details in rows:
        padded = [cell.ljust(width) for cell, width in zip(cells, widths, strict=True)]
        out.write("  ".join([*padded, note]).rstrip() + "\n")
        out.writelines(f"{DETAIL}{line}\n" for line in details)
    switch = status.get("switch")
    if switch:
        out.write(
            f"switching to {switch['target']}: {switch['stage']} "
            f"{progress_bar(switch['progress'])}\n"
        )
    for load in status.get("beside", []):
        out.write(
            f"loading {load['target']} beside it: {load['stage']} "
            f"{progress_bar(load['progress'])}\n"
        )
    return 0


def stage_message(event: ServerEvent) -> str:
    """What a stage line says: the event's message, said once.

    A memory_check that puts models aside ends with each one's plan (`unloading A`,
    `sleeping B (level 1): wakes in …`), which the `unload`/`sleep` line after it
    says again: here the figures are kept and the plan is left to those lines.
    """
    message: str = event.data["message"]
    if event.name == Stage.MEMORY_CHECK and event.data.get("to_unload"):
        figures, verdict, _ = message.partition(" GB free: ")
        if verdict:
            return f"{figures} GB free: making room"
    return message


def follow_job(client: Client, path: str, params: dict[str, str], out: TextIO) -> int:
    """Print each stage with a progress bar; the exit code says how the job ended."""
    live = out.isatty()
    redraw = False
    for event in client.stream(path, params):
        data = event.data
        if event.name == wire.LOG:
            line = f"{DETAIL}{data['line']}"
        else:
            line = f"{progress_bar(data['progress'])}  {event.name:<12} {stage_message(event)}"
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


def reload_config(client: Client, out: TextIO, *, now: bool = False) -> int:
    """Have switchd read its config file again; print what changed."""
    body = client.post("/v1/config/reload", {"now": "true"} if now else {})
    for kind in ("added", "removed", "changed", "unchanged"):
        names = body.get(kind) or []
        out.write(f"{kind:<10} {', '.join(names) if names else '-'}\n")
    for key, why in (body.get("refused") or {}).items():
        out.write(f"refused    {key}: {why}\n")
    return 0


def run_client(
    command: str, url: str, key: str | None, model: str | None, url_source: str = "--url"
) -> int:
    """Run a client command against `url` (named by `url_source` if it is bad)."""
    try:
        client = Client(parse_url(url_source, url), key)
    except ClientError as error:
        return failed(error)
    try:
        if command == "status":
            return show_status(client, sys.stdout)
        if command == "reload":
            return reload_config(client, sys.stdout)
        assert model is not None
        if command == "switch":
            return follow_job(client, "/v1/models/switch", {"target_model": model}, sys.stdout)
        return follow_job(client, "/v1/models/unload", {"model": model}, sys.stdout)
    except ClientError as error:
        return failed(error)
    finally:
        client.close()


def failed(error: ClientError) -> int:
    """One line on stderr, after whatever stdout holds; the error's exit code."""
    sys.stdout.flush()
    print(f"switchd: {error}", file=sys.stderr)
    return error.exit_code
