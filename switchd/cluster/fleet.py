"""The gateway's view of the hosts: their latest snapshots, hosts marked down by a
failed request, and the status of them all in one switchd-shaped body."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from switchd.cluster.directory import HostSnapshot
from switchd.cluster.routing import devices_used, models_of, rank

# A host a request could not reach stays out of routing this long, unless its
# directory says sooner that it is down (then until it says it is back).
FAILED_HOLD_SECONDS = 2.0
# A model just sent to a host counts as loading there until the host's snapshot
# shows it (or this long has passed): the next request must not be routed by a
# read of the hosts taken before, which would put another model in its place.
ROUTED_HOLD_SECONDS = 5.0
HELD = ("running", "loading", "sleeping")
MEMORY = ("used_gb", "total_gb", "available_gb")


@dataclass(frozen=True)
class Change:
    host: str
    reachable: bool
    reason: str | None


class Fleet:
    def __init__(self) -> None:
        self._hosts: dict[str, HostSnapshot] = {}
        self._failed: dict[str, tuple[float, str]] = {}  # host: (until, why)
        self._reachable: dict[str, bool] = {}
        self._routed: dict[tuple[str, str], float] = {}  # (host, model): when

    def update(self, snapshots: Iterable[HostSnapshot]) -> list[Change]:
        """The directory's latest list; what changed in who is reachable."""
        self._hosts = {s.name: s for s in snapshots}
        return self._changes()

    def failed(self, host: str, reason: str) -> list[Change]:
        """A request to `host` got no answer: out of routing for a moment."""
        self._failed[host] = (time.monotonic() + FAILED_HOLD_SECONDS, reason)
        return self._changes()

    def _changes(self) -> list[Change]:
        changes = []
        view = {h.name: h for h in self.view()}
        for name in sorted(set(view) | set(self._reachable)):
            now = name in view and view[name].reachable
            if self._reachable.get(name) != now:
                reason = None if now or name not in view else view[name].error
                changes.append(Change(name, now, reason or (None if now else "gone")))
                self._reachable[name] = now
        for name in set(self._reachable) - set(view):
            del self._reachable[name]
        return changes

    def routed(self, host: str, model: str) -> None:
        """A request for `model` went to `host`: it loads there, if it was not already."""
        self._routed[(host, model)] = time.monotonic()

    def view(self) -> list[HostSnapshot]:
        now = time.monotonic()
        out = []
        for name, snapshot in sorted(self._hosts.items()):
            until, why = self._failed.get(name, (0.0, ""))
            if until > now and snapshot.reachable:
                out.append(snapshot.down(why))
            else:
                out.append(self._with_routed(snapshot, now))
        return out

    def _with_routed(self, snapshot: HostSnapshot, now: float) -> HostSnapshot:
        """`snapshot`, with the models sent there since as loading, their memory taken."""
        pending = [
            model
            for (host, model), at in list(self._routed.items())
            if host == snapshot.name and now - at < ROUTED_HOLD_SECONDS
        ]
        models = models_of(snapshot)
        pending = [m for m in pending if m in models and models[m].get("status") not in HELD]
        for key in [k for k, at in self._routed.items() if now - at >= ROUTED_HOLD_SECONDS]:
            del self._routed[key]
        for model in [m for (h, m) in self._routed if h == snapshot.name and m not in pending]:
            del self._routed[(snapshot.name, model)]  # the host shows it: no guess needed
        if not pending or snapshot.status is None:
            return snapshot
        status = dict(snapshot.status)
        new_models = dict(models)
        gpu = dict(status.get("gpu") or {})
        devices = [dict(d) for d in gpu.get("devices") or []]
        indexes = [int(d["index"]) for d in devices]
        for model in pending:
            spec = dict(new_models[model])
            spec["status"] = "loading"
            new_models[model] = spec
            mine = devices_used(spec, indexes)
            share = float(spec.get("size_gb") or 0.0) / max(len(mine), 1)
            for device in devices:
                if int(device["index"]) in mine:
                    device["available_gb"] = float(device.get("available_gb", 0.0)) - share
        gpu["devices"] = devices
        status.update(models=new_models, gpu=gpu)
        return replace(snapshot, status=status)

    def get(self, name: str) -> HostSnapshot | None:
        return next((h for h in self.view() if h.name == name), None)


def host_summary(host: HostSnapshot) -> dict[str, Any]:
    status = host.status or {}
    return {
        "url": host.url,
        "reachable": host.reachable,
        "age_seconds": host.age_seconds,
        "error": host.error,
        "node": host.node,
        "waiting": status.get("waiting", 0),
        "switch": status.get("switch"),
        "gpu": status.get("gpu"),
    }


def merged_status(hosts: Iterable[HostSnapshot]) -> dict[str, Any]:
    """One switchd's status body for the whole fleet.

    Each model's fields are those of the host a request for it would go to now,
    with `host` naming it, plus `hosts` (its state on every reachable host that
    has it), `loaded_on` and `asleep_on`. `gpu` sums the reachable hosts, each
    device with its `host`; `hosts` says how each host is.
    """
    everyone = list(hosts)
    reachable = [h for h in everyone if h.reachable]
    models: dict[str, dict[str, Any]] = {}
    names = sorted({name for h in reachable for name in models_of(h)})
    for name in names:
        where = {h.name: models_of(h)[name] for h in reachable if name in models_of(h)}
        choices = rank(name, reachable)
        first = choices[0].host if choices else next(iter(where))
        entry = dict(where[first])
        entry["host"] = first
        entry["hosts"] = {
            host: {
                "status": model.get("status"),
                "in_flight": model.get("in_flight", 0),
                "waiting": model.get("waiting", 0),
            }
            for host, model in where.items()
        }
        entry["loaded_on"] = [h for h, m in where.items() if m.get("status") == "running"]
        entry["asleep_on"] = [h for h, m in where.items() if m.get("status") == "sleeping"]
        entry["in_flight"] = sum(int(m.get("in_flight") or 0) for m in where.values())
        entry["waiting"] = sum(int(m.get("waiting") or 0) for m in where.values())
        models[name] = entry
    devices: list[dict[str, Any]] = []
    for host in reachable:
        for device in ((host.status or {}).get("gpu") or {}).get("devices") or []:
            shown = dict(device)
            shown.update(
                index=len(devices),
                host=host.name,
                host_index=device.get("index"),
                name=f"{host.name} · {device.get('name', 'GPU')}",
            )
            devices.append(shown)
    gpu: dict[str, Any] = {
        key: round(sum(float(d.get(key, 0)) for d in devices), 2) for key in MEMORY
    }
    gpu.update(source="cluster", devices=devices)
    switches: dict[str, dict[str, Any]] = {
        h.name: dict((h.status or {})["switch"])
        for h in reachable
        if (h.status or {}).get("switch")
    }
    first_switch = next(iter(switches.items()), None)
    return {
        "models": models,
        "gpu": gpu,
        "waiting": sum(int((h.status or {}).get("waiting") or 0) for h in reachable),
        "switch": None if first_switch is None else {**first_switch[1], "host": first_switch[0]},
        "switches": switches,
        "hosts": {h.name: host_summary(h) for h in everyone},
    }


def holders(model: str, hosts: Iterable[HostSnapshot]) -> list[str]:
    """Reachable hosts where `model` runs, loads or sleeps."""
    held = ("running", "loading", "sleeping")
    return [
        h.name
        for h in hosts
        if h.reachable and (models_of(h).get(model) or {}).get("status") in held
    ]


def known_models(hosts: Iterable[HostSnapshot]) -> list[str]:
    return sorted({name for h in hosts if h.reachable for name in models_of(h)})
