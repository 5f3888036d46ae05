"""The switch state machine: the one owner of model states and switch jobs.

One job runs at a time, because the GPU is one shared resource: a worker task
takes jobs from a FIFO queue. A request for a target that already has a job
joins it. Callers ask for outcomes (`request_switch`, `ensure`, `serving`);
they never read a state and act on it themselves. Idle models are unloaded
after their TTL by the same worker, so that decision and a request racing it
are ordered by one owner.

Side effects go through the Runtime and GpuProbe protocols, so tests drive
this class with recording fakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from switchd import planner
from switchd.catalog import Catalog, ModelRecord
from switchd.config import ModelSpec, Settings
from switchd.events import EventBus
from switchd.gpu import GpuProbe, GpuSnapshot
from switchd.jobs import Job, JobKind, SwitchError
from switchd.runtime.base import EngineExited, EngineInfo, EngineOutput, Runtime, StartFailed
from switchd.states import JOB_TRANSITIONS, MODEL_TRANSITIONS, ModelState, Stage, check
from switchd.stats import LearnedStats
from switchd.units import gib, gib_to_bytes, iso_timestamp

log = logging.getLogger(__name__)

JOB_HISTORY = 200
RELEASED_FRACTION = 0.75  # of a victim's memory that must show as free again
MEMORY_POLL_SECONDS = 0.1
HEALTH_BACKOFF = (0.05, 0.25, 1.5)  # first delay, cap, factor: fast at first
LAST_LINES_IN_ERRORS = 20
TTL_CHECK_SECONDS = 0.5
HEALTH_REQUEST_SECONDS = 1.0  # short, so `loading` still ticks every second
MAX_LOG_EVENTS_PER_JOB = 500  # more lines still reach /v1/events, not the job's replay

# Share of the progress bar each phase owns: memory check 5%, unloads up to
# 30%, loading from 30% towards 99% by elapsed over estimated time.
PROGRESS_CHECKED = 0.05
PROGRESS_FREED = 0.30
PROGRESS_LOADING_CAP = 0.99


@dataclass
class _Loading:
    """A load in progress: which job reports it and whether the engine died."""

    job: Job
    instance: str | None = None
    early_lines: list[str] = field(default_factory=list)
    exited: EngineExited | None = None
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)


class Switcher:
    def __init__(
        self,
        settings: Settings,
        *,
        runtime: Runtime,
        gpu: GpuProbe,
        bus: EventBus,
        stats: LearnedStats,
        http: httpx.AsyncClient,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._runtime = runtime
        self._gpu = gpu
        self._bus = bus
        self._stats = stats
        self._http = http
        self._clock = clock
        self.catalog = Catalog(settings, stats)
        self.records = self.catalog.records
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._pending: list[Job] = []  # the running job first, then the queue, FIFO
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._loading: dict[str, _Loading] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.waiting = 0  # proxied requests waiting for their model to load

    # ---- life cycle -------------------------------------------------------

    async def start(self) -> None:
        """Adopt what the runtime already runs, then start the worker and watcher."""
        found = await self._runtime.discover()
        still_loading: list[str] = []
        for info in found.running:
            record = self.records.get(info.model)
            if record is None or record.state is not ModelState.EXITED:
                continue
            record.engine = info
            if await self._healthy(info.url + record.spec.health_path):
                self._set_state(record, ModelState.RUNNING)
                log.info("adopted running engine of %s (%s)", info.model, info.instance)
            else:
                # Started before a crash and not answering yet: a job waits for it, and
                # requests wait for that job, as for any load.
                self._set_state(record, ModelState.LOADING)
                still_loading.append(info.model)
                log.info("adopted %s (%s), still loading", info.model, info.instance)
        for model, why in found.unavailable.items():
            record = self.records.get(model)
            if record is not None and record.state is ModelState.EXITED:
                self._set_state(record, ModelState.FAILED, error=why)
                log.error("%s cannot run: %s", model, why)
        self._tasks = [
            asyncio.create_task(self._work(), name="switchd-worker"),
            asyncio.create_task(self._watch(), name="switchd-watcher"),
        ]
        if any(spec.ttl_seconds > 0 for spec in self.settings.models.values()):
            self._tasks.append(asyncio.create_task(self._expire_idle(), name="switchd-ttl"))
        for task in self._tasks:
            task.add_done_callback(_report_crash)
        for model in still_loading:
            self._enqueue(JobKind.SWITCH, model)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        stopping = SwitchError("shutting_down", 503, "switchd is shutting down")
        for job in self._jobs.values():
            if job.finished is None:  # the cancelled running job and the queue behind it
                self._fail(job, stopping)
        self._pending.clear()

    # ---- what callers ask for ----------------------------------------------

    def resolve(self, name: str) -> ModelSpec | None:
        return self.settings.resolve(name)

    def request_switch(self, name: str) -> Job:
        """The job that makes `name` run: the one already under way, or a new one."""
        spec = self._known(name)
        return self._enqueue(JobKind.SWITCH, spec.name)

    def request_unload(self, name: str) -> Job:
        """A job unloading `name`, or every unpinned model for `all`."""
        target = "all" if name == "all" else self._known(name).name
        return self._enqueue(JobKind.UNLOAD, target)

    async def ensure(self, name: str) -> None:
        """Return once `name` runs; raise SwitchError when it cannot."""
        spec = self._known(name)
        if self.records[spec.name].state is ModelState.RUNNING:
            return
        job = self.request_switch(spec.name)
        await job.done.wait()
        if job.error is not None:
            raise dataclasses.replace(job.error)  # a copy: each waiter its own traceback

    @contextlib.asynccontextmanager
    async def serving(self, name: str) -> AsyncIterator[EngineInfo]:
        """Hold `name` running for one request: load it first if needed (auto_switch),
        then count the request in flight, for drain, TTL and last_used."""
        spec = self._known(name)
        record = self.records[spec.name]
        deadline = self._clock() + self.settings.request_timeout_seconds
        while not (record.state is ModelState.RUNNING and not record.draining and record.engine):
            await self._wait_for_load(record, deadline)
        engine = record.engine
        record.in_flight += 1
        record.idle.clear()
        record.last_used = time.time()
        try:
            yield engine
        finally:
            record.in_flight -= 1
            record.last_used = time.time()
            if record.in_flight == 0:
                record.idle.set()

    async def _wait_for_load(self, record: ModelRecord, deadline: float) -> None:
        spec = record.spec
        retry_after = max(1, math.ceil(self.catalog.estimated_load_seconds(spec)))
        if not self.settings.auto_switch:
            raise SwitchError(
                "model_not_loaded",
                503,
                f"{spec.name} is not loaded and auto_switch is off: switch to it first",
                retry_after_seconds=retry_after,
            )
        if self.waiting >= self.settings.max_waiting_requests:
            raise SwitchError(
                "too_many_waiting",
                503,
                f"{self.waiting} requests already wait for models to load; try again later",
                retry_after_seconds=retry_after,
            )
        job = self.request_switch(spec.name)
        self.waiting += 1
        try:
            await asyncio.wait_for(job.done.wait(), max(0.0, deadline - self._clock()))
        except TimeoutError:
            raise SwitchError(
                "load_timeout",
                503,
                f"{spec.name} was not ready within {self.settings.request_timeout_seconds:g} s",
                retry_after_seconds=retry_after,
            ) from None
        finally:
            self.waiting -= 1
        if job.error is not None:
            raise dataclasses.replace(job.error)

    def job(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def _known(self, name: str) -> ModelSpec:
        spec = self.settings.resolve(name)
        if spec is None:
            known = sorted(self.settings.models)
            raise SwitchError(
                "model_not_found",
                404,
                f"Unknown model {name!r}; known models: {', '.join(known)}",
                {"available_models": known},
            )
        return spec

    def _enqueue(self, kind: JobKind, target: str, idle_for: float | None = None) -> Job:
        for job in self._pending:
            if job.kind is kind and job.target == target and job.finished is None:
                if idle_for is None:
                    job.idle_for = None  # an explicit unload joining a TTL one: unconditional
                return job
        job = Job(kind, target, idle_for)
        self._jobs[job.id] = job
        while len(self._jobs) > JOB_HISTORY:
            self._jobs.popitem(last=False)
        if self._pending:
            running = self._pending[0]
            self._emit(
                job,
                Stage.QUEUED,
                f"Waiting for the switch to {running.target} to finish",
                position=len(self._pending),
                behind=running.target,
            )
        self._pending.append(job)
        self._queue.put_nowait(job)
        return job

    # ---- the worker ---------------------------------------------------------

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                if job.kind is JobKind.SWITCH:
                    result = await self._switch(job)
                else:
                    result = await self._unload_job(job)
                fields = dict(result)
                message = str(fields.pop("message", None) or _result_message(result))
                self._emit(job, Stage.DONE, message, event="result", progress=1.0, **fields)
                job.finish(result, None)
            except SwitchError as error:
                self._fail(job, error)
            except Exception as exc:
                log.exception("job %s failed unexpectedly", job.id)
                self._fail(job, SwitchError("internal_error", 500, f"switchd failed: {exc}"))
            finally:
                self._pending.remove(job)

    def _fail(self, job: Job, error: SwitchError) -> None:
        fields = {"error": error.code, **error.fields}
        try:
            self._emit(job, Stage.FAILED, error.message, event="error", **fields)
        except Exception:
            log.exception("could not report the failure of job %s", job.id)
        finally:
            job.finish(None, error)  # waiters are released whatever happened above

    async def _switch(self, job: Job) -> dict[str, Any]:
        record = self.records[job.target]
        spec = record.spec
        if record.state is ModelState.LOADING and record.engine is not None:
            await self._finish_adopted_load(job, record)
            return job.success_body(ready=True)
        if record.state is ModelState.RUNNING:
            return {
                "status": "already_loaded",
                "model": spec.name,
                "job": job.id,
                "message": f"Model '{spec.name}' is already running",
            }
        learned = self._stats.get(spec.name)
        required = learned.footprint_gb or spec.size_gb
        snapshot = await self._gpu.snapshot()
        available = self.catalog.available_gb(snapshot, spec)
        choice = planner.plan(
            required,
            available,
            gib(snapshot.total_bytes(spec.gpus)),
            self.catalog.candidates(spec),
            self.settings.eviction,
        )
        victims = [v.name for v in choice.victims]
        enough = choice.enough
        if victims:
            verdict = f"unloading {', '.join(victims)}"
        else:
            verdict = "it fits" if enough else "not enough even after unloading every model"
        self._emit(
            job,
            Stage.MEMORY_CHECK,
            f"{spec.name} needs {required:.2f} GB, {available:.2f} GB free: {verdict}",
            progress=PROGRESS_CHECKED,
            required_gb=round(required, 2),
            available_gb=available,
            total_gb=choice.total_gb,
            to_unload=victims,
            enough=enough,
        )
        job.memory_info = {"required_gb": round(required, 2), "available_before_gb": available}
        if not enough:
            raise SwitchError(
                "insufficient_memory",
                409,
                f"{spec.name} needs {required:.2f} GB but only {choice.total_available_gb:.2f} GB "
                "would be free after unloading every unpinned model; nothing was unloaded",
                {
                    "required_gb": round(required, 2),
                    "available_gb": available,
                    "freed_gb": 0.0,
                    "total_available_gb": choice.total_available_gb,
                },
            )
        freed = await self._unload_all(
            job, [(self.records[v.name], v.held_gb) for v in choice.victims]
        )
        job.memory_info["freed_gb"] = round(freed, 2)
        if victims:
            after = self.catalog.available_gb(await self._gpu.snapshot(), spec)
            self._emit(
                job,
                Stage.FREED,
                f"Freed {freed:.2f} GB; {after:.2f} GB now free",
                progress=PROGRESS_FREED,
                freed_gb=round(freed, 2),
                available_gb=after,
            )
        await self._load(job, record)
        return job.success_body(ready=True)

    async def _unload_job(self, job: Job) -> dict[str, Any]:
        if job.idle_for is not None:
            record = self.records[job.target]
            if not self._idle_for(record, job.idle_for):
                return {
                    "status": "kept",
                    "job": job.id,
                    "unloaded_models": [],
                    "freed_gb": 0.0,
                    "message": f"{job.target} was used again: not unloaded",
                }
        if job.target == "all":
            chosen = [
                r
                for r in self.records.values()
                if r.state in (ModelState.RUNNING, ModelState.LOADING) and not r.spec.pinned
            ]
        else:
            record = self.records[job.target]
            chosen = [record] if record.state is ModelState.RUNNING else []
        if not chosen:
            return {
                "status": "not_loaded",
                "job": job.id,
                "unloaded_models": [],
                "freed_gb": 0.0,
                "message": f"Nothing to unload: {job.target} is not running",
            }
        freed = await self._unload_all(job, [(r, self.catalog.held_gb(r)) for r in chosen])
        available = gib((await self._gpu.snapshot()).free_bytes())
        self._emit(
            job,
            Stage.FREED,
            f"Freed {freed:.2f} GB; {available:.2f} GB now free",
            progress=1.0,
            freed_gb=round(freed, 2),
            available_gb=available,
        )
        return {
            "status": "success",
            "job": job.id,
            "unloaded_models": list(job.unloaded_models),
            "freed_gb": round(freed, 2),
        }

    # ---- stages --------------------------------------------------------------

    async def _unload_all(self, job: Job, victims: list[tuple[ModelRecord, float]]) -> float:
        """Unload each victim in order; returns the GB measured as freed in all."""
        # Every victim stops taking requests now, before the first await, so no
        # request can start on a model this job is about to stop.
        for record, _ in victims:
            record.draining = True
        try:
            freed = 0.0
            for index, (record, held_gb) in enumerate(victims):
                freed += await self._unload(job, record, held_gb, (index + 1) / len(victims))
            return freed
        finally:
            for record, _ in victims:
                record.draining = False

    async def _unload(self, job: Job, record: ModelRecord, held_gb: float, share: float) -> float:
        """Drain, stop and verify one model; returns the GB measured as freed."""
        spec = record.spec
        if record.in_flight:
            self._emit(
                job,
                Stage.DRAIN,
                f"Waiting for {record.in_flight} request(s) on {spec.name} to finish",
                victim=spec.name,
                in_flight=record.in_flight,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(record.idle.wait(), self.settings.drain_timeout_seconds)
        self._emit(
            job,
            Stage.UNLOAD,
            f"Unloading {spec.name}",
            victim=spec.name,
            expected_gb=round(held_gb, 2),
        )
        if record.state not in (ModelState.RUNNING, ModelState.LOADING):
            return await self._already_gone(job, record, share)
        started = self._clock()
        before = (await self._gpu.snapshot()).free_bytes(spec.gpus)
        self._set_state(record, ModelState.STOPPING)
        try:
            await self._runtime.stop(spec, self.settings.stop_grace_seconds)
        except Exception as exc:
            self._set_state(record, ModelState.FAILED, error=f"could not be stopped: {exc}")
            raise SwitchError(
                "unload_failed", 502, f"Could not stop {spec.name}: {exc}", {"victim": spec.name}
            ) from exc
        record.engine = None
        self._set_state(record, ModelState.EXITED)
        freed_bytes, verified = await self._await_release(before, spec, held_gb)
        freed = gib(freed_bytes)
        seconds = round(self._clock() - started, 2)
        job.unloaded_models.append(spec.name)
        progress = self._unload_progress(job, share)
        message = f"{spec.name} unloaded: {freed:.2f} GB freed in {seconds:.2f} s"
        if not verified:
            message += (
                f" (expected about {held_gb:.2f} GB; the memory had not come back after "
                f"{self.settings.memory_release_timeout_seconds:g} s)"
            )
            log.warning("%s", message)
        self._emit(
            job,
            Stage.UNLOADED,
            message,
            progress=progress,
            victim=spec.name,
            freed_gb=freed,
            seconds=seconds,
            verified=verified,
        )
        return freed

    async def _already_gone(self, job: Job, record: ModelRecord, share: float) -> float:
        """A victim whose engine exited on its own while this job waited its turn."""
        spec = record.spec
        with contextlib.suppress(Exception):  # make sure: nothing of it may keep running
            await self._runtime.stop(spec, self.settings.stop_grace_seconds)
        job.unloaded_models.append(spec.name)
        self._emit(
            job,
            Stage.UNLOADED,
            f"{spec.name} had already exited ({record.state.value}); its memory was "
            "released before this switch could measure it",
            progress=self._unload_progress(job, share),
            victim=spec.name,
            freed_gb=0.0,
            seconds=0.0,
            verified=False,
        )
        return 0.0

    def _unload_progress(self, job: Job, share: float) -> float:
        if job.kind is JobKind.UNLOAD:
            return share * 0.99
        return PROGRESS_CHECKED + (PROGRESS_FREED - PROGRESS_CHECKED) * share

    async def _await_release(
        self, free_before: int, spec: ModelSpec, held_gb: float
    ) -> tuple[int, bool]:
        """Poll free memory until most of what the victim held came back."""
        wanted = RELEASED_FRACTION * gib_to_bytes(held_gb)
        deadline = self._clock() + self.settings.memory_release_timeout_seconds
        while True:
            freed = (await self._gpu.snapshot()).free_bytes(spec.gpus) - free_before
            if freed >= wanted:
                return freed, True
            if self._clock() >= deadline:
                return max(0, freed), False
            await asyncio.sleep(MEMORY_POLL_SECONDS)

    async def _load(self, job: Job, record: ModelRecord) -> None:
        spec = record.spec
        estimate = self.catalog.estimated_load_seconds(spec)
        job.estimated_load_time_seconds = estimate
        free_before = (await self._gpu.snapshot()).free_bytes(spec.gpus)
        loading = _Loading(job)
        self._loading[spec.name] = loading
        try:
            self._set_state(record, ModelState.LOADING)
            started = self._clock()
            try:
                info = await self._runtime.start(spec)
            except Exception as exc:
                reason = str(exc) if isinstance(exc, StartFailed) else f"could not start: {exc!r}"
                self._set_state(record, ModelState.FAILED, error=reason)
                raise SwitchError(
                    "engine_failed", 502, f"{spec.name}: {reason}", {"model": spec.name}
                ) from exc
            record.engine = info
            loading.instance = info.instance
            where = {"container": info.container} if info.container else {"pid": info.pid}
            self._emit(
                job,
                Stage.START,
                f"Started {spec.name}; loading takes about {estimate:g} s",
                progress=PROGRESS_FREED,
                estimated_load_time_seconds=estimate,
                **where,
            )
            job.started.set()
            for line in loading.early_lines:
                self._emit_log(job, spec.name, line)
            loading.early_lines.clear()
            await self._wait_healthy(job, record, loading, started, estimate)
        finally:
            del self._loading[spec.name]
        load_seconds = round(self._clock() - started, 2)
        footprint = gib(free_before - (await self._gpu.snapshot()).free_bytes(spec.gpus))
        record.measured_gb = footprint if footprint > 0 else None
        self._set_state(record, ModelState.RUNNING)
        await self._stats.record(spec.name, load_seconds, record.measured_gb)
        self._emit(
            job,
            Stage.READY,
            f"{spec.name} is ready after {load_seconds:.1f} s",
            progress=1.0,
            load_seconds=load_seconds,
            gpu_memory_used_gb=record.measured_gb,
        )

    async def _finish_adopted_load(self, job: Job, record: ModelRecord) -> None:
        """Wait for an engine found loading at start-up; it was started before."""
        spec = record.spec
        assert record.engine is not None
        estimate = self.catalog.estimated_load_seconds(spec)
        job.estimated_load_time_seconds = estimate
        loading = _Loading(job, instance=record.engine.instance)
        self._loading[spec.name] = loading
        where = {"container": record.engine.container} if record.engine.container else {}
        try:
            self._emit(
                job,
                Stage.START,
                f"Found {spec.name} still loading after a restart; waiting for it",
                progress=PROGRESS_FREED,
                estimated_load_time_seconds=estimate,
                adopted=True,
                **where,
            )
            job.started.set()
            started = self._clock() - max(0.0, time.time() - record.engine.started_at)
            await self._wait_healthy(job, record, loading, started, estimate)
        finally:
            del self._loading[spec.name]
        self._set_state(record, ModelState.RUNNING)
        self._emit(
            job,
            Stage.READY,
            f"{spec.name} is ready",
            progress=1.0,
            load_seconds=round(time.time() - record.engine.started_at, 2),
            gpu_memory_used_gb=None,
        )

    async def _wait_healthy(
        self,
        job: Job,
        record: ModelRecord,
        loading: _Loading,
        started: float,
        estimate: float,
    ) -> None:
        """Poll the health path with backoff, reporting progress every second."""
        spec = record.spec
        assert record.engine is not None
        url = record.engine.url + spec.health_path
        delay, cap, factor = HEALTH_BACKOFF
        next_report = started
        while True:
            if loading.exited is not None:
                await self._engine_died(record, loading.exited)
            if await self._healthy(url):
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
                    {"model": spec.name, "last_lines": self._last_lines(spec.name)},
                )
            if now >= next_report:
                fraction = min(1.0, elapsed / estimate) if estimate > 0 else 1.0
                self._emit(
                    job,
                    Stage.LOADING,
                    f"Loading {spec.name}: {elapsed:.0f} s of ~{estimate:g} s",
                    progress=PROGRESS_FREED + (PROGRESS_LOADING_CAP - PROGRESS_FREED) * fraction,
                    elapsed_seconds=round(elapsed, 2),
                    estimated_load_time_seconds=estimate,
                )
                next_report += 1.0
            wait = max(0.0, min(delay, next_report - self._clock()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(loading.wakeup.wait(), wait)
            delay = min(cap, delay * factor)

    async def _healthy(self, url: str) -> bool:
        try:
            response = await self._http.get(url, timeout=HEALTH_REQUEST_SECONDS)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _engine_died(self, record: ModelRecord, exited: EngineExited) -> None:
        spec = record.spec
        lines = list(exited.last_lines[-LAST_LINES_IN_ERRORS:])
        record.last_exit = _exit_summary(exited)
        summary = f"{spec.name} {exited.reason} while loading"
        detail = "\n".join(lines[-5:])
        record.engine = None
        error = f"{summary}:\n{detail}" if lines else summary
        self._set_state(record, ModelState.FAILED, error=error)
        raise SwitchError(
            "engine_failed",
            502,
            f"{summary}: {lines[-1]}" if lines else summary,
            {"model": spec.name, "exit_code": exited.exit_code, "last_lines": lines},
        )

    async def _abandon(self, record: ModelRecord) -> None:
        """Stop an engine that will not become healthy; it is then `failed`."""
        with contextlib.suppress(Exception):
            await self._runtime.stop(record.spec, self.settings.stop_grace_seconds)
        record.engine = None
        self._set_state(record, ModelState.FAILED, error="did not become healthy in time")

    # ---- idle models -----------------------------------------------------------

    async def _expire_idle(self) -> None:
        """Queue a TTL unload for each model idle past its ttl_seconds.

        The unload job checks again when it runs: a request that came in the
        meantime keeps the model (`kept`), one that comes after waits for a
        clean reload.
        """
        while True:
            await asyncio.sleep(TTL_CHECK_SECONDS)
            for record in self.records.values():
                ttl = record.spec.ttl_seconds
                if ttl > 0 and record.state is ModelState.RUNNING and self._idle_for(record, ttl):
                    self._enqueue(JobKind.UNLOAD, record.spec.name, idle_for=ttl)

    @staticmethod
    def _idle_for(record: ModelRecord, seconds: float) -> bool:
        if record.in_flight or record.state is not ModelState.RUNNING:
            return False
        return time.time() - max(record.last_used, record.ready_at) >= seconds

    # ---- what the runtime reports ------------------------------------------

    async def _watch(self) -> None:
        async for event in self._runtime.events():
            if isinstance(event, EngineOutput):
                self._on_output(event)
            else:
                self._on_exit(event)

    def _on_output(self, event: EngineOutput) -> None:
        loading = self._loading.get(event.model)
        if loading is None:
            return
        if loading.instance is None:
            loading.early_lines.append(event.line)  # before `start` was announced
        elif loading.instance == event.instance:
            self._emit_log(loading.job, event.model, event.line)

    def _on_exit(self, event: EngineExited) -> None:
        loading = self._loading.get(event.model)
        if loading is not None and loading.instance == event.instance:
            loading.exited = event
            loading.wakeup.set()
            return
        record = self.records.get(event.model)
        if record is None or record.engine is None or record.engine.instance != event.instance:
            return  # an engine switchd already stopped, or an earlier run
        if record.state is ModelState.RUNNING:
            record.engine = None
            record.last_exit = _exit_summary(event)
            lines = "\n".join(event.last_lines[-5:])
            error = f"{event.reason} outside switchd" + (f":\n{lines}" if lines else "")
            failed = event.exit_code not in (0, None)
            self._set_state(record, ModelState.FAILED if failed else ModelState.EXITED, error=error)

    # ---- state and events ------------------------------------------------------

    def _set_state(self, record: ModelRecord, new: ModelState, error: str | None = None) -> None:
        old = record.state
        check(MODEL_TRANSITIONS, old, new)
        record.state = new
        record.error = error
        if new is ModelState.RUNNING:
            record.ready_at = time.time()
        if new is ModelState.LOADING:
            record.last_exit = None
        spec = record.spec
        if new in (ModelState.LOADING, ModelState.RUNNING) and old not in (
            ModelState.LOADING,
            ModelState.RUNNING,
        ):
            expected = self.catalog.expected_gb(spec)
            self._gpu.engine_started(spec.name, gib_to_bytes(expected), spec.gpus)
        if new in (ModelState.EXITED, ModelState.FAILED) and old in (
            ModelState.LOADING,
            ModelState.RUNNING,
            ModelState.STOPPING,
        ):
            self._gpu.engine_stopped(spec.name)
            record.measured_gb = None
        data: dict[str, Any] = {"model": spec.name, "from": old.value, "to": new.value}
        if error:
            data["error"] = error
        self._bus.publish("model_state", data)

    def _emit(
        self,
        job: Job,
        stage: Stage,
        message: str,
        /,
        *,
        event: str | None = None,
        progress: float | None = None,
        **fields: Any,
    ) -> None:
        if stage is not Stage.QUEUED:
            check(JOB_TRANSITIONS, job.stage, stage)
        job.stage = stage
        if progress is not None:
            job.progress = max(job.progress, min(1.0, progress))
        self._publish(job, event or stage.value, message, fields)

    def _emit_log(self, job: Job, model: str, line: str) -> None:
        fields = {"line": line, "source": model}
        if job.log_lines >= MAX_LOG_EVENTS_PER_JOB:
            self._bus.publish("log", self._payload(job, "log", line, fields))
            return
        job.log_lines += 1
        self._publish(job, "log", line, fields)

    def _publish(self, job: Job, name: str, message: str, fields: dict[str, Any]) -> None:
        job.record(self._bus.publish(name, self._payload(job, name, message, fields)))

    @staticmethod
    def _payload(job: Job, name: str, message: str, fields: dict[str, Any]) -> dict[str, Any]:
        return {
            "job": job.id,
            "kind": job.kind.value,
            "seq": len(job.events) + 1,
            "stage": name,
            "model": job.target,
            "progress": round(job.progress, 3),
            "ts": iso_timestamp(time.time()),
            "message": message,
            **fields,
        }

    def _last_lines(self, model: str) -> list[str]:
        return list(self._runtime.last_lines(model)[-LAST_LINES_IN_ERRORS:])

    async def gpu_snapshot(self) -> GpuSnapshot:
        return await self._gpu.snapshot()

    async def status(self, snapshot: GpuSnapshot | None = None) -> dict[str, Any]:
        if snapshot is None:
            snapshot = await self._gpu.snapshot()
        current = self._pending[0] if self._pending else None
        return {
            "models": self.catalog.models_json(),
            "gpu": snapshot.as_json(),
            "switch": None
            if current is None
            else {
                "id": current.id,
                "kind": current.kind.value,
                "target": current.target,
                "stage": current.stage.value,
                "progress": round(current.progress, 3),
                "queued": [job.target for job in self._pending[1:]],
            },
        }


def _report_crash(task: asyncio.Task[None]) -> None:
    """These tasks run for switchd's whole life: one ending early is a bug, said loudly."""
    if not task.cancelled() and task.exception() is not None:
        log.critical("%s stopped: %r", task.get_name(), task.exception())


def _exit_summary(event: EngineExited) -> dict[str, Any]:
    return {"exit_code": event.exit_code, "reason": event.reason, "at": iso_timestamp(time.time())}


def _result_message(result: dict[str, Any]) -> str:
    if result.get("unloaded_models") is not None and "model" not in result:
        return f"Unloaded {', '.join(result['unloaded_models'])}"
    return f"Model '{result.get('model')}' is ready"
