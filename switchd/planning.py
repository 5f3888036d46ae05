"""A switch's plan: the planner's pure decision, fed with the catalog's figures.

switchd.planner decides from figures alone; this gathers them (what the target
needs, what is free on each device, what each loaded model would free) from the
catalog and a snapshot, and words the 409 of a model that can never fit.

Memory on its way back (an engine stopping, or gone lately and not yet seen
released) is neither free nor freeable, but it is coming: `once_released` plans
as if it were back, and `refusal` answers 409 only for a model that would not
fit even then.

`beside` plans a load that may start while another job runs: one that needs no
room, and takes nothing that job's target is counting on.
"""

from __future__ import annotations

from typing import Any

from switchd import planner
from switchd.catalog import NOT_TAKEN, Catalog
from switchd.config import EvictionPolicy, ModelSpec
from switchd.gpu import GpuSnapshot
from switchd.jobs import Job, JobKind, SwitchError
from switchd.states import ModelState
from switchd.units import gib


def plan(
    catalog: Catalog,
    spec: ModelSpec,
    snapshot: GpuSnapshot,
    eviction: EvictionPolicy,
    protected: frozenset[str] = frozenset(),
) -> planner.Plan:
    """Where `spec` goes and what must be unloaded there for it to fit, device by
    device; `protected` models count as pinned."""
    every = snapshot.indexes()
    candidates = [
        c if c.name not in protected else planner.Candidate(c.name, c.held_gb, c.last_used, True)
        for c in catalog.candidates(spec, every)
    ]
    return planner.plan(
        catalog.need(spec, every),
        catalog.available_by_device(snapshot, spec.name),
        {d.index: gib(d.total_bytes) for d in snapshot.devices},
        candidates,
        eviction,
    )


def beside(
    catalog: Catalog,
    spec: ModelSpec,
    snapshot: GpuSnapshot,
    eviction: EvictionPolicy,
    running: Job | None,
) -> planner.Plan:
    """Where `spec` would load now with nothing unloaded, beside the job `running`
    (enough: it may start at once). It must fit in what is free now, and in what
    will be free once that job is done: what the job's target will take (where its
    memory check placed it; until then, on every device it may go) is not free,
    while what the job's victims hold and memory on its way back will be."""
    every = snapshot.indexes()
    now = catalog.available_by_device(snapshot, spec.name)
    coming = catalog.releasing_by_device(snapshot)
    later = {d: gb + coming.get(d, 0.0) for d, gb in now.items()}
    if running is not None and running.kind is JobKind.SWITCH:
        target = catalog.records.get(running.target)
        if target is not None and target.state in NOT_TAKEN:
            need = catalog.need(target.spec, every)
            for device in running.placed or need.fixed or every:
                later[device] = later.get(device, 0.0) - need.per_device_gb
        for name in running.victims:
            victim = catalog.records.get(name)
            if victim is not None and victim.state in (ModelState.RUNNING, ModelState.SLEEPING):
                for device, gb in catalog.held_by_device(victim, every).items():
                    later[device] = later.get(device, 0.0) + gb
    return planner.plan(
        catalog.need(spec, every),
        {d: max(0.0, min(gb, later[d])) for d, gb in now.items()},
        {d.index: gib(d.total_bytes) for d in snapshot.devices},
        (),
        eviction,
    )


def once_released(
    catalog: Catalog,
    spec: ModelSpec,
    snapshot: GpuSnapshot,
    eviction: EvictionPolicy,
) -> planner.Plan:
    """The plan as it will be once the memory on its way back has come, and the
    loads beside another job have ended (what they load may be unloaded then)."""
    every = snapshot.indexes()
    available = catalog.available_by_device(snapshot, spec.name)
    coming = catalog.releasing_by_device(snapshot)
    totals = {d.index: gib(d.total_bytes) for d in snapshot.devices}
    later = {d: min(totals[d], gb + coming.get(d, 0.0)) for d, gb in available.items()}
    candidates = catalog.candidates(spec, every, busy_pinned=False)
    return planner.plan(catalog.need(spec, every), later, totals, candidates, eviction)


def refusal(
    catalog: Catalog, spec: ModelSpec, snapshot: GpuSnapshot, eviction: EvictionPolicy
) -> SwitchError | None:
    """The 409 of a model that cannot fit even once everything releasable is released
    (memory on its way back included); None when it fits now or will."""
    if plan(catalog, spec, snapshot, eviction).enough:
        return None
    later = once_released(catalog, spec, snapshot, eviction)
    return None if later.enough else insufficient_memory(spec, later)


def insufficient_memory(spec: ModelSpec, plan: planner.Plan) -> SwitchError:
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
    if plan.short_device is not None and plan.host_devices > 1:
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
