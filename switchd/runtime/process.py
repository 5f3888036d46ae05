"""Engines as local processes: `cmd` run without a shell, in its own group.

Each engine leads its own session, so its process group holds the workers it
forks (vLLM does) and a stop reaches them all; every output line is kept for
`log` events and failure messages.

An engine started on some devices sees only those: CUDA_VISIBLE_DEVICES lists
them (with CUDA_DEVICE_ORDER=PCI_BUS_ID, so CUDA's numbers are NVML's), and
`${GPUS}` in its `cmd` and `env` is the same list. Its own `env` wins.

A clean stop sends SIGTERM to each group (then SIGKILL after the grace), unless
`keep_engines_on_exit`. With a `state_dir`, every engine has a pid file there
(its process group, start time, the boot it ran in, its command line and a
digest of its model's engine settings) while it runs.

Given the catalog (`catalog=`, as switchd does), engines are adoptable: they
outlive a crash (no PDEATHSIG) and write their output to a file of their own
under `state_dir/engine-logs/` (not a pipe, which would die with switchd), which
switchd follows. The next switchd's `discover()` adopts an engine it can prove
the same (same pid and start time, the recorded command line, the same engine
settings in the config now; its health is checked by the loader) and stops any
other, saying why.

Without a catalog (a runtime used on its own), engines stop with switchd: on a
crash (even `kill -9`) PR_SET_PDEATHSIG sends SIGTERM to each engine's direct
child, but only to it: the children of a wrapper (`sh -c "…"`) survive, and the
next switchd's `discover()` stops whatever of that group is still alive.

An engine's exit is seen as it happens where Linux offers a pidfd (5.3 on): the
pidfd becomes readable when the process exits, for an adopted engine (not our
child, so its exit code is unknown) too. Elsewhere it is polled for.
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
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from switchd.config import ModelSpec, engine_digest
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
LOGS_DIR = "engine-logs"  # under state_dir: each adoptable engine's output
LOG_FILE_LIMIT = 16 << 20  # a followed output file is emptied past this size, once read
FOLLOW_POLL_SECONDS = 0.02  # how often a followed output file is read when idle
FOLLOW_CHUNK = 1 << 16


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
    process: asyncio.subprocess.Process | None  # None: adopted, not our child
    info: EngineInfo
    pid: int = 0
    start_time: int | None = None  # of an adopted engine: tells it from a reused pid
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    stopping: bool = False
    killed: bool = False
    grace_seconds: float = 0.0
    pump: asyncio.Task[None] | None = None
    pid_file: Path | None = None
    output: int | None = None  # the read end of its output file, when it has one
    pending: bytes = b""  # read from it, not a whole line yet
    exited: bool = False  # the process is gone: the follower reads to the end and stops

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.returncode is None
        stat = _read_stat(self.pid)
        return stat is not None and stat.start_time == self.start_time and stat.state not in "ZX"


class ProcessRuntime:
    def __init__(
        self,
        stop_grace_seconds: float = 10.0,
        *,
        state_dir: Path | None = None,
        catalog: Mapping[str, ModelSpec] | None = None,
        keep_engines_on_exit: bool = False,
    ) -> None:
        self._stop_grace_seconds = stop_grace_seconds
        self._engines: dict[str, _Engine] = {}
        self._tails: dict[str, tuple[str, ...]] = {}
        self._events = EventQueue()
        self._pid_dir = state_dir / ENGINES_DIR if state_dir is not None else None
        self._self = _read_stat("self") if state_dir is not None else None
        # Adoptable engines: only with pid files, and a catalog to prove them against.
        self._catalog = catalog if state_dir is not None else None
        self._log_dir = (
            state_dir / LOGS_DIR if state_dir is not None and catalog is not None else None
        )
        self._keep = keep_engines_on_exit and self._catalog is not None

    async def start(self, spec: ModelSpec, devices: tuple[int, ...] | None = None) -> EngineInfo:
        current = self._engines.get(spec.name)
        if current is not None and current.alive():
            return current.info
        port = free_port()
        gpus = ",".join(str(index) for index in devices) if devices is not None else ""
        values = {"PORT": str(port), "MODEL": spec.name, "PYTHON": sys.executable, "GPUS": gpus}
        argv = substitute(spec.cmd, values)
        extra = {name: substitute([value], values)[0] for name, value in spec.env.items()}
        env = {**os.environ, **placement_env(devices), **extra}  # the model's own env wins
        files: tuple[int, int] | None = None
        if self._log_dir is not None:
            try:
                files = await asyncio.to_thread(_open_output, self._log_dir, spec.name)
            except OSError as exc:
                raise StartFailed(f"cannot create its output file: {exc}") from exc
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if files is None else files[0],
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group, for a clean stop
                # An adoptable engine outlives a crash: the next switchd adopts or stops it.
                preexec_fn=_die_with_parent if files is None else None,
                limit=_LINE_LIMIT,
            )
        except OSError as exc:
            if files is not None:
                os.close(files[1])
            raise StartFailed(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from exc
        finally:
            if files is not None:
                os.close(files[0])  # the engine has its own copy
        info = EngineInfo(
            model=spec.name,
            instance=str(process.pid),
            url=spec.url or f"http://127.0.0.1:{port}",
            started_at=time.time(),
            pid=process.pid,
            devices=devices,
        )
        engine = _Engine(spec, process, info, pid=process.pid)
        engine.output = files[1] if files is not None else None
        # Before the pump exists, so the pump's removal always follows this write; in a
        # worker thread, like all file work here (it reads /proc and writes a file).
        engine.pid_file = await asyncio.to_thread(
            self._write_pid_file, spec, process.pid, argv, info
        )
        self._engines[spec.name] = engine
        engine.pump = asyncio.create_task(self._pump(engine), name=f"engine-{spec.name}")
        return info

    async def _pump(self, engine: _Engine) -> None:
        """Forward the output lines, then the exit, of one engine."""
        if engine.output is not None:
            reader = asyncio.create_task(self._follow(engine, engine.output))
        else:
            reader = asyncio.create_task(self._read_output(engine))
        try:
            if engine.process is not None:
                await _wait_for_exit(engine.process)
                code = engine.process.returncode
                assert code is not None
            else:
                assert engine.start_time is not None
                await _wait_for_pid_exit(engine.pid, engine.start_time)
                code = None  # not our child: its parent (init) read the status
            engine.exited = True
            self._kill_group(engine.pid, signal.SIGKILL)  # workers it left behind
            if engine.pid_file is not None and self._engines.get(engine.spec.name) is engine:
                _drop(engine.pid_file)  # (a newer run of the model has written its own)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), OUTPUT_DRAIN_SECONDS)
        finally:
            reader.cancel()  # switchd leaves the engine running (close with keep), or drained
            if engine.output is not None:
                os.close(engine.output)
                engine.output = None
        self._tails[engine.spec.name] = tuple(engine.tail)
        if engine.killed:
            grace = f"{engine.grace_seconds:g} s"
            reason = f"stopped (killed by SIGKILL after the {grace} grace period)"
        elif engine.stopping:
            reason = "stopped"
        elif code is None:
            reason = "exited (its exit status went to the switchd that started it)"
        else:
            reason = _describe_exit(code)
        self._events.put(
            EngineExited(engine.spec.name, engine.info.instance, code, reason, tuple(engine.tail))
        )

    def _line(self, engine: _Engine, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        engine.tail.append(line)
        self._events.put(EngineOutput(engine.spec.name, engine.info.instance, line))

    async def _follow(self, engine: _Engine, fd: int) -> None:
        """Forward the lines of an output file until the engine has exited and all is read.

        A regular file: a read never waits for the writer, so reads are tried every
        FOLLOW_POLL_SECONDS when there is nothing new. Past LOG_FILE_LIMIT, once all is
        read, the file is emptied (the engine appends: its next line lands at 0); a
        line written between that last read and the truncation is lost, as with any
        copy-truncate rotation.
        """
        while True:
            if self._read_chunk(engine, fd):
                await asyncio.sleep(0)
                continue
            if engine.exited:
                if engine.pending:
                    self._line(engine, engine.pending)  # the last line had no newline
                    engine.pending = b""
                return
            if os.lseek(fd, 0, os.SEEK_CUR) >= LOG_FILE_LIMIT:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
            await asyncio.sleep(FOLLOW_POLL_SECONDS)

    def _read_chunk(self, engine: _Engine, fd: int) -> bool:
        """Forward the whole lines of the next chunk of an output file; False at its end."""
        chunk = os.read(fd, FOLLOW_CHUNK)
        if not chunk:
            return False
        *lines, pending = (engine.pending + chunk).split(b"\n")
        for raw in lines:
            self._line(engine, raw)
        while len(pending) >= _LINE_LIMIT:  # an overlong line, in pieces, intact
            self._line(engine, pending[:_LINE_LIMIT])
            pending = pending[_LINE_LIMIT:]
        engine.pending = pending
        return True

    async def _read_output(self, engine: _Engine) -> None:
        assert engine.process is not None
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
            self._line(engine, raw)

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
        self._kill_group(engine.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(engine.pump), grace_seconds)
        except TimeoutError:
            engine.killed = engine.alive()
            self._kill_group(engine.pid, signal.SIGKILL)
            await engine.pump  # output drained and the exit reported
        if self._engines.get(spec.name) is engine:
            del self._engines[spec.name]

    @staticmethod
    def _kill_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    async def discover(self) -> Discovery:
        # From the pid files of the switchd before: the engines proven the same (with a
        # catalog) are adopted; what else is left running (an engine that cannot be
        # proven the same, a wrapper's children after PDEATHSIG) is stopped here,
        # before any start.
        if self._pid_dir is None:
            return Discovery()
        leftovers = await asyncio.to_thread(_read_pid_files, self._pid_dir)
        running: list[EngineInfo] = []
        stops = []
        for path, record in leftovers:
            if self._catalog is None:
                stops.append(self._stop_orphans(path, record))
                continue
            spec = self._catalog.get(record.model)
            why = await asyncio.to_thread(_unproven, record, spec)
            if why is None and spec is not None:
                try:
                    running.append(await asyncio.to_thread(self._adopt, path, record, spec))
                    continue
                except OSError as exc:
                    why = f"its output file cannot be followed ({exc})"
            log.warning(
                "not adopting the engine of %s (pid %d) left by an earlier switchd: %s;"
                " stopping it",
                record.model,
                record.pgid,
                why,
            )
            stops.append(self._stop_orphans(path, record))
        await asyncio.gather(*stops)
        for info in running:
            engine = self._engines[info.model]
            engine.pump = asyncio.create_task(self._pump(engine), name=f"engine-{info.model}")
        return Discovery(running=tuple(running))

    def _adopt(self, path: Path, record: _PidRecord, spec: ModelSpec) -> EngineInfo:
        """Take over a proven engine (in a worker thread: it opens its output file)."""
        assert record.log is not None
        assert record.url is not None
        fd = os.open(record.log, os.O_RDWR)  # RDWR: the follower may empty it
        try:
            size = os.fstat(fd).st_size
            # Its latest whole lines, for failure messages; only new ones become events.
            # Read up to `size` alone (the engine writes on meanwhile), and follow from
            # just past the last whole line: one half written is read whole later.
            start = max(0, size - FOLLOW_CHUNK)
            head = os.pread(fd, size - start, start)
            cut = head.rfind(b"\n") + 1
            recent = head[:cut].split(b"\n")
            os.lseek(fd, start + cut, os.SEEK_SET)
        except OSError:
            os.close(fd)
            raise
        info = EngineInfo(
            model=spec.name,
            instance=str(record.pgid),
            url=record.url,
            started_at=record.started_at,
            pid=record.pgid,
            devices=record.devices,
        )
        engine = _Engine(
            spec, None, info, pid=record.pgid, start_time=record.start_time, pid_file=path
        )
        engine.output = fd
        for raw in recent[1:-1] if start else recent[:-1]:
            engine.tail.append(raw.decode("utf-8", "replace").rstrip("\r"))
        self._engines[spec.name] = engine
        # This switchd owns it now: the pid file names it (a crash of ours is seen again).
        self._write_pid_file(spec, record.pgid, record.argv, info, start_time=record.start_time)
        log.info(
            "adopting the engine of %s (pid %d) left by an earlier switchd", spec.name, record.pgid
        )
        return info

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
        self,
        spec: ModelSpec,
        pid: int,
        argv: Sequence[str],
        info: EngineInfo,
        *,
        start_time: int | None = None,
    ) -> Path | None:
        """Record a started (or adopted) engine, so a later switchd can adopt it or
        stop what a crash leaves.

        Atomic (temp file + rename): a crash leaves the old file or the new one. No
        fsync: only a crash of the machine loses the page cache, and after that the
        boot id differs and the file is dropped anyway.
        """
        if self._pid_dir is None:
            return None
        model = spec.name
        stat = _read_stat(pid)
        boot_id = _boot_id()
        if stat is None or boot_id is None or self._self is None:
            return None  # already exited (its group was killed), or no /proc here
        if start_time is not None and stat.start_time != start_time:
            return None  # an adopted engine gone meanwhile, its pid reused
        path = self._pid_dir / (quote(model, safe="") + ".json")
        record: dict[str, object] = {
            "model": model,
            "pid": pid,  # the process group id too: the engine leads its own session
            "start_time": stat.start_time,  # clock ticks since boot, /proc/<pid>/stat
            "boot_id": boot_id,
            "argv": list(argv),
            "started_at": info.started_at,
            "switchd": {"pid": self._self.pid, "start_time": self._self.start_time},
        }
        if self._log_dir is not None:  # what adoption needs
            record["config"] = engine_digest(spec)
            record["url"] = info.url
            record["devices"] = list(info.devices) if info.devices is not None else None
            record["log"] = str(_output_path(self._log_dir, model))
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
        """Every live process of the engine's group: the engine and what it forked.

        First, what its output file holds is read: the loader asks this the moment the
        engine answers its health path, and the lines it wrote before (the last one
        comes just before it answers) belong to its load, which a follower polling
        the file might not have read yet.
        """
        if info.pid is None:
            return []
        engine = self._engines.get(info.model)
        if engine is not None and engine.output is not None and engine.info is info:
            for _ in range(64):  # a bounded catch-up; the follower reads the rest
                if not self._read_chunk(engine, engine.output):
                    break
        members = await asyncio.to_thread(_group, info.pid)
        return [member.pid for member in members]

    def last_lines(self, model: str) -> tuple[str, ...]:
        engine = self._engines.get(model)
        return tuple(engine.tail) if engine is not None else self._tails.get(model, ())

    async def close(self) -> None:
        if self._keep:
            # A planned restart: the engines go on serving nobody, their pid files and
            # output files kept, until the next switchd adopts them.
            for engine in self._engines.values():
                if engine.pump is not None:
                    engine.pump.cancel()
            for engine in list(self._engines.values()):
                if engine.pump is not None:
                    with contextlib.suppress(asyncio.CancelledError):
                        await engine.pump
            if self._engines:
                log.info(
                    "left %d engine(s) running for the next switchd (keep_engines_on_exit)",
                    len(self._engines),
                )
            self._engines.clear()
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
    # What adoption proves and needs; absent from the pid file of an unadoptable engine.
    argv: tuple[str, ...] = ()
    config: str | None = None
    url: str | None = None
    devices: tuple[int, ...] | None = None
    log: str | None = None
    started_at: float = 0.0


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
    argv = raw.get("argv")
    devices = raw.get("devices")
    started_at = raw.get("started_at")
    return _PidRecord(
        model,
        *values[:2],
        boot_id,
        *values[2:],
        argv=tuple(argv)
        if isinstance(argv, list) and all(isinstance(a, str) for a in argv)
        else (),
        config=_text(raw.get("config")),
        url=_text(raw.get("url")),
        devices=tuple(devices)
        if isinstance(devices, list) and all(isinstance(d, int) for d in devices)
        else None,
        log=_text(raw.get("log")),
        started_at=float(started_at) if isinstance(started_at, int | float) else 0.0,
    )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _cmdline(pid: int) -> tuple[str, ...] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return tuple(word.decode("utf-8", "surrogateescape") for word in raw.split(b"\0")[:-1])


def _unproven(record: _PidRecord, spec: ModelSpec | None) -> str | None:
    """Why the engine of a pid file cannot be proven the one its model's config runs
    now (blocking: it reads /proc); None when it is proven (bar its health)."""
    if spec is None:
        return "its model is no longer in the config"
    if record.config is None or record.url is None or record.log is None:
        return "its pid file does not say how to adopt it"
    stat = _read_stat(record.pgid)
    if stat is None or stat.state in ("Z", "X"):
        return "it is gone"
    if stat.start_time != record.start_time:
        return "its pid is another process's now"
    if _cmdline(record.pgid) != record.argv:
        return "its command line is not the one recorded"
    if record.config != engine_digest(spec):
        return "its engine settings changed in the config"
    if not Path(record.log).is_file():
        return "its output file is gone"
    return None


def _output_path(directory: Path, model: str) -> Path:
    return directory / (quote(model, safe="") + ".log")


def _open_output(directory: Path, model: str) -> tuple[int, int]:
    """A new output file for an engine: (its write end, appending; switchd's read end).

    A new file each start (the last run's is unlinked, not truncated: a follower of
    that run may still be reading it).
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = _output_path(directory, model)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    write = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
    try:
        read = os.open(path, os.O_RDWR)
    except OSError:
        os.close(write)
        raise
    return write, read


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


async def _wait_for_pid_exit(pid: int, start_time: int) -> None:
    """Return once the process `pid` (started at `start_time`), not our child, is gone.

    A pidfd works for any process: readable once it exits. Checked against /proc
    every EXIT_CHECK_SECONDS anyway (or EXIT_POLL_SECONDS without a pidfd).
    """

    def gone() -> bool:
        stat = _read_stat(pid)
        return stat is None or stat.start_time != start_time or stat.state in ("Z", "X")

    fd = _open_pidfd(pid)
    if fd is None:
        while True:
            if gone():
                return
            await asyncio.sleep(EXIT_POLL_SECONDS)
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    watched = True
    try:
        loop.add_reader(fd, readable.set)
    except (NotImplementedError, OSError, ValueError):
        watched = False
    try:
        if gone():  # it may have exited before the pidfd was opened: then it names nobody
            return
        while not gone():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EXIT_CHECK_SECONDS if watched else EXIT_POLL_SECONDS):
                    await readable.wait()
            if readable.is_set():
                return
    finally:
        if watched:
            loop.remove_reader(fd)
        os.close(fd)


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
