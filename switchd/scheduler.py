"""The scheduler: demand, jobs, policy, and the one worker that owns model state.

One job acts on the GPU at a time, because the GPU is one shared resource. The
worker task is the only code that changes model states (Catalog.transition
asserts it): it runs explicit jobs (an operator's switch or unload, FIFO),
unloads idle models after their TTL, and turns the demand of waiting requests
into switches by the policy of switchd/policy.py. Runtime reports reach it as
messages (switchd.inbox), never as a second writer.

Callers ask for outcomes: `request_switch`, `request_unload`, and
`serving(model)`, which holds a request until its model serves and counts it
in flight. When a model becomes ready, its waiters are admitted (counted in
flight) by the worker before it can start another job, so no job can unload
the model under a request that waited for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from switchd import planner, planning, policy, standby, wire
from switchd.catalog import ENGINE, HOLDING, Catalog, ModelRecord
from switchd.config import ModelSpec, Settings
from switchd.demand import Demand, Waiter
from switchd.emitter import Emitter
from switchd.events import EventBus
from switchd.gpu import GpuLedger, GpuProbe, GpuSnapshot
from switchd.inbox import Inbox
from switchd.jobs import Cause, Job, JobKind, SwitchError
from switchd.loading import Loader
from switchd.runtime.base import EngineInfo, Runtime
from switchd.standby import EngineStandby
from switchd.states import ModelState, Stage
from switchd.stats import LearnedStats
from switchd.steps import Steps
from switchd.units import iso_timestamp

log = logging.getLogger(__name__)

JOB_HISTORY = 200
IDLE_CHECK_SECONDS = 5.0  # the longest the worker sleeps with nothing to wake it
LOAD_FAILURES = frozenset({"engine_failed", "health_timeout"})

WaitObserver = Callable[[str, float, str], None]  # model, seconds waited, outcome


def _ignore_wait(model: str, seconds: float, outcome: str) -> None:
    pass


@dataclass(frozen=True)
class UnderWay:
    """The job switchd runs now."""

    kind: JobKind
    target: str
    stage: Stage
    progress: float


@dataclass(frozen=True)
class Standing:
    """Where a request for `model` stands (Scheduler.standing): data, which
    switchd.progress words for the people waiting."""

    model: str
    state: ModelState
    under_way: UnderWay | None
    serving: tuple[str, ...]  # the models serving requests now
    # Nothing under way and it is not running: it would load at once, beside
    # what runs, without unloading anything.
    fits_beside: bool
    waiting: int  # requests waiting for it
    waited_seconds: float | None  # how long the first of them has waited
    queued: tuple[str, ...]  # operators' switches, in the queue's order
    line: tuple[str, ...]  # the models requests wait for, in the policy's order
    ready_seconds: float  # the estimate of its load, or of its wake if it sleeps


class Serving:
    """One request held on its model (`Scheduler.serving`). A class, not a generator
    context manager: it is on every proxied request's path (bench/proxy.py)."""

    __slots__ = ("_record", "_scheduler")

    def __init__(self, scheduler: Scheduler, record: ModelRecord) -> None:
        self._scheduler = scheduler
        self._record = record

    async def __aenter__(self) -> EngineInfo:
        return await self._scheduler._hold(self._record)

    async def __aexit__(self, *exc_info: object) -> None:
        self._scheduler._leave(self._record)


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        *,
        runtime: Runtime,
        gpu: GpuProbe,
        ledger: GpuLedger | None,
        bus: EventBus,
        stats: LearnedStats,
        http: httpx.AsyncClient,
        on_wait: WaitObserver = _ignore_wait,
    ) -> None:
        self.settings = settings
        self.catalog = Catalog(settings, stats, ledger, bus)
        self.records = self.catalog.records
        self.runtime = runtime
        self.gpu = gpu
        self.emitter = Emitter(bus)
        self.inbox = Inbox(self.catalog, self.emitter)
        engines = EngineStandby(http)
        self.loader = Loader(
            settings,
            self.catalog,
            runtime=runtime,
            gpu=gpu,
            inbox=self.inbox,
            emitter=self.emitter,
            stats=stats,
            http=http,
            standby=engines,
        )
        self.steps = Steps(
            settings,
            self.catalog,
            runtime=runtime,
            gpu=gpu,
            inbox=self.inbox,
            emitter=self.emitter,
            stats=stats,
            standby=engines,
            loader=self.loader,
        )
        self.demand = Demand()
        self._on_wait = on_wait
        self._queue: deque[Job] = deque()  # explicit jobs, FIFO
        self._running: Job | None = None
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._wake = asyncio.Event()
        self._adopted = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def waiting(self) -> int:
        """Proxied requests waiting for their model to serve."""
        return len(self.demand)

    # ---- life cycle -------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker; returns once it has adopted what the runtime already runs."""
        if any(spec.standby for spec in self.settings.models.values()):
            budget = await standby.host_ram_budget_gb(self.settings.standby_host_ram_gb)
            self.steps.host_ram_budget_gb = budget
            log.info("level-1 sleeps may hold up to %.2f GB of host RAM", budget)
        worker = asyncio.create_task(self._work(), name="switchd-worker")
        self.catalog.owner = worker
        self._tasks = [worker, asyncio.create_task(self._watch(), name="switchd-watcher")]
        for task in self._tasks:
            task.add_done_callback(_report_crash)
        adopted = asyncio.ensure_future(self._adopted.wait())
        await asyncio.wait({adopted, worker}, return_when=asyncio.FIRST_COMPLETED)
        adopted.cancel()
        if worker.done():
            worker.result()  # adoption failed: say why

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
        self._queue.clear()
        self.demand.fail_all(stopping)

    # ---- what callers ask for ---------------------------------------------------

    def resolve(self, name: str) -> ModelSpec | None:
        return self.settings.resolve(name)

    def known(self, name: str) -> ModelSpec:
        """The model called `name` (or aliased so); 404 SwitchError when unknown."""
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

    def request_switch(self, name: str, cause: Cause = Cause.EXPLICIT) -> Job:
        """The job that makes `name` run: the one already under way, or a new one.

        An operator's switch also clears the model's load-failure cooldown.
        """
        spec = self.known(name)
        record = self.records[spec.name]
        record.failures, record.cooldown_until = 0, 0.0
        return self._enqueue(JobKind.SWITCH, spec.name, cause)

    async def check_fits(self, name: str) -> None:
        """Raise the 409 a switch to `name` would end with if it could never fit,
        even after unloading every unpinned model; the switch checks again."""
        spec = self.known(name)
        if self.records[spec.name].state in (ModelState.RUNNING, ModelState.LOADING):
            return
        plan = self._plan(spec, await self.gpu.snapshot())
        if not plan.enough:
            raise planning.insufficient_memory(spec, plan)

    def request_unload(self, name: str, cause: Cause = Cause.EXPLICIT) -> Job:
        """A job unloading `name`, or every unpinned model for `all`."""
        target = "all" if name == "all" else self.known(name).name
        return self._enqueue(JobKind.UNLOAD, target, cause)

    def job(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def serves_now(self, spec: ModelSpec) -> bool:
        """Whether a request for it would be admitted at once, without waiting."""
        return _serves(self.records[spec.name])

    async def standing(self, model: str) -> Standing:
        """Where a request for `model` stands (a newcomer's too, not counted yet): the
        job under way, the demand, the line; switchd.progress words it for people."""
        record = self.records[model]
        fits = False
        if self._running is None and record.state is not ModelState.RUNNING:
            plan = self._plan(record.spec, await self.gpu.snapshot())
            fits = plan.enough and not plan.victims
        current = self._running
        oldest = self.demand.oldest(model)
        return Standing(
            model,
            record.state,
            None
            if current is None
            else UnderWay(current.kind, current.target, current.stage, current.progress),
            tuple(r.spec.name for r in self.records.values() if _serves(r)),
            fits,
            self.demand.waiting(model),
            time.monotonic() - oldest if oldest else None,
            tuple(job.target for job in self._queue),
            tuple(want.name for want in self._line()),
            self.catalog.estimated_ready_seconds(record),
        )

    def recent_jobs(self, limit: int) -> list[Job]:
        """The latest jobs, newest first (the running one and the queue included)."""
        return list(reversed(self._jobs.values()))[:limit]

    async def ensure(self, name: str) -> None:
        """Return once `name` serves (loading it on demand); raise SwitchError if it cannot."""
        async with self.serving(name):
            pass

    def serving(self, model: str | ModelSpec) -> Serving:
        """Hold `model` serving for one request (`async with`, giving its engine): wait
        for it as demand if it is not serving, then count the request in flight
        (drain, TTL, last_used) until the block ends."""
        spec = self.known(model) if isinstance(model, str) else model
        return Serving(self, self.records[spec.name])

    async def _hold(self, record: ModelRecord) -> EngineInfo:
        """In flight on `record` once it serves (Serving's way in)."""
        if _serves(record):
            assert record.engine is not None
            self._enter(record)
            return record.engine
        return await self._wait_for(record)

    async def _wait_for(self, record: ModelRecord) -> EngineInfo:
        spec = record.spec
        retry_after = max(1, math.ceil(self.catalog.estimated_ready_seconds(record)))
        if (remaining := record.cooldown_until - time.time()) > 0:
            raise self._cooling_down(record, remaining)
        if not self.settings.auto_switch:
            raise SwitchError(
                "model_not_loaded",
                503,
                f"{spec.name} is not loaded and auto_switch is off: switch to it first",
                retry_after_seconds=retry_after,
            )
        if len(self.demand) >= self.settings.max_waiting_requests:
            raise SwitchError(
                "too_many_waiting",
                503,
                f"{len(self.demand)} requests already wait for models to load; try again later",
                retry_after_seconds=retry_after,
            )
        now = time.monotonic()
        timeout = self.settings.request_timeout_seconds
        waiter = Waiter(spec.name, now, now + timeout)
        self.demand.add(waiter)
        self._wake.set()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.shield(waiter.future)
        except BaseException:  # the client went away
            self._withdraw(waiter, "gone")
            raise
        if not waiter.future.done():
            self._withdraw(waiter, "timeout")
            raise SwitchError(
                "load_timeout",
                503,
                f"{spec.name} was not ready within {timeout:g} s",
                retry_after_seconds=retry_after,
            )
        error = waiter.future.exception()
        self._on_wait(spec.name, time.monotonic() - now, "error" if error else "admitted")
        return waiter.future.result()

    def _withdraw(self, waiter: Waiter, outcome: str) -> None:
        """A waiter that stops waiting: out of the demand, and out of flight if the
        worker admitted it in the same instant."""
        self.demand.remove(waiter)
        self._on_wait(waiter.model, time.monotonic() - waiter.arrived, outcome)
        if waiter.admitted:
            self._leave(self.records[waiter.model])
        elif waiter.future.done():
            waiter.future.exception()  # retrieved: nobody else will
        else:
            waiter.future.cancel()

    def _cooling_down(self, record: ModelRecord, remaining: float) -> SwitchError:
        spec = record.spec
        until = iso_timestamp(record.cooldown_until)
        return SwitchError(
            "load_failed",
            503,
            f"{spec.name} failed to load {record.failures} time(s) in a row; not loading it "
            f"again before {until}: {record.error or 'see its status'}",
            {"model": spec.name, "failures": record.failures, "cooldown_until": until},
            retry_after_seconds=max(1, math.ceil(remaining)),
        )

    def _enter(self, record: ModelRecord) -> None:
        record.in_flight += 1
        record.idle.clear()
        record.last_used = time.time()

    def _leave(self, record: ModelRecord) -> None:
        record.in_flight -= 1
        record.last_used = time.time()
        record.last_active = time.monotonic()
        if record.in_flight == 0:
            record.idle.set()
            if self.demand or record.spec.ttl_seconds > 0:
                self._wake.set()  # others wait for it to go idle, or its TTL starts now

    def _enqueue(self, kind: JobKind, target: str, cause: Cause = Cause.EXPLICIT) -> Job:
        for job in [*([self._running] if self._running else []), *self._queue]:
            if job.kind is kind and job.target == target and job.finished is None:
                return job
        job = self._new_job(kind, target, cause)
        ahead = [j.target for j in ([self._running] if self._running else []) + list(self._queue)]
        if ahead:
            self.emitter.queued(job, ahead)
        self._queue.append(job)
        self._wake.set()
        return job

    def _new_job(self, kind: JobKind, target: str, cause: Cause) -> Job:
        job = Job(kind, target, cause)
        self._jobs[job.id] = job
        while len(self._jobs) > JOB_HISTORY:
            self._jobs.popitem(last=False)
        return job

    # ---- the worker -----------------------------------------------------------

    async def _watch(self) -> None:
        async for event in self.runtime.events():
            self.inbox.deliver(event)
            self._wake.set()

    async def _work(self) -> None:
        for model in await self.loader.adopt():
            self._queue.append(self._new_job(JobKind.SWITCH, model, Cause.DEMAND))
        self._adopted.set()
        while True:
            self._wake.clear()
            try:
                self.inbox.apply()
                self._admit()
                job, plan, next_check = await self._next_job()
            except Exception:
                # A bug in a decision must not stop the one task that owns the GPU.
                log.exception("the scheduler's decision failed; trying again")
                job, plan, next_check = None, None, 1.0
            if job is None:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a
                # cancellation that arrives as the event is set, and close() would hang.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(next_check):
                        await self._wake.wait()
                continue
            await self._run(job, plan)

    def _admit(self) -> None:
        """Every waiter of a serving model goes in flight on it, now."""
        for model in self.demand.models():
            record = self.records[model]
            if _serves(record):
                assert record.engine is not None
                for _ in range(self.demand.admit(model, record.engine)):
                    self._enter(record)

    async def _next_job(self) -> tuple[Job | None, planner.Plan | None, float]:
        """The next job, with its plan if decided here; else how long to sleep."""
        if self._queue:
            return self._queue.popleft(), None, 0.0
        now = time.time()
        next_check = IDLE_CHECK_SECONDS
        for record in self.records.values():
            ttl = record.spec.ttl_seconds
            asleep = record.state is ModelState.SLEEPING
            if ttl <= 0 or not (asleep or record.state is ModelState.RUNNING) or record.in_flight:
                continue
            if self.demand.waiting(record.spec.name):
                continue
            left = ttl - (now - max(record.last_used, record.ready_at, record.asleep_since))
            if left <= 0:
                return self._new_job(JobKind.UNLOAD, record.spec.name, Cause.TTL), None, 0.0
            next_check = min(next_check, left)
        if not self.demand:
            return None, None, next_check
        snapshot = await self.gpu.snapshot()
        self.inbox.apply()
        self._admit()
        job, plan, wait = self._decide(snapshot)
        return job, plan, min(next_check, wait)

    def _line(self) -> list[policy.Want]:
        """The models requests wait for, in the order the policy serves them."""
        return policy.order(
            policy.Want(model, oldest, self.records[model].spec.priority)
            for model in self.demand.models()
            if (oldest := self.demand.oldest(model)) is not None
        )

    def _decide(self, snapshot: GpuSnapshot) -> tuple[Job | None, planner.Plan | None, float]:
        """Which waiting model loads next, by the policy; else how long until one may."""
        now = time.monotonic()
        next_check = IDLE_CHECK_SECONDS
        may_unload = True  # only the longest-waiting model may make others room
        for want in self._line():
            spec = self.records[want.name].spec
            full = self._plan(spec, snapshot)
            if not full.enough:
                self.demand.fail(spec.name, planning.insufficient_memory(spec, full))
                continue
            if not full.victims:
                return self._new_job(JobKind.SWITCH, spec.name, Cause.DEMAND), full, 0.0
            if not may_unload:
                continue
            may_unload = False
            wanted = self.records[want.name]
            hold = policy.hold_seconds(
                self.settings.max_hold_seconds,
                self.catalog.estimated_ready_seconds(wanted),
                self.catalog.estimated_load_seconds(spec),
            )
            protected: set[str] = set()
            for candidate in self.catalog.candidates(spec, snapshot.indexes()):
                record = self.records[candidate.name]
                if candidate.pinned or record.state is ModelState.SLEEPING:
                    continue  # a sleeper serves no one: it may always make room
                holder = self._holder(record)
                yields = policy.yields_at(holder, want.oldest, hold)
                if yields > now:
                    protected.add(candidate.name)
                    next_check = min(next_check, yields - now)
            plan = self._plan(spec, snapshot, frozenset(protected))
            if plan.enough:
                return self._new_job(JobKind.SWITCH, spec.name, Cause.DEMAND), plan, 0.0
        return None, None, next_check

    def _plan(
        self, spec: ModelSpec, snapshot: GpuSnapshot, protected: frozenset[str] = frozenset()
    ) -> planner.Plan:
        return planning.plan(self.catalog, spec, snapshot, self.settings.eviction, protected)

    def _holder(self, record: ModelRecord) -> policy.Holder:
        spec = record.spec
        cost = record.ready_cost_seconds
        residency = max(
            self.settings.min_residency_seconds,
            cost if cost is not None else self.catalog.estimated_load_seconds(spec),
        )
        return policy.Holder(
            spec.name,
            record.resident_since,
            residency,
            record.in_flight,
            self.demand.waiting(spec.name),
            record.last_active,
        )

    async def _run(self, job: Job, plan: planner.Plan | None) -> None:
        self._running = job
        try:
            if job.kind is JobKind.SWITCH:
                result = await self._switch(job, plan)
            else:
                result = await self._unload(job)
            self.emitter.result(job, result)
            job.finish(result, None)
        except SwitchError as error:
            self._fail(job, error)
        except Exception as exc:
            log.exception("job %s failed unexpectedly", job.id)
            self._fail(job, SwitchError("internal_error", 500, f"switchd failed: {exc}"))
        finally:
            self._running = None
            self._settle(job)

    async def _switch(self, job: Job, plan: planner.Plan | None) -> dict[str, Any]:
        record = self.records[job.target]
        spec = record.spec
        self.inbox.apply()
        if record.state is ModelState.RUNNING:
            return {
                "status": "already_loaded",
                "model": spec.name,
                "job": job.id,
                "message": f"Model '{spec.name}' is already running",
            }
        if record.state is ModelState.LOADING:  # found loading at start-up
            await self.loader.load(job, record)
            return job.success_body(ready=True)
        if plan is None:
            plan = self._plan(spec, await self.gpu.snapshot())
        return await self.steps.switch(job, plan)

    async def _unload(self, job: Job) -> dict[str, Any]:
        if job.target == "all":
            chosen = [r for r in self.records.values() if r.state in ENGINE and not r.spec.pinned]
        else:
            record = self.records[job.target]
            asleep = record.state is ModelState.SLEEPING
            chosen = [record] if asleep or record.state is ModelState.RUNNING else []
        return await self.steps.unload_models(job, chosen)

    def _settle(self, job: Job) -> None:
        """After a job: learn from a failed load, and answer the target's waiters."""
        if job.kind is not JobKind.SWITCH:
            return
        record = self.records[job.target]
        error = job.error
        if error is None:
            record.failures, record.cooldown_until = 0, 0.0
            self._admit()  # before any other job can start: they go in flight now
            return
        if error.code in LOAD_FAILURES:
            record.failures += 1
            cooldown = min(
                self.settings.max_load_failure_cooldown_seconds,
                self.settings.load_failure_cooldown_seconds * 2 ** (record.failures - 1),
            )
            record.cooldown_until = time.time() + cooldown
            log.warning(
                "%s failed to load (%d in a row): cooling down %g s",
                job.target,
                record.failures,
                cooldown,
            )
            error = SwitchError(
                "load_failed",
                503,
                f"{job.target} failed to load: {error.message}",
                {**error.fields, "failures": record.failures},
                retry_after_seconds=max(1, math.ceil(cooldown)),
            )
        self.demand.fail(job.target, error)

    def _fail(self, job: Job, error: SwitchError) -> None:
        try:
            self.emitter.emit(job, wire.Error(error.code, error.fields), error.message)
        except Exception:
            log.exception("could not report the failure of job %s", job.id)
        finally:
            job.finish(None, error)  # waiters are released whatever happened above

    # ---- status ------------------------------------------------------------------

    async def gpu_snapshot(self) -> GpuSnapshot:
        return await self.gpu.snapshot()

    async def status(self, snapshot: GpuSnapshot | None = None) -> dict[str, Any]:
        if snapshot is None:
            snapshot = await self.gpu.snapshot()
        now = time.monotonic()
        models = self.catalog.models_json()
        for name, body in models.items():
            oldest = self.demand.oldest(name)
            body["waiting"] = self.demand.waiting(name)
            body["oldest_wait_seconds"] = round(now - oldest, 2) if oldest is not None else None
        current = self._running
        gpu = snapshot.as_json()
        every = snapshot.indexes()
        for device in gpu["devices"]:  # which models hold what on each device
            device["models"] = {
                name: round(held[device["index"]], 2)
                for name, record in self.records.items()
                if record.state in HOLDING
                and device["index"] in (held := self.catalog.held_by_device(record, every))
            }
        return {
            "models": models,
            "gpu": gpu,
            "waiting": len(self.demand),
            "switch": None
            if current is None
            else {
                "id": current.id,
                "kind": current.kind.value,
                "cause": current.cause.value,
                "target": current.target,
                "stage": current.stage.value,
                "progress": round(current.progress, 3),
                "queued": [job.target for job in self._queue],
            },
        }


def _serves(record: ModelRecord) -> bool:
    return record.state is ModelState.RUNNING and not record.draining and record.engine is not None


def _report_crash(task: asyncio.Task[None]) -> None:
    """These tasks run for switchd's whole life: one ending early is a bug, said loudly."""
    if not task.cancelled() and task.exception() is not None:
        log.critical("%s stopped: %r", task.get_name(), task.exception())
