"""The scheduler: demand, jobs, policy, and the worker that decides which job runs.

One job makes room on the GPU at a time, because freeing memory and verifying
that it came back is one shared measurement. The worker decides: it runs
explicit jobs (an operator's switch or unload, FIFO), unloads idle models after
their TTL, and turns the demand of waiting requests into switches by the policy
of switchd/policy.py. A model that is wanted and fits beside everything (the
running job's target and what its victims will free counted: planning.beside)
loads at once, in a job of its own beside the running one: nothing that needs
no room waits for a switch, nor for an engine call that hangs in it.

The worker and the jobs it starts are the only code that changes model states
(Catalog.transition asserts it); each job acts on its own models only, and a
model loading beside is reserved, so no other job may take its memory or unload
it. Runtime reports reach them as messages (switchd.inbox), never as another
writer.

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

from switchd import errors, planner, planning, policy, standby, wire
from switchd.catalog import ACTIVE, ENGINE, HOLDING, Catalog, ModelRecord
from switchd.changes import ConfigChanges
from switchd.config import ModelSpec, Settings
from switchd.demand import Demand, Waiter
from switchd.emitter import Emitter
from switchd.events import EventBus
from switchd.gpu import GpuLedger, GpuProbe, GpuSnapshot
from switchd.inbox import Inbox
from switchd.jobs import Cause, Job, JobKind, SwitchError
from switchd.loading import Loader
from switchd.reload import Diff
from switchd.runtime.base import EngineInfo, Runtime
from switchd.standby import EngineStandby
from switchd.states import ModelState, Stage
from switchd.stats import LearnedStats
from switchd.steps import Steps
from switchd.units import iso_timestamp

log = logging.getLogger(__name__)

JOB_HISTORY = 200
IDLE_CHECK_SECONDS = 5.0  # the longest the worker sleeps with nothing to wake it
SHUTDOWN_RETRY_SECONDS = 5  # a restarted switchd answers again within seconds
MEMORY_WAIT_SECONDS = 0.1  # how often demand waiting for memory coming back looks again
# How often demand that does not fit beside a running job looks again: its victims'
# memory comes back inside the job, which tells the worker nothing.
BESIDE_CHECK_SECONDS = 0.25
LOAD_FAILURES = frozenset({"engine_failed", "health_timeout"})
PUT_AWAY = frozenset({Stage.UNLOADED.value, Stage.SLEPT.value})  # `seconds`: a stop or sleep

WaitObserver = Callable[[str, float, str], None]  # model, seconds waited, outcome


def _ignore_wait(model: str, seconds: float, outcome: str) -> None:
    pass


def shutting_down() -> SwitchError:
    """What a request still waiting, or a job not finished, hears when switchd stops."""
    return SwitchError(
        "shutting_down",
        503,
        "switchd is shutting down",
        retry_after_seconds=SHUTDOWN_RETRY_SECONDS,
    )


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
    # Not loaded and no job acts on it: it would load at once, beside what runs
    # and the job under way, without unloading anything (planning.beside).
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
        self.inbox.owner_of = self._reports_owner
        engines = EngineStandby(http, settings.engine_call_timeout_seconds)
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
        self._running: Job | None = None  # the job that may make room
        self._beside: dict[str, Job] = {}  # loads that need no room, by model, beside it
        self._job_tasks: dict[str, asyncio.Task[None]] = {}  # by job id
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._wake = asyncio.Event()
        # When the model first in line may take the GPU, from the last decision.
        self._turn_at: dict[str, float] = {}
        self._adopted = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # Config reloads, applied by the worker with no job running.
        self.changes = ConfigChanges(self.catalog, self.demand, self)
        self._stopping = False  # the server stops: no request waits from now on

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
        self.catalog.check_learned(await self.gpu.snapshot())  # a damaged learned.json
        worker = asyncio.create_task(self._work(), name="switchd-worker")
        self.catalog.writers.add(worker)
        self._tasks = [worker, asyncio.create_task(self._watch(), name="switchd-watcher")]
        for task in self._tasks:
            task.add_done_callback(_report_crash)
        adopted = asyncio.ensure_future(self._adopted.wait())
        await asyncio.wait({adopted, worker}, return_when=asyncio.FIRST_COMPLETED)
        adopted.cancel()
        if worker.done():
            worker.result()  # adoption failed: say why

    def stop(self) -> None:
        """switchd begins to stop: the worker is cancelled and every job not done ends
        now with `shutting_down`, while the streams that follow it are still open."""
        self._stopping = True  # and no request waits from now on
        for task in [*self._tasks, *self._job_tasks.values()]:
            task.cancel()
        self._end_jobs()

    async def close(self) -> None:
        tasks = [*self._tasks, *self._job_tasks.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._end_jobs()

    def _end_jobs(self) -> None:
        stopping = shutting_down()
        for job in self._jobs.values():
            if job.finished is None:  # the cancelled running job and the queue behind it
                self._fail(job, stopping)
        self._queue.clear()
        self.demand.fail_all(stopping)
        self.changes.cancel_pending()

    def stop_waiting(self) -> None:
        """The server stops (SIGTERM): every request waiting for a load is answered now
        (503 shutting_down, Retry-After), and none waits from now on. The server waits
        for open requests before the lifespan ends: without this they would be cut."""
        self._stopping = True
        self.demand.fail_all(shutting_down())

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
                f"Unknown model {errors.echoed(name)!r}; known models: {', '.join(known)}",
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
        refused = planning.refusal(
            self.catalog, spec, await self.gpu.snapshot(), self.settings.eviction
        )
        if refused is not None:
            raise refused

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
        if self._may_load_beside(record):
            snapshot = await self.gpu.snapshot()
            fits = self._beside_plan(record.spec, snapshot).enough
        current = self._beside.get(model) or self._running  # its own load, if beside
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

    def load_requested(self, model: str) -> bool:
        """Whether a switch to `model` is under way or queued: asked for, even if its
        engine is not started yet (llama.cpp's router says `loading` from the ask on)."""
        jobs = [*([self._running] if self._running else []), *self._beside.values(), *self._queue]
        return any(j.kind is JobKind.SWITCH and j.target == model for j in jobs)

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
        if self._stopping:
            raise shutting_down()
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
        self.demand.remove(waiter, time.monotonic())
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
            if self.demand or record.spec.ttl_seconds > 0 or self.changes.restarts_waiting:
                # Others wait for it to go idle, its TTL starts now, or a restart waits.
                self._wake.set()

    def _enqueue(self, kind: JobKind, target: str, cause: Cause = Cause.EXPLICIT) -> Job:
        running = [*([self._running] if self._running else []), *self._beside.values()]
        for job in [*running, *self._queue]:
            if job.kind is kind and job.target == target and job.finished is None:
                return job
        job = self._new_job(kind, target, cause)
        ahead = [j.target for j in running + list(self._queue)]
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
        adopted = await self.loader.adopt()
        for model in adopted:
            self._queue.append(self._new_job(JobKind.SWITCH, model, Cause.DEMAND))
        for model in self.settings.preload:  # in order, each in its turn; not the adopted
            if self.records[model].state not in ENGINE:
                self._queue.append(self._new_job(JobKind.SWITCH, model, Cause.PRELOAD))
        self._adopted.set()
        while True:
            self._wake.clear()
            try:
                self.inbox.apply()
                if self._running is None and not self._beside:
                    self._apply_reloads()
                self.changes.queue_due_restarts()
                self._admit()
                next_check = await self._start_jobs()
            except Exception:
                # A bug in a decision must not stop the one task that decides.
                log.exception("the scheduler's decision failed; trying again")
                next_check = 1.0
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a
            # cancellation that arrives as the event is set, and close() would hang.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(next_check):
                    await self._wake.wait()

    async def _start_jobs(self) -> float:
        """Start the next job if none runs, then the loads that may run beside it;
        returns how long the worker may sleep before it looks again."""
        if self.changes.pending:
            return IDLE_CHECK_SECONDS  # applied once every job has ended: none starts
        next_check = IDLE_CHECK_SECONDS
        if self._running is None:
            job, plan, next_check = await self._next_job()
            if job is not None:
                self._running = job
                self._spawn(job, plan)
            elif not self._beside:
                return next_check  # nothing runs: the decision above covered demand
        if self.demand:
            next_check = min(next_check, await self._start_beside())
        return next_check

    async def _start_beside(self) -> float:
        """Each waited-for model that fits beside everything, the running job's target
        and what its victims will free counted, loads now in a job of its own, unless
        memory moves where it goes (an engine starting, memory on its way back);
        returns when to look again for those that do not start yet."""
        snapshot = await self.gpu.snapshot()
        self.inbox.apply()
        self._admit()
        next_check = IDLE_CHECK_SECONDS
        coming = self.catalog.releasing_by_device(snapshot)
        for want in self._line():
            record = self.records[want.name]
            if not self._may_load_beside(record):
                continue
            plan = self._beside_plan(record.spec, snapshot)
            # Nor where memory moves: an engine sizes its cache from free memory as it
            # starts (see Steps._no_engine_starting), so it starts where no other
            # engine is starting and no memory is on its way back.
            moving = self.catalog.engine_starting(plan.devices) or any(
                coming.get(d, 0.0) > 0 for d in plan.devices
            )
            if not plan.enough or moving:
                next_check = BESIDE_CHECK_SECONDS
                continue
            job = self._new_job(JobKind.SWITCH, want.name, Cause.DEMAND)
            self.catalog.reserve(want.name, {d: plan.required_by_device[d] for d in plan.devices})
            self._beside[want.name] = job
            self._spawn(job, plan)
        return next_check

    def _may_load_beside(self, record: ModelRecord) -> bool:
        """Not loaded, and no job under way or queued acts on it."""
        loaded = record.state not in (ModelState.EXITED, ModelState.FAILED, ModelState.SLEEPING)
        return not loaded and not self.acted_on(record.spec.name)

    def _beside_plan(self, spec: ModelSpec, snapshot: GpuSnapshot) -> planner.Plan:
        return planning.beside(self.catalog, spec, snapshot, self.settings.eviction, self._running)

    def _spawn(self, job: Job, plan: planner.Plan | None) -> None:
        if plan is not None:
            # Known from its plan: it owns their reports from its start.
            job.victims = tuple(victim.name for victim in plan.victims)
        task = asyncio.create_task(self._run(job, plan), name=f"switchd-job-{job.id}")
        self.catalog.writers.add(task)  # it changes the states of its own models
        self._job_tasks[job.id] = task
        task.add_done_callback(lambda ended: self._job_ended(job, ended))

    def _job_ended(self, job: Job, task: asyncio.Task[None]) -> None:
        self.catalog.writers.discard(task)
        self._job_tasks.pop(job.id, None)
        self._wake.set()  # what waited for it may start
        _report_crash(task)

    def _reports_owner(self, model: str) -> asyncio.Task[Any] | None:
        """The task that applies runtime reports about `model`: the job acting on it
        (a load beside, or the running job: its target, its victims, or every model
        for `unload all`), else None: whoever applies reports first."""
        job = self._beside.get(model)
        running = self._running
        acts_on = running is not None and (
            running.target in (model, "all") or model in running.victims
        )
        if job is None and acts_on:
            job = running
        return self._job_tasks.get(job.id) if job is not None else None

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
            if await self._waits_for_beside(self._queue[0]):
                return None, None, IDLE_CHECK_SECONDS  # once those loads end (they wake us)
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

    async def _waits_for_beside(self, job: Job) -> bool:
        """Whether `job` must wait for the loads beside to end: it acts on one of
        them, or could not make room while they run (what they load may go after)."""
        if not self._beside:
            return False
        if job.target in self._beside or job.target == "all":
            return True
        record = self.records.get(job.target)
        if job.kind is not JobKind.SWITCH or record is None or record.state in ACTIVE:
            return False
        return not self._plan(record.spec, await self.gpu.snapshot()).enough

    def _line(self) -> list[policy.Want]:
        """The models requests wait for, in the order the policy serves them."""
        return policy.order(
            policy.Want(model, since, self.records[model].spec.priority)
            for model in self.demand.models()
            if (since := self.demand.since(model)) is not None
        )

    def _decide(self, snapshot: GpuSnapshot) -> tuple[Job | None, planner.Plan | None, float]:
        """Which waiting model loads next, by the policy; else how long until one may."""
        now = time.monotonic()
        next_check = IDLE_CHECK_SECONDS
        self._turn_at = {}
        may_unload = True  # only the model first in line may make others room
        for want in self._line():
            if want.name in self._beside:
                continue  # loading already
            spec = self.records[want.name].spec
            full = self._plan(spec, snapshot)
            if not full.enough:  # `full` short already: what refusal() would plan first
                later = planning.once_released(self.catalog, spec, snapshot, self.settings.eviction)
                if not later.enough:
                    self.demand.fail(spec.name, planning.insufficient_memory(spec, later))
                else:  # it fits once memory on its way back has come: look again soon
                    next_check = min(next_check, MEMORY_WAIT_SECONDS)
                continue
            if not full.victims:
                return self._new_job(JobKind.SWITCH, spec.name, Cause.DEMAND), full, 0.0
            if not may_unload:
                continue
            may_unload = False
            wanted = self.records[want.name]
            bring_in = self.catalog.estimated_ready_seconds(wanted)
            start_by = self._refuse_the_late(want.name, now, bring_in)
            protected: set[str] = set()
            turn_at = now
            for candidate in self.catalog.candidates(spec, snapshot.indexes()):
                record = self.records[candidate.name]
                if candidate.pinned or record.state is ModelState.SLEEPING:
                    continue  # a sleeper serves no one: it may always make room
                # The switch this hold buys: putting the holder away, then the load.
                hold = policy.hold_seconds(
                    bring_in + (record.put_away_seconds or 0.0),
                    self.settings.max_switching_share,
                    self.settings.min_residency_seconds,
                    self.settings.max_hold_seconds,
                )
                yields = policy.yields_at(self._holder(record), want.since, hold, start_by)
                if yields > now:
                    protected.add(candidate.name)
                    next_check = min(next_check, yields - now)
                    turn_at = max(turn_at, yields)
            self._turn_at = {want.name: turn_at}
            plan = self._plan(spec, snapshot, frozenset(protected))
            if plan.enough:
                return self._new_job(JobKind.SWITCH, spec.name, Cause.DEMAND), plan, 0.0
        return None, None, next_check

    def _plan(
        self, spec: ModelSpec, snapshot: GpuSnapshot, protected: frozenset[str] = frozenset()
    ) -> planner.Plan:
        return planning.plan(self.catalog, spec, snapshot, self.settings.eviction, protected)

    def _return_seconds(self, record: ModelRecord) -> float:
        """What bringing a holder back later costs: its last load or wake, else a load."""
        cost = record.ready_cost_seconds
        return cost if cost is not None else self.catalog.estimated_load_seconds(record.spec)

    def _refuse_the_late(self, model: str, now: float, bring_in: float) -> float:
        """Refuse now the waiters of `model` that even a switch started now would not
        serve before their deadline; return when a switch must start for the rest."""
        late = SwitchError(
            "deadline_unreachable",
            503,
            f"{model} cannot be ready before this request's deadline: loading it takes "
            f"about {bring_in:.1f} s",
            retry_after_seconds=max(1, math.ceil(bring_in)),
        )
        self.demand.fail_late(model, now, now + bring_in, late)
        earliest = self.demand.earliest_deadline(model)
        return math.inf if earliest is None else earliest - bring_in

    def _holder(self, record: ModelRecord) -> policy.Holder:
        spec = record.spec
        residency = max(self.settings.min_residency_seconds, self._return_seconds(record))
        return policy.Holder(
            spec.name,
            record.resident_since,
            residency,
            record.in_flight,
            self.demand.waiting(spec.name),
            record.last_active,
        )

    async def _run(self, job: Job, plan: planner.Plan | None) -> None:
        """Run `job` (the worker's `_running`, or a load beside it) to its end."""
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
            if self._running is job:
                self._running = None
            elif self._beside.get(job.target) is job:
                del self._beside[job.target]
                self.catalog.unreserve(job.target)
            self._settle(job)
            if job.cause is Cause.RELOAD and job.kind is JobKind.UNLOAD:
                self.changes.unloaded(job.target)

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
        if job.cause is Cause.PRELOAD and (plan.victims or not plan.enough):
            # A preload unloads nothing: a model that fits only in place of another
            # is left to load on demand.
            message = f"{spec.name} not preloaded: it does not fit beside the models loaded"
            log.warning("%s", message)
            return {"status": "skipped", "model": spec.name, "job": job.id, "message": message}
        return await self.steps.switch(job, plan)

    async def _unload(self, job: Job) -> dict[str, Any]:
        if job.target == "all":
            chosen = [r for r in self.records.values() if r.state in ENGINE and not r.spec.pinned]
        else:
            record = self.records[job.target]
            asleep = record.state is ModelState.SLEEPING
            chosen = [record] if asleep or record.state is ModelState.RUNNING else []
        job.victims = tuple(r.spec.name for r in chosen)
        return await self.steps.unload_models(job, chosen)

    def _settle(self, job: Job) -> None:
        """After a job: learn from a failed load, and answer the target's waiters."""
        for event in job.events:  # what making room cost, for the holds to come
            if event.name in PUT_AWAY and (victim := self.records.get(event.data["victim"])):
                victim.put_away_seconds = float(event.data["seconds"])
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

    # ---- config reloads (switchd/reload.py, switchd/changes.py) -------------------

    async def reload(self, change: Diff, now: bool = False) -> None:
        """Apply a config diff in the worker, once no job runs; returns once applied:
        models added and removed from new requests' view, unloads and restarts
        queued. `now`: restart the changed models at once, not when next idle."""
        done = self.changes.submit(change, now)
        self._wake.set()
        await done

    def _apply_reloads(self) -> None:
        new = self.changes.apply_pending()
        if new is not None:
            # The one place the current Settings change: the scheduler's, and its helpers'.
            self.settings = self.loader.settings = self.steps.settings = new

    # What applying a config change asks of the scheduler (changes.Jobs).

    def enqueue(self, kind: JobKind, target: str, cause: Cause) -> Job:
        return self._enqueue(kind, target, cause)

    def drop_queued_switches(self, model: str, error: SwitchError) -> None:
        for job in [j for j in self._queue if j.target == model and j.kind is JobKind.SWITCH]:
            self._queue.remove(job)
            self._fail(job, error)

    def acted_on(self, model: str) -> bool:
        """Whether a job under way (beside ones too) or queued acts on `model`."""
        if model in self._beside:
            return True
        jobs = [*([self._running] if self._running else []), *self._queue]
        return any(job.target == model or model in job.victims for job in jobs)

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
            claim = self.demand.claim(name, now)
            # Since when its demand has gone on, through clients that gave up.
            body["demand_age_seconds"] = round(now - claim.since, 2) if claim else None
            body["given_up"] = self.demand.given_up[name]
            body["load_requested"] = self.load_requested(name)
            turn_at = self._turn_at.get(name) if body["waiting"] else None
            # How long the holder keeps the GPU before this model gets its turn.
            body["hold_left_seconds"] = (
                round(max(0.0, turn_at - now), 2) if turn_at is not None else None
            )
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
            # Loads that needed no room, started beside the switch under way.
            "beside": [
                {
                    "id": job.id,
                    "target": job.target,
                    "stage": job.stage.value,
                    "progress": round(job.progress, 3),
                }
                for job in self._beside.values()
            ],
        }


def _serves(record: ModelRecord) -> bool:
    return record.state is ModelState.RUNNING and not record.draining and record.engine is not None


def _report_crash(task: asyncio.Task[None]) -> None:
    """These tasks run for switchd's whole life: one ending early is a bug, said loudly."""
    if not task.cancelled() and task.exception() is not None:
        log.critical("%s stopped: %r", task.get_name(), task.exception())
