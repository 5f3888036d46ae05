"""Bringing an engine up: start, adopt or wake it, poll its health, measure it.

Runs in a scheduler's job: the one that made room (switchd.steps), or a load
beside it; model states change only through Catalog.transition. While it waits
for an engine, the inbox routes that engine's reports here (`Inbox.loads`): its lines
become the job's `log` events, and its exit fails the load with its last lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

import httpx

from switchd import footprint, metadata, standby, wire
from switchd.catalog import Catalog, ModelRecord
from switchd.config import ModelSpec, Settings, Tier
from switchd.emitter import PROGRESS_FREED, PROGRESS_LOADING_CAP, Emitter
from switchd.gpu import GpuProbe, GpuSnapshot
from switchd.inbox import Inbox, Load, exit_summary
from switchd.jobs import Job, SwitchError
from switchd.runtime.base import EngineExited, Runtime, StartFailed
from switchd.standby import EngineStandby, StandbyFailed
from switchd.states import ModelState
from switchd.stats import LearnedStats
from switchd.units import gib, with_article

log = logging.getLogger(__name__)

WAKE_POLL_SECONDS = 0.1  # a woken engine's health path, asked this often
HEALTH_BACKOFF = (0.02, 0.2, 1.5)  # first delay, cap, factor: fast at first
HEALTH_REQUEST_SECONDS = 1.0  # short, so `loading` still ticks every second
LAST_LINES_IN_ERRORS = 20


class Loader:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        *,
        runtime: Runtime,
        gpu: GpuProbe,
        inbox: Inbox,
        emitter: Emitter,
        stats: LearnedStats,
        http: httpx.AsyncClient,
        standby: EngineStandby,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.runtime = runtime
        self.gpu = gpu
        self._inbox = inbox
        self._emitter = emitter
        self._stats = stats
        self._http = http
        self._standby = standby
        self._clock = clock
        self._learning: set[asyncio.Task[None]] = set()  # metadata asked of fresh engines

    def _learn_metadata(self, spec: ModelSpec, url: str) -> None:
        """Ask a freshly loaded engine its context length, beside the job (it must not
        delay the requests waiting for it), and keep it in the learned state."""

        async def learn() -> None:
            try:
                tokens = await metadata.engine_context_length(self._http, spec, url)
                if tokens is not None:
                    await self._stats.record_context_length(spec.name, tokens)
            except Exception as exc:  # a figure for clients: never worth more than a line
                log.debug("no context length learned for %s: %r", spec.name, exc)

        task = asyncio.create_task(learn(), name=f"switchd-metadata-{spec.name}")
        self._learning.add(task)
        task.add_done_callback(self._learning.discard)

    # ---- start-up ----------------------------------------------------------------

    async def adopt(self) -> list[str]:
        """Take over the engines the runtime already runs; returns those still loading."""
        found = await self.runtime.discover()
        still_loading: list[str] = []
        for info in found.running:
            record = self.catalog.records.get(info.model)
            if record is None or record.state is not ModelState.EXITED:
                continue
            spec = record.spec
            if await self.healthy(info.url + spec.health_path):
                if spec.standby and await self._standby.is_sleeping(spec, info.url):
                    # Its level is not told: wake it the thorough way (a level-2 wake
                    # reloads the weights, which a level-1 sleeper kept: slower, correct).
                    tier = Tier.SLEEP2 if Tier.SLEEP2 in spec.standby else spec.standby[0]
                    self.catalog.transition(
                        record, ModelState.EXITED, ModelState.SLEEPING, engine=info, tier=tier
                    )
                    log.info("adopted sleeping engine of %s (%s)", info.model, info.instance)
                    continue
                self.catalog.transition(record, ModelState.EXITED, ModelState.RUNNING, engine=info)
                await self._measure_adopted(record)
                log.info("adopted running engine of %s (%s)", info.model, info.instance)
            else:
                # Started before a restart and not answering yet: a job waits for it, and
                # requests wait for that job, as for any load.
                self.catalog.transition(record, ModelState.EXITED, ModelState.LOADING, engine=info)
                still_loading.append(info.model)
                log.info("adopted %s (%s), still loading", info.model, info.instance)
        for model, why in found.unavailable.items():
            record = self.catalog.records.get(model)
            if record is not None and record.state is ModelState.EXITED:
                self.catalog.transition(record, ModelState.EXITED, ModelState.FAILED, error=why)
                log.error("%s cannot run: %s", model, why)
        return still_loading

    async def _measure_adopted(self, record: ModelRecord) -> None:
        """What an adopted engine holds: NVML's figures for its own processes (no
        before-and-after here: it loaded before this switchd was there to see). The
        simulated card's ledger learned it from the transition."""
        info = record.engine
        assert info is not None
        pids = await self.runtime.engine_pids(info)
        now = await self.gpu.snapshot()
        on_devices = record.devices or record.spec.gpus or now.indexes()
        expected = self.catalog.expected_gb(record.spec)
        # moved=True: only per-process figures count (free memory says nothing here).
        measured, _ = footprint.attribute(
            on_devices, now, now, pids, moved=True, expected_gb=expected
        )
        if measured is None:
            log.info(
                "footprint of the adopted %s not measured: no per-process figures for its"
                " processes %s",
                record.spec.name,
                pids,
            )
            return
        record.measured_by_device = measured
        record.measured_gb = round(sum(measured.values()), 2)

    # ---- a cold load ---------------------------------------------------------------

    async def load(
        self, job: Job, record: ModelRecord, devices: tuple[int, ...] | None = None
    ) -> None:
        """Start the engine on `devices` (or take over one found loading at start-up) and
        wait until it answers its health path; then it is RUNNING and its figures are
        learned."""
        spec = record.spec
        emit = self._emitter.emit
        estimate = self.catalog.estimated_load_seconds(spec)
        job.estimated_load_time_seconds = estimate
        adopted = record.engine if record.state is ModelState.LOADING else None
        if adopted is not None:
            before = None  # its memory was taken before switchd was there to see
            started = self._clock() - max(0.0, time.time() - adopted.started_at)
            info = adopted
            emit(
                job,
                wire.Start(estimate, container=info.container, adopted=True),
                f"Found {spec.name} still loading after a restart; waiting for it",
                progress=PROGRESS_FREED,
            )
        else:
            before = await self.gpu.snapshot()
            self.catalog.transition(
                record, (ModelState.EXITED, ModelState.FAILED), ModelState.LOADING, devices=devices
            )
            # Attributable only if nothing else moves from its own start on.
            moves = self.catalog.memory_moves
            releasing = self.catalog.release_pending()
            started = self._clock()
            try:
                info = await self.runtime.start(spec, devices)
            except Exception as exc:
                reason = str(exc) if isinstance(exc, StartFailed) else f"could not start: {exc!r}"
                self.catalog.transition(record, ModelState.LOADING, ModelState.FAILED, error=reason)
                raise SwitchError(
                    "engine_failed", 502, f"{spec.name}: {reason}", {"model": spec.name}
                ) from exc
            self.catalog.attach(record, info)
            where = {"container": info.container} if info.container else {"pid": info.pid}
            emit(
                job,
                wire.Start(estimate, **where),
                f"Started {spec.name}; loading takes about {estimate:g} s",
                progress=PROGRESS_FREED,
            )
        job.started.set()
        loading = Load(job, record, info.instance, info.url + spec.health_path)
        self._inbox.loads[spec.name] = loading
        try:
            self._inbox.apply()  # the lines it printed before `start` was announced
            await self._wait_healthy(loading, started, estimate)
            pids = await self.runtime.engine_pids(info)
            after = await self.gpu.snapshot()
            self._inbox.apply()  # an exit that came while memory was read
            if loading.exited is not None:
                self._engine_died(record, loading.exited)
        finally:
            self._inbox.loads.pop(spec.name, None)
            self._emitter.flush_logs(job)  # the count of lines held back, before `ready` or `error`
        load_seconds = round(self._clock() - started, 2)
        if before is not None:
            moved = releasing or self.catalog.memory_moves != moves
            await self._measure(record, before, after, pids, moved=moved, seconds=load_seconds)
        record.ready_cost_seconds = load_seconds
        self.catalog.transition(record, ModelState.LOADING, ModelState.RUNNING)
        message = f"{spec.name} is ready after {load_seconds:.1f} s"
        emit(job, wire.Ready(load_seconds, record.measured_gb), message, progress=1.0)
        self._learn_metadata(spec, info.url)

    async def _measure(
        self,
        record: ModelRecord,
        before: GpuSnapshot,
        after: GpuSnapshot,
        pids: Sequence[int],
        *,
        moved: bool,
        seconds: float,
    ) -> None:
        """The one footprint measurement of a cold load, learned with its time."""
        spec = record.spec
        on_devices = record.devices or spec.gpus or after.indexes()
        expected = self.catalog.expected_gb(spec)
        measured, why = footprint.attribute(
            on_devices, before, after, pids, moved=moved, expected_gb=expected
        )
        if why is not None:
            log.warning("footprint of %s not learned from this load: %s", spec.name, why)
        record.measured_by_device = measured
        record.measured_gb = round(sum(measured.values()), 2) if measured else None
        fullest = max(measured.values()) if measured else None
        await self._stats.record(spec.name, seconds, record.measured_gb, fullest)

    # ---- a wake ------------------------------------------------------------------------

    async def wake(self, job: Job, record: ModelRecord) -> str | None:
        """Wake a sleeping target, check that it answers, and measure it: None once it is
        RUNNING, else why the wake failed (it is then LOADING with its engine to stop,
        or FAILED if the engine died) and it must be stopped and started cold."""
        spec = record.spec
        info = record.engine
        tier = record.asleep or spec.standby[0]
        assert info is not None
        emit = self._emitter.emit
        estimate = self.catalog.estimated_wake_seconds(spec, tier)
        cold = self.catalog.estimated_load_seconds(spec)
        job.estimated_load_time_seconds = estimate
        emit(
            job,
            wire.Wake(tier.value, estimate, cold),
            f"Waking {spec.name} ({standby.label(tier)}): about {estimate:g} s instead of "
            f"{with_article(f'{cold:g}')} s load",
            progress=PROGRESS_FREED,
        )
        before = await self.gpu.snapshot()
        residue = self.catalog.held_by_device(record, before.indexes())
        moves, releasing = self.catalog.memory_moves, self.catalog.release_pending()
        self.catalog.transition(record, ModelState.SLEEPING, ModelState.LOADING)
        started = self._clock()
        job.woken = True  # before `started`: a switch answered now tells of a wake
        job.started.set()
        loading = Load(job, record, info.instance, info.url + spec.health_path)
        self._inbox.loads[spec.name] = loading
        # A wake slower than a cold load is a failed wake: stop it and load it cold.
        deadline = started + min(self.settings.health_timeout_seconds, max(10.0, cold))
        failure: str | None = None
        try:
            self._inbox.apply()
            await self._standby.wake(spec, info.url, tier, within_seconds=deadline - self._clock())
            while not await self.healthy(loading.health_url):
                if loading.exited is not None or self._clock() >= deadline:
                    raise StandbyFailed(f"it did not answer {spec.health_path} after waking")
                await self._inbox.pause(WAKE_POLL_SECONDS)
            left = max(1.0, deadline - self._clock())
            await self._standby.check(spec, info.url, within_seconds=left)
        except StandbyFailed as exc:
            failure = str(exc)
        finally:
            self._inbox.loads.pop(spec.name, None)
            self._inbox.apply()
        if loading.exited is not None:
            failure = f"it {loading.exited.reason} while waking"
        if failure is not None:
            log.warning("waking %s failed: %s; starting it cold", spec.name, failure)
            job.woken = False
            if loading.exited is not None:  # nothing left to stop: its memory went with it
                record.last_exit = exit_summary(loading.exited)
                error = f"{spec.name} {loading.exited.reason} while waking"
                self.catalog.transition(record, ModelState.LOADING, ModelState.FAILED, error=error)
            return failure
        seconds = round(self._clock() - started, 2)
        after = await self.gpu.snapshot()
        devices = record.devices or tuple(residue)
        taken = {
            d: gib(max(0, before.free_by_device().get(d, 0) - after.free_by_device().get(d, 0)))
            for d in devices
        }
        taken_gb: float | None = None
        if self.catalog.memory_moves == moves + 1 and not releasing:
            record.measured_by_device = {d: round(residue.get(d, 0.0) + taken[d], 2) for d in taken}
            record.measured_gb = round(sum(record.measured_by_device.values()), 2)
            taken_gb = round(sum(taken.values()), 2)
        await self._stats.record_wake(spec.name, tier.value, seconds)
        record.ready_cost_seconds = seconds
        self.catalog.transition(record, ModelState.LOADING, ModelState.RUNNING)
        took = f", taking back {taken_gb:.2f} GB" if taken_gb is not None else ""
        emit(
            job,
            wire.Woken(seconds, taken_gb),
            f"{spec.name} woke in {seconds:.2f} s ({standby.label(tier)}){took}",
            progress=PROGRESS_LOADING_CAP,
        )
        message = f"{spec.name} is ready after {seconds:.1f} s"
        emit(job, wire.Ready(seconds, record.measured_gb), message, progress=1.0)
        return None

    # ---- health ------------------------------------------------------------------------

    async def _wait_healthy(self, loading: Load, started: float, estimate: float) -> None:
        """Poll the health path with backoff, reporting progress every second."""
        record, job = loading.record, loading.job
        spec = record.spec
        first, cap, factor = HEALTH_BACKOFF
        delay = first
        next_report = started
        while True:
            if loading.exited is not None:
                self._engine_died(record, loading.exited)
            if await self.healthy(loading.health_url):
                return
            now = self._clock()
            elapsed = now - started
            if elapsed >= self.settings.health_timeout_seconds:
                await self._abandon(record)
                raise SwitchError(
                    "health_timeout",
                    504,
                    f"{spec.name} did not answer {spec.health_path} within "
                    f"{self.settings.health_timeout_seconds:g} s",
                    {"model": spec.name, "last_lines": self.last_lines(spec.name)},
                )
            if now >= next_report:
                fraction = min(1.0, elapsed / estimate) if estimate > 0 else 1.0
                self._emitter.emit(
                    job,
                    wire.Loading(round(elapsed, 2), estimate),
                    f"Loading {spec.name}: {elapsed:.0f} s of ~{estimate:g} s",
                    progress=PROGRESS_FREED + (PROGRESS_LOADING_CAP - PROGRESS_FREED) * fraction,
                )
                next_report += 1.0
            # A line from the engine is a hint that it moved on (the last one comes
            # just before it answers): poll fast again. Only the health path proves it.
            hinted = await self._inbox.pause(min(delay, next_report - self._clock()))
            delay = first if hinted else min(cap, delay * factor)

    async def healthy(self, url: str) -> bool:
        """Whether the engine answers 200 on `url` now. Any failure to get an answer is
        "not ready yet": an engine starting may refuse or reset connections, and only
        the health timeout or its exit fails the load."""
        try:
            response = await self._http.get(url, timeout=HEALTH_REQUEST_SECONDS)
        except (httpx.HTTPError, OSError) as exc:
            log.debug("health poll of %s: %r", url, exc)
            return False
        except AttributeError as exc:
            # httpcore on a connection reset as it is made: "'NoneType' object has no
            # attribute 'getpeername'" (its socket is gone before it is asked).
            log.debug("health poll of %s: connection reset: %r", url, exc)
            return False
        return response.status_code == 200

    def _engine_died(self, record: ModelRecord, exited: EngineExited) -> None:
        spec = record.spec
        lines = list(exited.last_lines[-LAST_LINES_IN_ERRORS:])
        record.last_exit = exit_summary(exited)
        summary = f"{spec.name} {exited.reason} while loading"
        detail = "\n".join(lines[-5:])
        error = f"{summary}:\n{detail}" if lines else summary
        self.catalog.transition(record, ModelState.LOADING, ModelState.FAILED, error=error)
        raise SwitchError(
            "engine_failed",
            502,
            f"{summary}: {lines[-1]}" if lines else summary,
            {"model": spec.name, "exit_code": exited.exit_code, "last_lines": lines},
        )

    async def _abandon(self, record: ModelRecord) -> None:
        """Stop an engine that will not become healthy; it is then `failed`."""
        with contextlib.suppress(Exception):
            await self.runtime.stop(record.spec, self.settings.stop_grace_seconds)
        error = "did not become healthy in time"
        self.catalog.transition(record, ModelState.LOADING, ModelState.FAILED, error=error)

    def last_lines(self, model: str) -> list[str]:
        return list(self.runtime.last_lines(model)[-LAST_LINES_IN_ERRORS:])
