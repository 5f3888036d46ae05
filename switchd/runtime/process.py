"""Engines as local processes: `cmd` run without a shell, in its own group.

Each engine gets its own process group so a stop reaches the workers an
engine forks (vLLM does), and every output line is kept for `log` events and
failure messages. The engines it started stop when switchd stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from switchd.config import ModelSpec
from switchd.runtime.base import (
    Discovery,
    EngineExited,
    EngineInfo,
    EngineOutput,
    EventQueue,
    RuntimeEvent,
    StartFailed,
)

TAIL_LINES = 50
_LINE_LIMIT = 1 << 20
EXIT_POLL_SECONDS = 0.05
OUTPUT_DRAIN_SECONDS = 2.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now; the engine binds it a moment later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def substitute(words: Sequence[str], values: dict[str, str]) -> list[str]:
    """Replace ${NAME} placeholders; nothing else is interpreted (no shell)."""
    result = []
    for word in words:
        replaced = word
        for name, value in values.items():
            replaced = replaced.replace("${" + name + "}", value)
        result.append(replaced)
    return result


@dataclass
class _Engine:
    spec: ModelSpec
    process: asyncio.subprocess.Process
    info: EngineInfo
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    stopping: bool = False
    killed: bool = False
    grace_seconds: float = 0.0
    pump: asyncio.Task[None] | None = None


class ProcessRuntime:
    def __init__(self, stop_grace_seconds: float = 10.0) -> None:
        self._stop_grace_seconds = stop_grace_seconds
        self._engines: dict[str, _Engine] = {}
        self._tails: dict[str, tuple[str, ...]] = {}
        self._events = EventQueue()

    async def start(self, spec: ModelSpec) -> EngineInfo:
        current = self._engines.get(spec.name)
        if current is not None and current.process.returncode is None:
            return current.info
        port = free_port()
        values = {"PORT": str(port), "MODEL": spec.name, "PYTHON": sys.executable}
        argv = substitute(spec.cmd, values)
        extra = {name: substitute([value], values)[0] for name, value in spec.env.items()}
        env = {**os.environ, **extra}
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group, for a clean stop
                preexec_fn=_die_with_parent,
                limit=_LINE_LIMIT,
            )
        except OSError as exc:
            raise StartFailed(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from exc
        info = EngineInfo(
            model=spec.name,
            instance=str(process.pid),
            url=spec.url or f"http://127.0.0.1:{port}",
            started_at=time.time(),
            pid=process.pid,
        )
        engine = _Engine(spec, process, info)
        self._engines[spec.name] = engine
        engine.pump = asyncio.create_task(self._pump(engine), name=f"engine-{spec.name}")
        return info

    async def _pump(self, engine: _Engine) -> None:
        """Forward the output lines, then the exit, of one engine."""
        reader = asyncio.create_task(self._read_output(engine))
        # Not process.wait(): on Python 3.11 it also waits for the output pipe, which
        # a worker the engine forked keeps open after the engine itself has died.
        while engine.process.returncode is None:  # noqa: ASYNC110 - no exit-only event exists
            await asyncio.sleep(EXIT_POLL_SECONDS)
        code = engine.process.returncode
        self._kill_group(engine.process.pid, signal.SIGKILL)  # workers it left behind
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader, OUTPUT_DRAIN_SECONDS)
        self._tails[engine.spec.name] = tuple(engine.tail)
        if engine.killed:
            grace = f"{engine.grace_seconds:g} s"
            reason = f"stopped (killed by SIGKILL after the {grace} grace period)"
        elif engine.stopping:
            reason = "stopped"
        else:
            reason = _describe_exit(code)
        self._events.put(
            EngineExited(engine.spec.name, engine.info.instance, code, reason, tuple(engine.tail))
        )

    async def _read_output(self, engine: _Engine) -> None:
        stream = engine.process.stdout
        assert stream is not None
        while True:
            try:
                raw = await stream.readuntil(b"\n")
            except asyncio.LimitOverrunError as exc:
                raw = await stream.read(exc.consumed)  # an overlong line, in pieces, intact
            except asyncio.IncompleteReadError as exc:
                raw = exc.partial  # the last line had no newline
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            engine.tail.append(line)
            self._events.put(EngineOutput(engine.spec.name, engine.info.instance, line))

    async def stop(self, spec: ModelSpec, grace_seconds: float) -> None:
        engine = self._engines.get(spec.name)
        if engine is None:
            return
        engine.stopping = True
        engine.grace_seconds = grace_seconds
        assert engine.pump is not None
        if engine.pump.done():  # it exited before: its group is gone, its pgid maybe reused
            del self._engines[spec.name]
            return
        # The group, even when the engine itself is gone: its workers may not be.
        self._kill_group(engine.process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(engine.pump), grace_seconds)
        except TimeoutError:
            engine.killed = engine.process.returncode is None
            self._kill_group(engine.process.pid, signal.SIGKILL)
            await engine.pump  # output drained and the exit reported
        if self._engines.get(spec.name) is engine:
            del self._engines[spec.name]

    @staticmethod
    def _kill_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    async def discover(self) -> Discovery:
        # Engines die with the switchd that started them: nothing to adopt.
        return Discovery()

    def events(self) -> AsyncIterator[RuntimeEvent]:
        return aiter(self._events)

    def last_lines(self, model: str) -> tuple[str, ...]:
        engine = self._engines.get(model)
        return tuple(engine.tail) if engine is not None else self._tails.get(model, ())

    async def close(self) -> None:
        grace = self._stop_grace_seconds
        await asyncio.gather(*(self.stop(e.spec, grace) for e in list(self._engines.values())))
        self._events.end()


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it if switchd dies, even by `kill -9`.

    Otherwise an engine outlives a crashed switchd, holding its GPU memory with
    nobody left to stop it. Linux only; elsewhere engines stop with a clean exit.
    """
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"
