"""Engines as local processes: `cmd` run without a shell, in its own group.

Each engine leads its own session, so its process group holds the workers it
forks (vLLM does) and a stop reaches them all; every output line is kept for
`log` events and failure messages.

An engine started on some devices sees only those: CUDA_VISIBLE_DEVICES lists
them (with CUDA_DEVICE_ORDER=PCI_BUS_ID, so CUDA's numbers are NVML's), and
`${GPUS}` in its `cmd` and `env` is the same list. Its own `env` wins.

The engines stop with switchd. A clean stop sends SIGTERM to each group (then
SIGKILL after the grace). On a crash (even `kill -9`) PR_SET_PDEATHSIG sends
SIGTERM to each engine's direct child, but only to it: the children of a
wrapper (`sh -c "…"`, `bash start.sh`) survive, holding GPU memory. So, with a
`state_dir`, every engine has a pid file there (its process group, start time
and the boot it ran in) while it runs, and the next switchd's `discover()`
stops whatever of that group is still alive before it starts anything. Such
leftovers cannot be adopted: their output pipe and their port are gone.

An engine's exit is seen as it happens where Linux offers a pidfd (5.3 on): the
pidfd becomes readable when the process exits. Elsewhere it is polled for.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

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

log = logging.getLogger(__name__)

TAIL_LINES = 50
_LINE_LIMIT = 1 << 20
EXIT_POLL_SECONDS = 0.05  # without a pidfd: how often the exit is looked for
EXIT_CHECK_SECONDS = 1.0  # with one: how often it is looked for anyway (a safety net)
REAP_POLL_SECONDS = 0.002  # once the pidfd says it exited: until returncode is set
REAP_FAST_SECONDS = 1.0  # for at most this long, then every EXIT_POLL_SECONDS
OUTPUT_DRAIN_SECONDS = 2.0
ENGINES_DIR = "engines"  # under state_dir: one pid file per running engine
ORPHAN_POLL_SECONDS = 0.05
ORPHAN_KILL_WAIT_SECONDS = 5.0  # after SIGKILL, how long discover() waits to see them gone


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


def placement_env(devices: tuple[int, ...] | None) -> dict[str, str]:
    """The variables that confine an engine to `devices` (NVML's indexes); none for None.

    CUDA numbers devices fastest first unless told PCI_BUS_ID, NVML in PCI bus
    order: without it, CUDA_VISIBLE_DEVICES=1 may be another card than NVML's 1.
    """
    if devices is None:
        return {}
    return {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": ",".join(str(index) for index in devices),
    }


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
    pid_file: Path | None = None


class ProcessRuntime:
    def __init__(self, stop_grace_seconds: float = 10.0, *, state_dir: Path | None = None) -> None:
        self._stop_grace_seconds = stop_grace_seconds
        self._engines: dict[str, _Engine] = {}
        self._tails: dict[str, tuple[str, ...]] = {}
        self._events = EventQueue()
        self._pid_dir = state_dir / ENGINES_DIR if state_dir is not None else None
        self._self = _read_stat("self") if state_dir is not None else None

    async def start(self, spec: ModelSpec, devices: tuple[int, ...] | None = None) -> EngineInfo:
        current = self._engines.get(spec.name)
        if current is not None and current.process.returncode is None:
            return current.info
        port = free_port()
        gpus = ",".join(str(index) for index in devices) if devices is not None else ""
        values = {"PORT": str(port), "MODEL": spec.name, "PYTHON": sys.executable, "GPUS": gpus}
        argv = substitute(spec.cmd, values)
        extra = {name: substitute([value], values)[0] for name, value in spec.env.items()}
        env = {**os.environ, **placement_env(devices), **extra}  # the model's own env wins
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
            devices=devices,
        )
        engine = _Engine(spec, process, info)
        # Before the pump exists, so the pump's removal always follows this write; in a
        # worker thread, like all file work here (it reads /proc and writes a file).
        engine.pid_file = await asyncio.to_thread(
            self._write_pid_file, spec.name, process.pid, argv, info.started_at
        )
        self._engines[spec.name] = engine
        engine.pump = asyncio.create_task(self._pump(engine), name=f"engine-{spec.name}")
        return info

    async def _pump(self, engine: _Engine) -> None:
        """Forward the output lines, then the exit, of one engine."""
        reader = asyncio.create_task(self._read_output(engine))
        await _wait_for_exit(engine.process)
        code = engine.process.returncode
        assert code is not None
        self._kill_group(engine.process.pid, signal.SIGKILL)  # workers it left behind
        if engine.pid_file is not None and self._engines.get(engine.spec.name) is engine:
            _drop(engine.pid_file)  # (a newer run of the model has written its own)
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
        # Nothing to adopt: engines stop with the switchd that started them (SIGTERM to
        # the group on a clean stop, PDEATHSIG to the direct child on a crash). What a
        # crash leaves running (a wrapper's children) is found from the pid files of
        # the switchd before and stopped here, before any start.
        if self._pid_dir is not None:
            leftovers = await asyncio.to_thread(_read_pid_files, self._pid_dir)
            await asyncio.gather(*(self._stop_orphans(*leftover) for leftover in leftovers))
        return Discovery()

    async def _stop_orphans(self, path: Path, record: _PidRecord) -> None:
        """Stop what is left of one engine's group, then drop its pid file."""
        pgid = record.pgid
        members = await asyncio.to_thread(_orphans, record)
        if members is None:
            log.info(
                "the pid file of %s names process group %d, now another program's; left alone",
                record.model,
                pgid,
            )
        elif members:
            seen = {member.pid for member in members}
            self._kill_group(pgid, signal.SIGTERM)
            left = await _wait_for_orphans(record, self._stop_grace_seconds, seen)
            if left:
                self._kill_group(pgid, signal.SIGKILL)
                left = await _wait_for_orphans(record, ORPHAN_KILL_WAIT_SECONDS, seen)
            log.warning(
                "stopped %d orphaned process(es) of %s (process group %d) left by an earlier"
                " switchd",
                len(seen),
                record.model,
                pgid,
            )
            if left:
                log.warning(
                    "%d orphaned process(es) of %s (process group %d) still alive %g s after"
                    " SIGKILL",
                    len(left),
                    record.model,
                    pgid,
                    ORPHAN_KILL_WAIT_SECONDS,
                )
        _drop(path)

    def _write_pid_file(
        self, model: str, pid: int, argv: Sequence[str], started_at: float
    ) -> Path | None:
        """Record a started engine, so a later switchd can stop what a crash leaves.

        Atomic (temp file + rename): a crash leaves the old file or the new one. No
        fsync: only a crash of the machine loses the page cache, and after that the
        boot id differs and the file is dropped anyway.
        """
        if self._pid_dir is None:
            return None
        stat = _read_stat(pid)
        boot_id = _boot_id()
        if stat is None or boot_id is None or self._self is None:
            return None  # already exited (its group was killed), or no /proc here
        path = self._pid_dir / (quote(model, safe="") + ".json")
        record = {
            "model": model,
            "pid": pid,  # the process group id too: the engine leads its own session
            "start_time": stat.start_time,  # clock ticks since boot, /proc/<pid>/stat
            "boot_id": boot_id,
            "argv": list(argv),
            "started_at": started_at,
            "switchd": {"pid": self._self.pid, "start_time": self._self.start_time},
        }
        temporary = path.with_name("." + path.name + ".tmp")
        try:
            self._pid_dir.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            os.replace(temporary, path)
        except OSError as exc:
            log.warning(
                "cannot write the pid file of %s (%s): should switchd crash, the processes"
                " the engine forks will outlive it",
                model,
                exc,
            )
            with contextlib.suppress(OSError):
                temporary.unlink()
            return None
        return path

    def events(self) -> AsyncIterator[RuntimeEvent]:
        return aiter(self._events)

    async def engine_pids(self, info: EngineInfo) -> list[int]:
        """Every live process of the engine's group: the engine and what it forked."""
        if info.pid is None:
            return []
        members = await asyncio.to_thread(_group, info.pid)
        return [member.pid for member in members]

    def last_lines(self, model: str) -> tuple[str, ...]:
        engine = self._engines.get(model)
        return tuple(engine.tail) if engine is not None else self._tails.get(model, ())

    async def close(self) -> None:
        grace = self._stop_grace_seconds
        await asyncio.gather(*(self.stop(e.spec, grace) for e in list(self._engines.values())))
        self._events.end()


@dataclass(frozen=True)
class _Stat:
    """The fields of /proc/<pid>/stat that tell one process from another."""

    pid: int
    state: str
    pgrp: int
    session: int
    start_time: int  # clock ticks after boot


def _parse_stat(text: str) -> _Stat | None:
    # "pid (comm) state ppid pgrp session … starttime …": comm may hold spaces and
    # ')', but nothing after it does, so the last ')' ends it.
    head, paren, tail = text.rpartition(")")
    if not paren:
        return None
    pid, _, _ = head.partition(" (")
    fields = tail.split()
    try:
        # fields[0] is field 3 (state): field n is fields[n - 3].
        return _Stat(int(pid), fields[0], int(fields[2]), int(fields[3]), int(fields[19]))
    except (IndexError, ValueError):
        return None


def _read_stat(pid: int | str) -> _Stat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None  # gone, or no /proc
    return _parse_stat(raw.decode("latin-1"))  # comm is any bytes; the rest is ASCII


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _group(pgid: int) -> list[_Stat]:
    """The live (not zombie) processes of one process group."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    members = []
    for name in names:
        if name.isdigit():
            stat = _read_stat(name)
            if stat is not None and stat.pgrp == pgid and stat.state not in ("Z", "X"):
                members.append(stat)
    return members


@dataclass(frozen=True)
class _PidRecord:
    model: str
    pgid: int
    start_time: int
    boot_id: str
    owner_pid: int
    owner_start_time: int


def _parse_record(raw: object) -> _PidRecord:
    if not isinstance(raw, dict) or not isinstance(raw.get("switchd"), dict):
        raise TypeError("not a pid file")
    owner = raw["switchd"]
    values = (raw["pid"], raw["start_time"], owner["pid"], owner["start_time"])
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError("pids and start times must be positive integers")
    model, boot_id = raw["model"], raw["boot_id"]
    if not isinstance(model, str) or not isinstance(boot_id, str):
        raise TypeError("model and boot_id must be strings")
    return _PidRecord(model, *values[:2], boot_id, *values[2:])


def _read_pid_files(directory: Path) -> list[tuple[Path, _PidRecord]]:
    """The pid files whose engines may have outlived their switchd; the rest dropped.

    Kept: those of this boot whose switchd is gone. A live switchd (started again
    by mistake with the same state_dir) still owns its engines: left alone.
    """
    boot_id = _boot_id()
    try:
        paths = sorted(directory.glob("*.json"))
    except OSError:
        return []
    if boot_id is None or not paths:
        return []
    kept = []
    for path in paths:
        try:
            record = _parse_record(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            continue
        except (OSError, ValueError, TypeError, KeyError, RecursionError) as exc:
            # RecursionError: `[[[[…` nested too deep for the parser; never fatal.
            log.warning("dropping the unreadable pid file %s: %r", path, exc)
            _drop(path)
            continue
        if record.boot_id != boot_id:  # every process of that boot is gone
            _drop(path)
            continue
        owner = _read_stat(record.owner_pid)
        if owner is not None and owner.start_time == record.owner_start_time:
            log.warning(
                "%s is running under another switchd (pid %d) with the same state_dir; left alone",
                record.model,
                record.owner_pid,
            )
            continue
        kept.append((path, record))
    return kept


def _drop(path: Path) -> None:
    """Remove a pid file (a tiny blocking call, fine on the event loop)."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove the pid file %s: %s", path, exc)


def _orphans(record: _PidRecord) -> list[_Stat] | None:
    """What is alive of the engine's process group; None when the group id was reused.

    The engine led its own session, so the id of the group is its pid, and the
    session's. Every process of the group started no earlier than the engine, and
    while any of them lives, the id cannot be handed to a new process. So a group
    whose leader started at another time, or with a process older than the engine,
    or in another session, is somebody else's and is never signalled.
    """
    members = _group(record.pgid)
    for member in members:
        if (
            member.start_time < record.start_time
            or member.session != record.pgid
            or (member.pid == record.pgid and member.start_time != record.start_time)
        ):
            return None
    return members


async def _wait_for_orphans(record: _PidRecord, within: float, seen: set[int]) -> list[_Stat]:
    """Poll (off the event loop) until the group is gone; what is left after `within`."""
    deadline = time.monotonic() + within
    while True:
        left = (await asyncio.to_thread(_orphans, record)) or []
        seen.update(member.pid for member in left)
        if not left or time.monotonic() >= deadline:
            return left
        await asyncio.sleep(ORPHAN_POLL_SECONDS)


async def _wait_for_exit(process: asyncio.subprocess.Process) -> None:
    """Return once `process` has exited and its returncode is set.

    Not process.wait(): on Python 3.11 it also waits for the output pipe, which a
    worker the engine forked keeps open after the engine itself has died. Instead,
    a pidfd of the process (Linux 5.3 on) wakes this when the process exits; the
    child watcher (asyncio's or uvloop's) reaps it and sets returncode a moment
    later, so that is polled for, briefly. Without a pidfd (no os.pidfd_open, an
    older kernel, a loop without add_reader) returncode is polled for, as before.
    """
    if process.returncode is not None:
        return
    fd = _open_pidfd(process.pid)
    if fd is None:
        await _until_returncode(process)
        return
    try:
        watched = await _until_readable(fd, process)
    finally:
        os.close(fd)
    if watched is None:  # the loop cannot watch a file descriptor
        await _until_returncode(process)
    else:
        await _until_returncode(process, fast_for=REAP_FAST_SECONDS)


def _open_pidfd(pid: int) -> int | None:
    """A file descriptor readable once `pid` has exited; None where there is none."""
    pidfd_open = getattr(os, "pidfd_open", None)  # Linux only
    if pidfd_open is None:
        return None
    try:
        fd: int = pidfd_open(pid)
    except OSError as exc:  # ENOSYS before Linux 5.3, ESRCH once reaped, EMFILE…
        log.debug("no pidfd for process %d (%s): polling for its exit", pid, exc)
        return None
    return fd


async def _until_readable(fd: int, process: asyncio.subprocess.Process) -> bool | None:
    """Wait until the pidfd `fd` is readable: True; None if the loop cannot watch it.

    False when returncode was set without the pidfd saying so (checked every
    EXIT_CHECK_SECONDS: a safety net, should the pidfd be of some other process).
    """
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()

    def on_readable() -> None:
        loop.remove_reader(fd)  # it stays readable: once is enough
        readable.set()

    try:
        loop.add_reader(fd, on_readable)
    except (NotImplementedError, OSError, ValueError) as exc:
        log.debug("cannot watch the pidfd of process %d (%r): polling", process.pid, exc)
        return None
    try:
        while not readable.is_set() and process.returncode is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EXIT_CHECK_SECONDS):
                    await readable.wait()
    finally:
        loop.remove_reader(fd)
    return readable.is_set()


async def _until_returncode(process: asyncio.subprocess.Process, *, fast_for: float = 0.0) -> None:
    """Poll until returncode is set (by the child watcher: no event says so).

    Every REAP_POLL_SECONDS for `fast_for` seconds, then every EXIT_POLL_SECONDS.
    """
    deadline = time.monotonic() + fast_for
    while process.returncode is None:
        fast = time.monotonic() < deadline
        await asyncio.sleep(REAP_POLL_SECONDS if fast else EXIT_POLL_SECONDS)


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it if switchd dies, even by `kill -9`.

    Otherwise an engine outlives a crashed switchd, holding its GPU memory with
    nobody left to stop it. Only this child gets the signal, not the processes it
    forks: those are left to the next switchd (see the pid files). Linux only;
    elsewhere engines stop with a clean exit.
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
