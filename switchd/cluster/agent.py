"""One host's agent: bound to that host's switchd, it keeps its latest snapshot.

It runs as a Ray actor on the host's node (ray_directory.start_agent: detached,
named, pinned to the node, no CPU or GPU taken from Ray's accounting, restarted
by Ray when it dies). A thread reads the switchd's `/v1/models/status` every
half second, so that a restart by Ray (which runs `__init__` again, nothing
else) resumes the reads by itself; the gateway asks `snapshot()` and gets the
last read with its age: the heartbeat. The class itself knows nothing of Ray
(Ray wraps it), so it is tested as a plain object.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import httpx

from switchd.cluster.directory import (
    POLL_SECONDS,
    READ_TIMEOUT_SECONDS,
    Heartbeat,
    read_error,
    status_headers,
)


class HostAgent:
    def __init__(
        self,
        name: str,
        url: str,
        key: str | None = None,
        node: str | None = None,
        interval: float = POLL_SECONDS,
    ) -> None:
        self._beat = Heartbeat(name, url)
        self._node = node
        self._lock = threading.Lock()
        self._interval = interval
        self._stop = threading.Event()
        self._http = httpx.Client(timeout=READ_TIMEOUT_SECONDS, headers=status_headers(key))
        self._thread = threading.Thread(target=self._run, name=f"agent-{name}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            answer = self._http.get(f"{self._beat.url}/v1/models/status")
            answer.raise_for_status()
            status = answer.json()
        except (httpx.HTTPError, ValueError) as exc:
            with self._lock:
                self._beat.failed(read_error(exc))
            return
        with self._lock:
            self._beat.read(status)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._read()
            self._stop.wait(self._interval)

    def snapshot(self) -> dict[str, Any]:
        """The host's last good read, its age, and why the last read failed if it did."""
        with self._lock:
            # Its process, to tell a restarted agent (Ray's max_restarts) from the first.
            return {**self._beat.snapshot(self._node).as_dict(), "agent_pid": os.getpid()}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=READ_TIMEOUT_SECONDS + 1)
        self._http.close()
