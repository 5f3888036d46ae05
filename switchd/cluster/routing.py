"""Pure: which host a request for a model goes to, best first.

From the hosts' snapshots (their `/v1/models/status`), in this order:

1. `serving`: the model runs there (`running`, or `loading`: a switch to it is
   already under way, so the request joins it); the least busy first;
2. `asleep`: its engine sleeps there (a wake, not a load); the quickest to wake;
3. `fits`: it fits beside what is loaded, unloading nothing; the tightest fit
   first, so that the big holes stay free for big models;
4. `unloads`: room must be made; the host whose plan puts aside the least:
   fewest busy models, then the fewest seconds of learned load time to bring
   them back, then the fewest GB.

Hosts whose catalog lacks the model, or that are unreachable, are not
candidates; a host where it never fits (even with every unpinned model
unloaded) comes last, so that its switchd answers the 409 with its figures.
The chosen host's own scheduler makes the switch: this plan only ranks hosts,
it is never sent anywhere. Per device: the devices a model names (`gpus`), or
all of the host's, each needing its share of the model's size.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from switchd.cluster.directory import HostSnapshot

SERVING, ASLEEP, FITS, UNLOADS, NEVER_FITS = "serving", "asleep", "fits", "unloads", "never_fits"
TIERS = (SERVING, ASLEEP, FITS, UNLOADS, NEVER_FITS)
HOLDS_MEMORY = frozenset({"running", "loading", "sleeping"})


@dataclass(frozen=True)
class Choice:
    host: str
    model: str  # the catalog's name (an alias resolved)
    reason: str  # one of TIERS
    unloads: tuple[str, ...] = ()  # what the host would put aside, as this plan sees it
    order: tuple[float, ...] = ()  # within the tier, lower first


def resolve(requested: str, hosts: Iterable[HostSnapshot]) -> str | None:
    """The catalog name `requested` stands for on any host (a name, or an alias)."""
    found: str | None = None
    for host in hosts:
        models = models_of(host)
        if requested in models:
            return requested
        for name, model in models.items():
            if requested in (model.get("aliases") or ()):
                found = found or name
    return found


def models_of(host: HostSnapshot) -> Mapping[str, Mapping[str, Any]]:
    return {} if host.status is None else host.status.get("models") or {}


def devices_of(host: HostSnapshot) -> dict[int, float]:
    """Free GB per device index, memory on its way back included.

    An engine just stopped gives its memory back a moment later: the device shows
    it used, yet no model holds it. It is coming (the host's switchd plans with it
    and waits for it), so it counts as free here too, else a host that has just
    unloaded would look fuller than one that must unload now.
    """
    if host.status is None:
        return {}
    devices = (host.status.get("gpu") or {}).get("devices") or []
    free = {int(d["index"]): float(d.get("available_gb", 0.0)) for d in devices}
    held = dict.fromkeys(free, 0.0)
    for model in models_of(host).values():
        if model.get("status") in HOLDS_MEMORY:
            theirs = devices_used(model, sorted(free))
            for d in theirs:
                held[d] = held.get(d, 0.0) + held_gb(model) / max(len(theirs), 1)
    for d in devices:
        index = int(d["index"])
        total = float(d.get("total_gb", 0.0))
        coming = total - free[index] - held.get(index, 0.0)
        if coming > 0:
            free[index] += coming
    return free


def devices_used(model: Mapping[str, Any], all_devices: Sequence[int]) -> list[int]:
    gpus = model.get("gpus")
    if isinstance(gpus, list) and gpus:
        return [int(index) for index in gpus]
    return list(all_devices)


def held_gb(model: Mapping[str, Any]) -> float:
    held = model.get("gpu_memory_used_gb")
    return float(held if held is not None else model.get("size_gb") or 0.0)


def busy(model: Mapping[str, Any]) -> bool:
    return bool(model.get("in_flight") or model.get("waiting"))


def shortfall(need: Mapping[int, float], free: Mapping[int, float]) -> dict[int, float]:
    return {d: need[d] - free.get(d, 0.0) for d in need if need[d] > free.get(d, 0.0) + 1e-9}


def load_of(host: HostSnapshot) -> float:
    """How busy a host is: requests in flight and waiting there."""
    total = 0.0
    for model in models_of(host).values():
        total += float(model.get("in_flight") or 0) + float(model.get("waiting") or 0)
    return total


def place(host: HostSnapshot, name: str) -> Choice:
    """Where `name` stands on this one host (which has it in its catalog)."""
    models = models_of(host)
    model = models[name]
    state = model.get("status")
    if state in ("running", "loading"):
        return Choice(host.name, name, SERVING, (), (load_of(host),))
    if state == "sleeping":
        wake = float((model.get("sleep") or {}).get("estimated_wake_seconds") or 0.0)
        return Choice(host.name, name, ASLEEP, (), (wake, load_of(host)))
    free = devices_of(host)
    mine = devices_used(model, sorted(free))
    share = float(model.get("size_gb") or 0.0) / max(len(mine), 1)
    need = {d: share for d in mine}
    short = shortfall(need, free)
    if not short:
        leftover = sum(free.get(d, 0.0) - share for d in mine)
        return Choice(host.name, name, FITS, (), (leftover, load_of(host)))
    # Put aside the cheapest models first until the model fits: idle before busy,
    # quick to bring back before slow, and among equals the biggest (fewest victims).
    candidates = sorted(
        (
            (other, spec)
            for other, spec in models.items()
            if other != name and spec.get("status") in HOLDS_MEMORY and not spec.get("pinned")
        ),
        key=lambda item: (
            busy(item[1]),
            float(item[1].get("estimated_load_time_seconds") or 0.0),
            -held_gb(item[1]),
        ),
    )
    victims: list[str] = []
    busy_count, reload_seconds, freed_gb = 0, 0.0, 0.0
    all_devices = sorted(free)
    for other, spec in candidates:
        theirs = devices_used(spec, all_devices)
        if not set(theirs) & set(short):
            continue
        victims.append(other)
        busy_count += busy(spec)
        reload_seconds += float(spec.get("estimated_load_time_seconds") or 0.0)
        freed_gb += held_gb(spec)
        for d in theirs:
            free[d] = free.get(d, 0.0) + held_gb(spec) / max(len(theirs), 1)
        short = shortfall(need, free)
        if not short:
            order = (float(busy_count), reload_seconds, freed_gb, load_of(host))
            return Choice(host.name, name, UNLOADS, tuple(victims), order)
    return Choice(host.name, name, NEVER_FITS, (), (load_of(host),))


def rank(requested: str, hosts: Iterable[HostSnapshot], avoid: Iterable[str] = ()) -> list[Choice]:
    """Every reachable host that has `requested` in its catalog, best first."""
    avoided = set(avoid)
    usable = [h for h in hosts if h.reachable and h.name not in avoided]
    name = resolve(requested, usable)
    if name is None:
        return []
    choices = [place(h, name) for h in usable if name in models_of(h)]
    return sorted(choices, key=lambda c: (TIERS.index(c.reason), c.order, c.host))
