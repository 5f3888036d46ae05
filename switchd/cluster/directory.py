"""Where the gateway learns which hosts there are and what each one holds.

The interface is small on purpose, so that another engine (Kubernetes, a
static list) can stand in for Ray without the gateway changing:

- `hosts()`: every host's latest snapshot, reachable or not;
- `watch(interval)`: those lists, one every `interval` seconds.

A snapshot is what a host's switchd said at its last good read of
`/v1/models/status` (models and states, memory per device, learned sizes and
load times, waiting demand) with how old that read is: the heartbeat. The
directory never carries requests: those go over plain HTTP to `url`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

# A host is unreachable once its last read failed (its switchd refused or timed
# out), its last good read is older than this (its agent is stuck), or the call to
# its agent failed outright (its node is gone).
HEARTBEAT_LIMIT_SECONDS = 3.0
POLL_SECONDS = 0.5
READ_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class HostSnapshot:
    name: str
    url: str  # the host's switchd, as the gateway reaches it
    status: Mapping[str, Any] | None  # its last good /v1/models/status; None: never read
    age_seconds: float | None  # since that read, on the host's own clock
    error: str | None = None  # why the host is not reachable, when it is not
    node: str | None = None  # where its agent runs (Ray's node id)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def reachable(self) -> bool:
        return (
            self.error is None
            and self.status is not None
            and self.age_seconds is not None
            and self.age_seconds <= HEARTBEAT_LIMIT_SECONDS
        )

    def down(self, reason: str) -> HostSnapshot:
        """This host as unreachable: its agent's call failed, or a request to it did."""
        return HostSnapshot(self.name, self.url, self.status, None, reason, self.node, self.extra)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.url,
            "status": None if self.status is None else dict(self.status),
            "age_seconds": self.age_seconds,
            "error": self.error,
            "node": self.node,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HostSnapshot:
        return cls(
            str(data["name"]),
            str(data["url"]),
            data.get("status"),
            data.get("age_seconds"),
            data.get("error"),
            data.get("node"),
        )


class Directory(Protocol):
    async def hosts(self) -> list[HostSnapshot]: ...

    def watch(self, interval: float = POLL_SECONDS) -> AsyncIterator[list[HostSnapshot]]: ...

    async def close(self) -> None: ...


async def watch_by_polling(
    directory: Directory, interval: float
) -> AsyncIterator[list[HostSnapshot]]:
    """`watch` for a directory that can only be asked (Ray's and the static one)."""
    while True:
        yield await directory.hosts()
        await asyncio.sleep(interval)


def status_headers(key: str | None) -> dict[str, str]:
    return {} if not key else {"Authorization": f"Bearer {key}"}


def read_error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Heartbeat:
    """A host's last good status read and when it was (monotonic); the agent's and the
    static directory's shared bookkeeping."""

    def __init__(self, name: str, url: str) -> None:
        self.name, self.url = name, url
        self.status: dict[str, Any] | None = None
        self.read_at: float | None = None
        self.error: str | None = "not read yet"

    def read(self, status: dict[str, Any]) -> None:
        self.status, self.read_at, self.error = status, time.monotonic(), None

    def failed(self, error: str) -> None:
        self.error = error

    def snapshot(self, node: str | None = None) -> HostSnapshot:
        age = None if self.read_at is None else round(time.monotonic() - self.read_at, 3)
        return HostSnapshot(self.name, self.url, self.status, age, self.error, node)


class StaticDirectory:
    """Hosts from a fixed list of addresses, read by the gateway itself: one machine's
    demo and the benchmarks without Ray, and the shape a Kubernetes adapter takes
    (its list from the API server's endpoints instead)."""

    def __init__(self, hosts: Mapping[str, str], key: str | None = None) -> None:
        self._beats = {name: Heartbeat(name, url) for name, url in hosts.items()}
        self._http = httpx.AsyncClient(timeout=READ_TIMEOUT_SECONDS, headers=status_headers(key))

    async def _read(self, beat: Heartbeat) -> None:
        try:
            answer = await self._http.get(f"{beat.url}/v1/models/status")
            answer.raise_for_status()
            beat.read(answer.json())
        except (httpx.HTTPError, ValueError) as exc:
            beat.failed(read_error(exc))

    async def hosts(self) -> list[HostSnapshot]:
        await asyncio.gather(*(self._read(beat) for beat in self._beats.values()))
        return [beat.snapshot() for beat in self._beats.values()]

    def watch(self, interval: float = POLL_SECONDS) -> AsyncIterator[list[HostSnapshot]]:
        return watch_by_polling(self, interval)

    async def close(self) -> None:
        await self._http.aclose()
