"""Making room for a switch: memory check, drain, sleep or stop, verify the release.

Each step emits its stage events (switchd.emitter) and changes model states
only through Catalog.transition. The steps run in the scheduler's job that may
make room (one at a time); what the runtime reports reaches them through the
inbox (switchd.inbox), applied between steps and at every wait inside one, so a
report can never change a state that a step has read and is about to act on.
Once there is room, the loader (switchd.loading) brings the target up.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from switchd import planner, planning, standby, wire
from switchd.catalog import Catalog, ModelRecord
from switchd.config import Settings
from switchd.emitter import PROGRESS_CHECKED, PROGRESS_FREED, Emitter
from switchd.gpu import GpuProbe, GpuSnapshot
from switchd.inbox import Inbox
from switchd.jobs import Job, JobKind, SwitchError
from switchd.loading import Loader
from switchd.planning import insufficient_memory
from switchd.runtime.base import Runtime
from switchd.standby import EngineStandby, PutAway, StandbyFailed
from switchd.states import ModelState
from switchd.stats import LearnedStats
from switchd.units import gib, gib_to_bytes

log = logging.getLogger(__name__)

RELEASED_FRACTION = 0.75  # of a victim's memory that must show as free again
MEMORY_POLL_SECONDS = 0.1


class Steps:
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
        standby: EngineStandby,
        loader: Loader,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.runtime = runtime
        self.gpu = gpu
        self._inbox = inbox
        self._emitter = emitter
        self._stats = stats
        self._standby = standby
        self._loader = loader
        self._clock = clock
        self.host_ram_budget_gb = 0.0  # for level-1 sleeps; the scheduler sets it at start

    # ---- a switch ------------------------------------------------------------------

    async def switch(self, job: Job, plan: planner.Plan) -> dict[str, Any]:
        """Make room as `plan` says, then load the target."""
        record = self.catalog.records[job.target]
        spec = record.spec
        if not plan.enough:
            plan = await self._room_once_released(record, plan)
        victims = [v.name for v in plan.victims]
        choices = self._put_away_choices(plan, record)
        if victims:
            verdict = "; ".join(choice.reason for choice in choices)
        else:
            verdict = "it fits" if plan.enough else "not enough even after unloading every model"
        required = round(plan.required_gb, 2)
        where = on_devices(plan.devices, plan.host_devices)
        self._emitter.emit(
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
        job.placed, job.victims = plan.devices, tuple(victims)  # loads beside it count on them
        if not plan.enough:
            raise insufficient_memory(spec, plan)
        chosen = [self.catalog.records[name] for name in victims]
        freed = await self.unload_all(job, chosen, {c.name: c for c in choices})
        freed += await self._stop_sleepers_if_short(job, record, chosen, plan)
        job.memory_info["freed_gb"] = round(freed, 2)
        if victims:
            after = self.catalog.available_gb(await self.gpu.snapshot(), plan.devices, spec.name)
            self._emitter.emit(
                job,
                wire.Freed(round(freed, 2), after),
                f"Freed {freed:.2f} GB; {after:.2f} GB now free{where}",
                progress=PROGRESS_FREED,
            )
        await self._bring_up(job, record, plan.devices)
        return job.success_body(ready=True)

    async def _room_once_released(self, record: ModelRecord, plan: planner.Plan) -> planner.Plan:
        """A target that fits only once memory on its way back has come waits for it,
        planning again as it comes (at most the release timeout: then it is not coming)."""
        spec, eviction = record.spec, self.settings.eviction
        deadline = self._clock() + self.settings.memory_release_timeout_seconds
        while not plan.enough and self._clock() < deadline:
            snapshot = await self.gpu.snapshot()
            if not planning.once_released(self.catalog, spec, snapshot, eviction).enough:
                break
            await self._inbox.pause(MEMORY_POLL_SECONDS)
            plan = planning.plan(self.catalog, spec, await self.gpu.snapshot(), eviction)
        return plan

    async def _bring_up(self, job: Job, record: ModelRecord, devices: tuple[int, ...]) -> None:
        """Wake the target if it sleeps, else (or if the wake failed: it is stopped
        first) start it cold; once no other engine is starting where it goes."""
        await self._no_engine_starting(record, record.devices or devices)
        if record.state is ModelState.SLEEPING:
            failure = await self._loader.wake(job, record)
            if failure is None:
                return
            held = self.catalog.held_by_device(record, (await self.gpu.snapshot()).indexes())
            why = f"waking it failed ({failure}); starting it cold"
            await self._unload(job, record, held, 1.0, why=why)
        await self._loader.load(job, record, devices)

    def _put_away_choices(self, plan: planner.Plan, target: ModelRecord) -> list[PutAway]:
        """Which of the plan's victims sleep and which stop (switchd.standby.choose).
        A target asleep at level 1 takes its weights back from host RAM as it wakes:
        its charge is not the victims' to lose."""
        if not plan.victims:
            return []
        victims = [
            self.catalog.standby_victim(self.catalog.records[v.name], dict(v.held_gb))
            for v in plan.victims
        ]
        short = {d: plan.required_by_device[d] - plan.available_by_device[d] for d in plan.devices}
        in_use = self.catalog.host_ram_in_use_gb() - target.host_ram_gb
        budget_left = self.host_ram_budget_gb - in_use
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
            available = self.catalog.available_by_device(snapshot, target.spec.name)
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
                "message": "Nothing to unload: no unpinned model is loaded"
                if job.target == "all"
                else f"Nothing to unload: {job.target} is not running",
            }
        freed = await self.unload_all(job, chosen)
        available = gib((await self.gpu.snapshot()).free_bytes())
        self._emitter.emit(
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

    async def _no_engine_starting(self, record: ModelRecord, devices: Iterable[int]) -> None:
        """Wait until no engine but `record`'s is starting on `devices`, before memory
        moves there. An engine sizes its cache from free memory as it starts: vLLM
        aborts when free memory grows meanwhile (vllm-project/vllm#56830) and sizes it
        short when another engine takes memory. So one engine starts at a time on a
        device, and memory is given back only where none starts. A load beside this
        job is up within its health timeout."""
        devices = tuple(devices)
        while self.catalog.engine_starting(devices, besides=record):
            await self._inbox.pause(MEMORY_POLL_SECONDS)

    async def _drain(self, job: Job, record: ModelRecord) -> None:
        if not record.in_flight:
            return
        self._emitter.emit(
            job,
            wire.Drain(record.spec.name, record.in_flight),
            f"Waiting for {record.in_flight} request(s) on {record.spec.name} to finish",
        )
        deadline = self._clock() + self.settings.drain_timeout_seconds
        while record.in_flight and self._clock() < deadline:
            await self._inbox.pause(deadline - self._clock(), until=record.idle)

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
        self._emitter.emit(
            job,
            wire.Unload(spec.name, round(held_gb, 2)),
            f"Unloading {spec.name}" + (f": {why}" if why else ""),
        )
        await self._no_engine_starting(record, held)
        started = self._clock()
        before, moves = await self.gpu.snapshot(), self.catalog.memory_moves
        self._inbox.apply()  # a victim that died while this job waited or drained
        if record.state not in (ModelState.RUNNING, ModelState.LOADING, ModelState.SLEEPING):
            return await self._already_gone(job, record, share)
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
        back, verified = await self._await_release(before, moves, held)
        if verified:  # else the rest may still come back while the next model loads
            self.catalog.released(spec.name)
        freed = gib(sum(back.values()))
        seconds = round(self._clock() - started, 2)
        job.unloaded_models.append(spec.name)
        message = f"{spec.name} unloaded: {freed:.2f} GB freed in {seconds:.2f} s"
        message += self._unverified(verified, spec.name, f"expected about {held_gb:.2f} GB")
        self._emitter.emit(
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
        await self._no_engine_starting(record, held)
        self._inbox.apply()  # a victim that died while this job waited or drained
        if record.state is not ModelState.RUNNING or record.engine is None:
            return None, f"it is {record.state.value}"
        held_gb = round(sum(held.values()), 2)
        self._emitter.emit(
            job,
            wire.Sleep(spec.name, tier.value, held_gb, choice.wake_seconds or 0.0, choice.reason),
            choice.reason[0].upper() + choice.reason[1:],
        )
        started = self._clock()
        before = await self.gpu.snapshot()
        moves, releasing = self.catalog.memory_moves, self.catalog.release_pending()
        measured = record.measured_by_device is not None
        try:
            url = record.engine.url
            await self._standby.sleep(spec, url, tier)
        except StandbyFailed as exc:
            log.warning("%s did not go to sleep: %s", spec.name, exc)
            return None, f"its sleep failed ({exc})"
        self._inbox.apply()  # an exit during the call
        if record.state is not ModelState.RUNNING:
            return None, "it exited while falling asleep"
        if not await self._standby.answers_health(spec, url):
            # Answered the sleep, yet dead or wedged: stopped instead, not kept as a sleeper.
            log.warning("%s stopped answering %s after its sleep", spec.name, spec.health_path)
            return None, f"it stopped answering {spec.health_path} after its sleep"
        self.catalog.transition(record, ModelState.RUNNING, ModelState.SLEEPING, tier=tier)
        record.host_ram_gb = choice.host_ram_gb
        back, verified = await self._await_release(before, moves, held)
        if verified:
            self.catalog.released(spec.name)
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
        self._emitter.emit(
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
        self._emitter.emit(
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
        self, before: GpuSnapshot, moves: int, held: dict[int, float]
    ) -> tuple[dict[int, int], bool]:
        """Poll free memory until most of what the victim held came back, on each of
        its devices; returns the bytes seen back on each, and whether that was enough.
        `before` was read when `memory_moves` was `moves`: what engines loading beside
        this job took since is not the victim's and is added back (`taken_meanwhile`)."""
        wanted = {device: RELEASED_FRACTION * gib_to_bytes(gb) for device, gb in held.items()}
        deadline = self._clock() + self.settings.memory_release_timeout_seconds
        free_before = before.free_by_device()
        while True:
            now = await self.gpu.snapshot()
            free = now.free_by_device()
            others = taken_meanwhile(before, now, self.catalog.taken_since(moves))
            back = {
                d: max(0, free.get(d, 0) - free_before.get(d, 0) + others.get(d, 0)) for d in wanted
            }
            if all(back[d] >= wanted[d] for d in wanted):
                return back, True
            if self._clock() >= deadline:
                return back, False
            await self._inbox.pause(MEMORY_POLL_SECONDS)


def taken_meanwhile(
    before: GpuSnapshot, now: GpuSnapshot, started: dict[int, float]
) -> dict[int, int]:
    """Per device, the bytes other engines took between two snapshots: what each process
    grew by, where the driver names processes (NVML); else what the engines that began
    to load meanwhile (`started`, in GB) were expected to take, as the simulated card
    takes it at once. A released engine's own processes only shrink: never counted."""
    if before.processes or now.processes:
        was = {(p.pid, p.device): p.used_bytes for p in before.processes}
        grown: dict[int, int] = {}
        for process in now.processes:
            more = process.used_bytes - was.get((process.pid, process.device), 0)
            if more > 0:
                grown[process.device] = grown.get(process.device, 0) + more
        return grown
    return {device: gib_to_bytes(gb) for device, gb in started.items()}


def on_devices(devices: Sequence[int], device_count: int) -> str:
    """ " on GPU 1" or " on GPUs 0, 1" on a host of several; nothing on a one-GPU host."""
    if device_count <= 1:
        return ""
    return f" on GPU{'s' if len(devices) > 1 else ''} {', '.join(map(str, devices))}"
