"""The steps of a job: memory check, drain, unload and verify, start or adopt, health.

Each step emits its stage events (switchd.wire) and changes model states only
through Catalog.transition. The steps run in the scheduler's worker, the one
owner of model state: what the runtime reports (an engine's output line, an
exit) is queued by `deliver` and applied by the worker between steps and at
every wait inside one (`pause`), so a report can never change a state that a
step has read and is about to act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from switchd import footprint, planner, standby, wire
from switchd.catalog import Catalog, ModelRecord
from switchd.config import ModelSpec, Settings, Tier
from switchd.events import EventBus, LogRate
from switchd.gpu import GpuProbe, GpuSnapshot
from switchd.jobs import Job, JobKind, SwitchError
from switchd.runtime.base import EngineExited, EngineOutput, Runtime, RuntimeEvent, StartFailed
from switchd.standby import EngineStandby, PutAway, StandbyFailed
from switchd.states import JOB_TRANSITIONS, ModelState, Stage, check
from switchd.stats import LearnedStats
from switchd.units import gib, gib_to_bytes, iso_timestamp

log = logging.getLogger(__name__)

RELEASED_FRACTION = 0.75  # of a victim's memory that must show as free again
MEMORY_POLL_SECONDS = 0.1
HEALTH_BACKOFF = (0.02, 0.2, 1.5)  # first delay, cap, factor: fast at first
HEALTH_REQUEST_SECONDS = 1.0  # short, so `loading` still ticks every second
LAST_LINES_IN_ERRORS = 20
MAX_LOG_EVENTS_PER_JOB = 500  # more lines still reach /v1/events, not the job's replay

# Share of the progress bar each phase owns: memory check 5%, unloads up to
# 30%, loading from 30% towards 99% by elapsed over estimated time.
PROGRESS_CHECKED = 0.05
PROGRESS_FREED = 0.30
PROGRESS_LOADING_CAP = 0.99


@dataclass
class _Loading:
    """The load in progress: whose job reports it, and its engine's exit if it died."""

    job: Job
    record: ModelRecord
    instance: str
    health_url: str
    exited: EngineExited | None = None


class Steps:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        *,
        runtime: Runtime,
        gpu: GpuProbe,
        bus: EventBus,
        stats: LearnedStats,
        http: httpx.AsyncClient,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.runtime = runtime
        self.gpu = gpu
        self._bus = bus
        self._stats = stats
        self._http = http
        self._clock = clock
        self._reports: deque[RuntimeEvent] = deque()
        self._reported = asyncio.Event()
        self._loading: _Loading | None = None
        self._log_rate = LogRate()  # engine lines each load may publish as `log` events
        self.device_count = 1  # the host's GPUs, as the last snapshot planned with showed
        self.standby = EngineStandby(http)
        self.host_ram_budget_gb = 0.0  # for level-1 sleeps; the scheduler sets it at start

    # ---- what the runtime reports ------------------------------------------------

    def deliver(self, event: RuntimeEvent) -> None:
        """Queue a runtime report for the worker (called by the runtime's watcher)."""
        self._reports.append(event)
        self._reported.set()

    def apply_reports(self) -> None:
        """Handle every queued report: the worker calls this, no one else."""
        self._reported.clear()
        while self._reports:
            event = self._reports.popleft()
            if isinstance(event, EngineOutput):
                self._on_output(event)
            else:
                self._on_exit(event)

    async def pause(self, seconds: float, until: asyncio.Event | None = None) -> bool:
        """Wait up to `seconds` (or until `until` is set), applying reports as they come;
        True when a report cut the wait short."""
        waits = [asyncio.ensure_future(self._reported.wait())]
        if until is not None:
            waits.append(asyncio.ensure_future(until.wait()))
        try:
            await asyncio.wait(waits, timeout=max(0.0, seconds), return_when="FIRST_COMPLETED")
        finally:
            for waiting in waits:
                waiting.cancel()
        reported = self._reported.is_set()
        self.apply_reports()
        return reported

    def _on_output(self, event: EngineOutput) -> None:
        loading = self._loading
        if loading is not None and (event.model, event.instance) == (
            loading.record.spec.name,
            loading.instance,
        ):
            self.emit_log(loading.job, event.model, event.line)

    def _on_exit(self, event: EngineExited) -> None:
        loading = self._loading
        if loading is not None and (event.model, event.instance) == (
            loading.record.spec.name,
            loading.instance,
        ):
            loading.exited = event  # the load step fails with the engine's last lines
            return
        record = self.catalog.records.get(event.model)
        if record is None or record.engine is None or record.engine.instance != event.instance:
            return  # an engine switchd already stopped, or one from an earlier run
        if record.state not in (ModelState.RUNNING, ModelState.LOADING, ModelState.SLEEPING):
            return  # STOPPING: the job stopping it sees it go
        # RUNNING or SLEEPING, or LOADING when found so at start-up and its job has not begun.
        record.last_exit = exit_summary(event)
        lines = "\n".join(event.last_lines[-5:])
        asleep = " while asleep" if record.state is ModelState.SLEEPING else ""
        error = f"{event.reason} outside switchd{asleep}" + (f":\n{lines}" if lines else "")
        failed = event.exit_code not in (0, None)
        new = ModelState.FAILED if failed else ModelState.EXITED
        self.catalog.transition(record, record.state, new, error=error)

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
                if spec.standby and await self.standby.is_sleeping(spec, info.url):
                    # Its level is not told: wake it the thorough way (a level-2 wake
                    # reloads the weights, which a level-1 sleeper kept: slower, correct).
                    tier = Tier.SLEEP2 if Tier.SLEEP2 in spec.standby else spec.standby[0]
                    self.catalog.transition(
                        record, ModelState.EXITED, ModelState.SLEEPING, engine=info, tier=tier
                    )
                    log.info("adopted sleeping engine of %s (%s)", info.model, info.instance)
                    continue
                self.catalog.transition(record, ModelState.EXITED, ModelState.RUNNING, engine=info)
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

    # ---- memory --------------------------------------------------------------------

    def required_gb(self, spec: ModelSpec) -> float:
        return self.catalog.expected_gb(spec)

    def plan(
        self, spec: ModelSpec, snapshot: GpuSnapshot, protected: frozenset[str] = frozenset()
    ) -> planner.Plan:
        """Where `spec` goes and what must be unloaded there for it to fit, device by
        device; `protected` models count as pinned."""
        every = snapshot.indexes()
        self.device_count = len(every)
        candidates = [
            c
            if c.name not in protected
            else planner.Candidate(c.name, c.held_gb, c.last_used, True)
            for c in self.catalog.candidates(spec, every)
        ]
        return planner.plan(
            self.catalog.need(spec, every),
            self.catalog.available_by_device(snapshot),
            {d.index: gib(d.total_bytes) for d in snapshot.devices},
            candidates,
            self.settings.eviction,
        )

    # ---- a switch ------------------------------------------------------------------

    async def switch(self, job: Job, plan: planner.Plan) -> dict[str, Any]:
        """Make room as `plan` says, then load the target."""
        record = self.catalog.records[job.target]
        spec = record.spec
        victims = [v.name for v in plan.victims]
        choices = self._put_away_choices(plan)
        if victims:
            verdict = "; ".join(choice.reason for choice in choices)
        else:
            verdict = "it fits" if plan.enough else "not enough even after unloading every model"
        required = round(plan.required_gb, 2)
        where = on_devices(plan.devices, self.device_count)
        self.emit(
            job,
            wire.MemoryCheck(
                required,
                plan.available_gb,
                plan.total_gb,
                victims,
                plan.enough,
                list(plan.devices),
                plan.short_device,
                [c.name for c in choices if c.tier is not None],
            ),
            f"{spec.name} needs {required:.2f} GB{where}, {plan.available_gb:.2f} GB free: "
            f"{verdict}",
            progress=PROGRESS_CHECKED,
        )
        job.memory_info = {"required_gb": required, "available_before_gb": plan.available_gb}
        if not plan.enough:
            raise insufficient_memory(spec, plan, self.device_count)
        chosen = [self.catalog.records[name] for name in victims]
        freed = await self.unload_all(job, chosen, {c.name: c for c in choices})
        freed += await self._stop_sleepers_if_short(job, record, chosen, plan)
        job.memory_info["freed_gb"] = round(freed, 2)
        if victims:
            after = self.catalog.available_gb(await self.gpu.snapshot(), plan.devices)
            self.emit(
                job,
                wire.Freed(round(freed, 2), after),
                f"Freed {freed:.2f} GB; {after:.2f} GB now free{where}",
                progress=PROGRESS_FREED,
            )
        await self.load(job, record, plan.devices)
        return job.success_body(ready=True)

    def _put_away_choices(self, plan: planner.Plan) -> list[PutAway]:
        """Which of the plan's victims sleep and which stop (switchd.standby.choose)."""
        if not plan.victims:
            return []
        victims = [
            self.catalog.standby_victim(self.catalog.records[v.name], dict(v.held_gb))
            for v in plan.victims
        ]
        short = {d: plan.required_by_device[d] - plan.available_by_device[d] for d in plan.devices}
        budget_left = self.host_ram_budget_gb - self.catalog.host_ram_in_use_gb()
        return standby.choose(victims, short, budget_left)

    async def _stop_sleepers_if_short(
        self, job: Job, target: ModelRecord, chosen: list[ModelRecord], plan: planner.Plan
    ) -> float:
        """Victims this job put to sleep are stopped if the target still does not fit
        (a residue larger than learned, or never learned yet): returns the GB freed."""
        sleepers = [r for r in chosen if r.state is ModelState.SLEEPING]
        freed = 0.0
        while sleepers:
            snapshot = await self.gpu.snapshot()
            every = snapshot.indexes()
            available = self.catalog.available_by_device(snapshot)
            need = self.catalog.need(target.spec, every).per_device_gb
            short = [d for d in plan.devices if available[d] < need]
            if not short:
                break
            record = max(
                sleepers,
                key=lambda r: sum(self.catalog.held_by_device(r, every).get(d, 0.0) for d in short),
            )
            sleepers.remove(record)
            why = (
                f"{target.spec.name} still lacks memory on GPU {short[0]} with "
                f"{record.spec.name} asleep: stopping it"
            )
            freed += await self._unload(
                job, record, self.catalog.held_by_device(record, every), 1.0, why=why
            )
        return freed

    async def unload_models(self, job: Job, chosen: list[ModelRecord]) -> dict[str, Any]:
        """An unload job: stop `chosen`, verify, and report what came back."""
        if not chosen:
            return {
                "status": "not_loaded",
                "job": job.id,
                "unloaded_models": [],
                "freed_gb": 0.0,
                "message": f"Nothing to unload: {job.target} is not running",
            }
        freed = await self.unload_all(job, chosen)
        available = gib((await self.gpu.snapshot()).free_bytes())
        self.emit(
            job,
            wire.Freed(round(freed, 2), available),
            f"Freed {freed:.2f} GB; {available:.2f} GB now free",
            progress=1.0,
        )
        return {
            "status": "success",
            "job": job.id,
            "unloaded_models": list(job.unloaded_models),
            "freed_gb": round(freed, 2),
        }

    # ---- unloading ------------------------------------------------------------------

    async def unload_all(
        self,
        job: Job,
        victims: list[ModelRecord],
        choices: dict[str, PutAway] | None = None,
    ) -> float:
        """Put each victim aside in order, asleep where `choices` says, else stopped;
        returns the GB measured as freed in all."""
        # Every victim stops taking requests now, before the first await, so no
        # request can start on a model this job is about to stop.
        for record in victims:
            record.draining = True
        try:
            every = (await self.gpu.snapshot()).indexes()
            held = [(record, self.catalog.held_by_device(record, every)) for record in victims]
            freed = 0.0
            for index, (record, on_devices) in enumerate(held):
                choice = (choices or {}).get(record.spec.name)
                share = (index + 1) / len(held)
                if choice is not None and choice.tier is not None:
                    slept, why = await self._sleep(job, record, on_devices, share, choice)
                    if slept is not None:
                        freed += slept
                        continue
                    freed += await self._unload(job, record, on_devices, share, why=why)
                else:
                    freed += await self._unload(job, record, on_devices, share)
            return freed
        finally:
            for record in victims:
                record.draining = False

    async def _drain(self, job: Job, record: ModelRecord) -> None:
        if not record.in_flight:
            return
        self.emit(
            job,
            wire.Drain(record.spec.name, record.in_flight),
            f"Waiting for {record.in_flight} request(s) on {record.spec.name} to finish",
        )
        deadline = self._clock() + self.settings.drain_timeout_seconds
        while record.in_flight and self._clock() < deadline:
            await self.pause(deadline - self._clock(), until=record.idle)

    async def _unload(
        self,
        job: Job,
        record: ModelRecord,
        held: dict[int, float],
        share: float,
        *,
        why: str | None = None,
    ) -> float:
        """Drain, stop and verify one model; returns the GB measured as freed. `why`:
        the reason it is stopped rather than put to sleep, for the event."""
        spec = record.spec
        held_gb = sum(held.values())
        await self._drain(job, record)
        self.emit(
            job,
            wire.Unload(spec.name, round(held_gb, 2)),
            f"Unloading {spec.name}" + (f": {why}" if why else ""),
        )
        self.apply_reports()  # a victim that died while this job waited or drained
        if record.state not in (ModelState.RUNNING, ModelState.LOADING, ModelState.SLEEPING):
            return await self._already_gone(job, record, share)
        started = self._clock()
        before = (await self.gpu.snapshot()).free_by_device()
        # No report is applied between the check above and this change: it cannot conflict.
        self.catalog.transition(record, record.state, ModelState.STOPPING)
        try:
            await self.runtime.stop(spec, self.settings.stop_grace_seconds)
        except Exception as exc:
            error = f"could not be stopped: {exc}"
            self.catalog.transition(record, ModelState.STOPPING, ModelState.FAILED, error=error)
            raise SwitchError(
                "unload_failed", 502, f"Could not stop {spec.name}: {exc}", {"victim": spec.name}
            ) from exc
        self.catalog.transition(record, ModelState.STOPPING, ModelState.EXITED)
        back, verified = await self._await_release(before, held)
        if verified:  # else the rest may still come back while the next model loads
            self.catalog.released(spec.name)
        freed = gib(sum(back.values()))
        seconds = round(self._clock() - started, 2)
        job.unloaded_models.append(spec.name)
        message = f"{spec.name} unloaded: {freed:.2f} GB freed in {seconds:.2f} s"
        message += self._unverified(verified, spec.name, f"expected about {held_gb:.2f} GB")
        self.emit(
            job,
            wire.Unloaded(spec.name, freed, seconds, verified),
            message,
            progress=self._unload_progress(job, share),
        )
        return freed

    async def _sleep(
        self, job: Job, record: ModelRecord, held: dict[int, float], share: float, choice: PutAway
    ) -> tuple[float | None, str]:
        """Drain and put one victim to sleep, and measure what came back: returns the GB
        freed, or None with the reason to stop it instead."""
        spec = record.spec
        tier = choice.tier
        assert tier is not None
        await self._drain(job, record)
        self.apply_reports()  # a victim that died while this job waited or drained
        if record.state is not ModelState.RUNNING or record.engine is None:
            return None, f"it is {record.state.value}"
        held_gb = round(sum(held.values()), 2)
        self.emit(
            job,
            wire.Sleep(spec.name, tier.value, held_gb, choice.wake_seconds or 0.0, choice.reason),
            choice.reason[0].upper() + choice.reason[1:],
        )
        started = self._clock()
        before = (await self.gpu.snapshot()).free_by_device()
        moves, releasing = self.catalog.memory_moves, self.catalog.release_pending()
        measured = record.measured_by_device is not None
        try:
            await self.standby.sleep(spec, record.engine.url, tier)
        except StandbyFailed as exc:
            log.warning("%s did not go to sleep: %s", spec.name, exc)
            return None, f"its sleep failed ({exc})"
        self.apply_reports()  # an exit during the call
        if record.state is not ModelState.RUNNING:
            return None, "it exited while falling asleep"
        self.catalog.transition(record, ModelState.RUNNING, ModelState.SLEEPING, tier=tier)
        record.host_ram_gb = choice.host_ram_gb
        back, verified = await self._await_release(before, held)
        residue = {d: round(max(0.0, gb - gib(back[d])), 2) for d, gb in held.items()}
        record.residue_by_device = residue
        kept = round(sum(residue.values()), 2)
        # Learned only when the window saw nothing else move and the footprint it
        # started from was measured: else the residue is a guess, used but not kept.
        alone = self.catalog.memory_moves == moves + 1 and not releasing
        if verified and measured and alone:
            await self._stats.record_residue(spec.name, kept)
        freed = gib(sum(back.values()))
        seconds = round(self._clock() - started, 2)
        job.slept_models.append(spec.name)
        message = (
            f"{spec.name} asleep ({standby.label(tier)}): {freed:.2f} GB freed in "
            f"{seconds:.2f} s, {kept:.2f} GB kept"
        )
        message += self._unverified(
            verified, spec.name, f"expected at least {RELEASED_FRACTION * held_gb:.2f} GB back"
        )
        self.emit(
            job,
            wire.Slept(spec.name, tier.value, freed, kept, seconds, verified),
            message,
            progress=self._unload_progress(job, share),
        )
        return freed, ""

    def _unverified(self, verified: bool, model: str, expected: str) -> str:
        """The note a release message gets when the memory did not come back in time."""
        if verified:
            return ""
        timeout = self.settings.memory_release_timeout_seconds
        note = f"{expected}; the memory had not come back after {timeout:g} s"
        log.warning("%s: %s", model, note)
        return f" ({note})"

    async def _already_gone(self, job: Job, record: ModelRecord, share: float) -> float:
        """A victim whose engine exited on its own while this job waited its turn."""
        spec = record.spec
        with contextlib.suppress(Exception):  # make sure: nothing of it may keep running
            await self.runtime.stop(spec, self.settings.stop_grace_seconds)
        job.unloaded_models.append(spec.name)
        self.emit(
            job,
            wire.Unloaded(spec.name, 0.0, 0.0, False),
            f"{spec.name} had already exited ({record.state.value}); its memory was "
            "released before this switch could measure it",
            progress=self._unload_progress(job, share),
        )
        return 0.0

    @staticmethod
    def _unload_progress(job: Job, share: float) -> float:
        if job.kind is JobKind.UNLOAD:
            return share * 0.99
        return PROGRESS_CHECKED + (PROGRESS_FREED - PROGRESS_CHECKED) * share

    async def _await_release(
        self, free_before: dict[int, int], held: dict[int, float]
    ) -> tuple[dict[int, int], bool]:
        """Poll free memory until most of what the victim held came back, on each of
        its devices; returns the bytes seen back on each, and whether that was enough."""
        wanted = {device: RELEASED_FRACTION * gib_to_bytes(gb) for device, gb in held.items()}
        deadline = self._clock() + self.settings.memory_release_timeout_seconds
        while True:
            free = (await self.gpu.snapshot()).free_by_device()
            back = {d: max(0, free.get(d, 0) - free_before.get(d, 0)) for d in wanted}
            if all(back[d] >= wanted[d] for d in wanted):
                return back, True
            if self._clock() >= deadline:
                return back, False
            await self.pause(MEMORY_POLL_SECONDS)

    # ---- loading ----------------------------------------------------------------------

    async def load(
        self, job: Job, record: ModelRecord, devices: tuple[int, ...] | None = None
    ) -> None:
        """Start the engine on `devices` (or take over one found loading at start-up) and
        wait until it answers its health path; then it is RUNNING and its figures are
        learned."""
        spec = record.spec
        if record.state is ModelState.SLEEPING and await self._wake(job, record):
            return
        estimate = self.catalog.estimated_load_seconds(spec)
        job.estimated_load_time_seconds = estimate
        adopted = record.engine if record.state is ModelState.LOADING else None
        if adopted is not None:
            before = None  # its memory was taken before switchd was there to see
            started = self._clock() - max(0.0, time.time() - adopted.started_at)
            info = adopted
            self.emit(
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
            self.emit(
                job,
                wire.Start(estimate, **where),
                f"Started {spec.name}; loading takes about {estimate:g} s",
                progress=PROGRESS_FREED,
            )
        job.started.set()
        loading = _Loading(job, record, info.instance, info.url + spec.health_path)
        self._loading = loading
        try:
            self.apply_reports()  # the lines it printed before `start` was announced
            await self._wait_healthy(loading, started, estimate)
            pids = await self.runtime.engine_pids(info)
            after = await self.gpu.snapshot()
            self.apply_reports()  # an exit that came while memory was read
            if loading.exited is not None:
                self._engine_died(record, loading.exited)
        finally:
            self._loading = None
            self.flush_logs(job)  # the count of lines held back, before `ready` or `error`
        load_seconds = round(self._clock() - started, 2)
        if before is not None:
            moved = releasing or self.catalog.memory_moves != moves
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
            await self._stats.record(spec.name, load_seconds, record.measured_gb, fullest)
        record.ready_cost_seconds = load_seconds
        self.catalog.transition(record, ModelState.LOADING, ModelState.RUNNING)
        message = f"{spec.name} is ready after {load_seconds:.1f} s"
        self.emit(job, wire.Ready(load_seconds, record.measured_gb), message, progress=1.0)

    async def _wake(self, job: Job, record: ModelRecord) -> bool:
        """Wake a sleeping target, check that it answers, and measure it: True once it is
        RUNNING. False when the wake failed: it was stopped, and starts cold."""
        spec = record.spec
        info = record.engine
        tier = record.asleep or spec.standby[0]
        assert info is not None
        estimate = self.catalog.estimated_wake_seconds(spec, tier)
        cold = self.catalog.estimated_load_seconds(spec)
        job.estimated_load_time_seconds = estimate
        self.emit(
            job,
            wire.Wake(tier.value, estimate, cold),
            f"Waking {spec.name} ({standby.label(tier)}): about {estimate:g} s instead of "
            f"a {cold:g} s load",
            progress=PROGRESS_FREED,
        )
        before = await self.gpu.snapshot()
        residue = self.catalog.held_by_device(record, before.indexes())
        moves, releasing = self.catalog.memory_moves, self.catalog.release_pending()
        self.catalog.transition(record, ModelState.SLEEPING, ModelState.LOADING)
        started = self._clock()
        job.started.set()
        loading = _Loading(job, record, info.instance, info.url + spec.health_path)
        self._loading = loading
        # A wake slower than a cold load is a failed wake: stop it and load it cold.
        deadline = started + min(self.settings.health_timeout_seconds, max(10.0, cold))
        failure: str | None = None
        try:
            self.apply_reports()
            await self.standby.wake(spec, info.url, tier, within_seconds=deadline - self._clock())
            while not await self.healthy(loading.health_url):
                if loading.exited is not None or self._clock() >= deadline:
                    raise StandbyFailed(f"it did not answer {spec.health_path} after waking")
                await self.pause(MEMORY_POLL_SECONDS)
            left = max(1.0, deadline - self._clock())
            await self.standby.check(spec, info.url, within_seconds=left)
        except StandbyFailed as exc:
            failure = str(exc)
        finally:
            self._loading = None
            self.apply_reports()
        if loading.exited is not None:
            failure = f"it {loading.exited.reason} while waking"
        if failure is not None:
            await self._wake_failed(job, record, failure, loading.exited)
            return False
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
        job.woken = True
        self.catalog.transition(record, ModelState.LOADING, ModelState.RUNNING)
        took = f", taking back {taken_gb:.2f} GB" if taken_gb is not None else ""
        self.emit(
            job,
            wire.Woken(seconds, taken_gb),
            f"{spec.name} woke in {seconds:.2f} s ({standby.label(tier)}){took}",
            progress=PROGRESS_LOADING_CAP,
        )
        message = f"{spec.name} is ready after {seconds:.1f} s"
        self.emit(job, wire.Ready(seconds, record.measured_gb), message, progress=1.0)
        return True

    async def _wake_failed(
        self, job: Job, record: ModelRecord, why: str, exited: EngineExited | None
    ) -> None:
        """Stop a target whose wake failed, so that it can start cold."""
        spec = record.spec
        log.warning("waking %s failed: %s; starting it cold", spec.name, why)
        if exited is not None:  # nothing left to stop: its memory went with it
            record.last_exit = exit_summary(exited)
            error = f"{spec.name} {exited.reason} while waking"
            self.catalog.transition(record, ModelState.LOADING, ModelState.FAILED, error=error)
        held = self.catalog.held_by_device(record, (await self.gpu.snapshot()).indexes())
        why = f"waking it failed ({why}); starting it cold"
        await self._unload(job, record, held, 1.0, why=why)

    async def _wait_healthy(self, loading: _Loading, started: float, estimate: float) -> None:
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
                self.emit(
                    job,
                    wire.Loading(round(elapsed, 2), estimate),
                    f"Loading {spec.name}: {elapsed:.0f} s of ~{estimate:g} s",
                    progress=PROGRESS_FREED + (PROGRESS_LOADING_CAP - PROGRESS_FREED) * fraction,
                )
                next_report += 1.0
            # A line from the engine is a hint that it moved on (the last one comes
            # just before it answers): poll fast again. Only the health path proves it.
            hinted = await self.pause(min(delay, next_report - self._clock()))
            delay = first if hinted else min(cap, delay * factor)

    async def healthy(self, url: str) -> bool:
        try:
            response = await self._http.get(url, timeout=HEALTH_REQUEST_SECONDS)
        except httpx.HTTPError:
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

    # ---- events -------------------------------------------------------------------------

    def emit(
        self, job: Job, payload: wire.Payload, message: str, /, *, progress: float | None = None
    ) -> None:
        stage = payload.STAGE
        if stage is not Stage.QUEUED:
            check(JOB_TRANSITIONS, job.stage, stage)
        job.stage = stage
        if progress is not None:
            job.progress = max(job.progress, min(1.0, progress))
        job.record(
            self._bus.publish(
                payload.name, self._payload(job, payload.name, message, payload.fields())
            )
        )

    def emit_log(self, job: Job, model: str, line: str, *, skipped: int = 0) -> None:
        """Publish one engine output line, within the job's allowance of log events.

        Lines over it (`LogRate`: a burst, then so many a second) are counted,
        not published, and the count goes out as one `log` event ("N more lines from
        <model>", with `skipped`: N) on the first line a second after they began, or
        at `flush_logs`. `skipped` > 0 publishes such a summary as `line`, unmetered.
        Error reports take the engine's last lines from the runtime, not from here."""
        if not skipped:
            admitted, held = self._log_rate.admit(job.id, model, self._clock())
            if held:
                self.emit_log(job, model, f"{held} more lines from {model}", skipped=held)
            if not admitted:
                return
        fields: dict[str, Any] = {"line": line, "source": model}
        if skipped:
            fields["skipped"] = skipped
        event = self._bus.publish(wire.LOG, self._payload(job, wire.LOG, line, fields))
        if job.log_lines < MAX_LOG_EVENTS_PER_JOB:
            job.log_lines += 1
            job.record(event)

    def flush_logs(self, job: Job) -> None:
        """At the end of a load: publish the count of lines still held back, if any."""
        model, held = self._log_rate.flush(job.id)
        if held:
            self.emit_log(job, model, f"{held} more lines from {model}", skipped=held)

    @staticmethod
    def _payload(job: Job, name: str, message: str, fields: dict[str, Any]) -> dict[str, Any]:
        return {
            "job": job.id,
            "kind": job.kind.value,
            "cause": job.cause.value,
            "seq": len(job.events) + 1,
            "stage": name,
            "model": job.target,
            "progress": round(job.progress, 3),
            "ts": iso_timestamp(time.time()),
            "message": message,
            **fields,
        }


def on_devices(devices: Sequence[int], device_count: int) -> str:
    """ " on GPU 1" or " on GPUs 0, 1" on a host of several; nothing on a one-GPU host."""
    if device_count <= 1:
        return ""
    return f" on GPU{'s' if len(devices) > 1 else ''} {', '.join(map(str, devices))}"


def insufficient_memory(spec: ModelSpec, plan: planner.Plan, device_count: int) -> SwitchError:
    """The 409 of a model that cannot fit; on a host of several GPUs it names the one
    that lacks memory."""
    required = round(plan.required_gb, 2)
    fields: dict[str, Any] = {
        "required_gb": required,
        "available_gb": plan.available_gb,
        "freed_gb": 0.0,
        "total_available_gb": plan.total_available_gb,
    }
    short = ""
    if plan.short_device is not None and device_count > 1:
        device = plan.short_device
        fields["device"] = device
        free = plan.available_by_device[device] + plan.freeable_by_device[device]
        short = (
            f": GPU {device} would have only {free:.2f} GB of the "
            f"{plan.required_by_device[device]:.2f} GB it needs there"
        )
    return SwitchError(
        "insufficient_memory",
        409,
        f"{spec.name} needs {required:.2f} GB but only {plan.total_available_gb:.2f} GB "
        f"would be free after unloading every unpinned model{short}; nothing was unloaded",
        fields,
    )


def exit_summary(event: EngineExited) -> dict[str, Any]:
    return {"exit_code": event.exit_code, "reason": event.reason, "at": iso_timestamp(time.time())}
