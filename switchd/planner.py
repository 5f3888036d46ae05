"""Placement and eviction planning, device by device.

Pure: figures in, a Plan out. The scheduler measures, this decides.

A host's GPUs are planned one by one, never pooled: two 48 GB cards are not one
96 GB card. The model to load (a `Need`) asks for `per_device_gb` on each of its
devices: either the devices its config names (`fixed`), or any `count` of them.

Placement. The device sets tried are `fixed` when given, else every combination
of `count` of the host's devices. On each set the deficit of a device is what
the model needs there minus what is free there. Among the sets:

  (a) those where it fits without unloading anything win, by best fit: the
      smallest leftover (free minus need, summed over the set), then the lowest
      device indexes;
  (b) else those where it fits after unloading: the fewest victims, then the
      least memory unloaded (a victim's whole footprint goes, on every device it
      holds, not just the set's), then best fit (leftover after unloading), then
      the lowest indexes;
  (c) else it fits nowhere: the set with the most memory possible (free plus what
      every unpinned model there would free) is reported, with no victims, and
      `short_device` names its device with the largest shortfall left even after
      unloading every unpinned model.

Victims on one set. Only candidates holding memory on a device of the set that
is in deficit matter, and pinned ones never do. When even all of those together
would not cover every deficit, nothing is unloaded: a switch that cannot succeed
must not take other models down on its way to failing. Otherwise they are
ordered by the policy:

  largest_first        what each frees on the set's deficient devices, largest
                       first; ties by name;
  lru                  least recently used first (never used: 0, so first), then
                       larger first (as largest_first), then name;
  smallest_sufficient  the single candidate that covers every deficit on its own
                       with the smallest total footprint, ties by name; when none
                       does, as largest_first;

and taken in that order, skipping any that no longer help (nothing held on a
device still in deficit), until every deficit is covered.

Invalid figures (a count the host cannot hold, a fixed device it does not have)
raise ValueError: config validation should have refused them already.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from switchd.config import EvictionPolicy

Devices = tuple[int, ...]


@dataclass(frozen=True)
class Candidate:
    """A loaded model that could be unloaded."""

    name: str
    held_gb: Mapping[int, float]  # what it holds on each device it occupies
    last_used: float  # epoch seconds; 0 when never used
    pinned: bool = False

    @property
    def total_gb(self) -> float:
        return math.fsum(self.held_gb.values())


@dataclass(frozen=True)
class Need:
    """The model to load."""

    per_device_gb: float  # what it needs on EACH of its devices (its size split over them)
    fixed: Devices | None  # devices named in config (`gpus: [0, 1]`), or None
    count: int  # how many devices; == len(fixed) when fixed

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"a model needs at least one device, got count {self.count}")
        if self.fixed is not None and (
            len(self.fixed) != self.count or len(set(self.fixed)) != self.count
        ):
            raise ValueError(f"fixed devices {self.fixed} do not make {self.count} devices")


@dataclass(frozen=True)
class Plan:
    devices: Devices  # the placement chosen (sorted)
    required_by_device: Mapping[int, float]
    available_by_device: Mapping[int, float]  # before any unload, on the chosen devices
    total_by_device: Mapping[int, float]
    freeable_by_device: Mapping[int, float]  # what every unpinned candidate frees there
    victims: tuple[Candidate, ...]
    enough: bool
    # When not enough: the chosen device with the largest shortfall even after
    # unloading every unpinned model. None when enough.
    short_device: int | None
    # How many devices the host has: messages name devices only on a host of several.
    host_devices: int

    # Scalar views, summed over `devices` and rounded to 2 decimals: events,
    # messages and seed-compatible bodies.

    @property
    def required_gb(self) -> float:
        return _rounded_sum(self.required_by_device.values())

    @property
    def available_gb(self) -> float:
        return _rounded_sum(self.available_by_device.values())

    @property
    def total_gb(self) -> float:
        return _rounded_sum(self.total_by_device.values())

    @property
    def total_available_gb(self) -> float:
        """Free memory on the chosen devices if every unpinned model were unloaded."""
        return _rounded_sum([*self.available_by_device.values(), *self.freeable_by_device.values()])


def _on(candidate: Candidate, device: int) -> float:
    """What `candidate` holds on `device` (0 where it holds nothing)."""
    return candidate.held_gb.get(device, 0.0)


def _rounded_sum(values: Iterable[float]) -> float:
    return round(math.fsum(values), 2)


def _key(gb: float) -> float:
    """A figure as a sort key: float noise must not break ties between equal sums."""
    return round(gb, 6)


# ---- victims on one device set --------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """One device set the model could go on, and what is free there."""

    per_device_gb: float
    available: Mapping[int, float]  # the set's devices only

    def short(self, victims: Sequence[Candidate]) -> Devices:
        """The set's devices still in deficit once `victims` are unloaded."""
        return tuple(
            device
            for device, free in self.available.items()
            if free + math.fsum(_on(v, device) for v in victims) < self.per_device_gb
        )

    def frees(self, candidate: Candidate) -> float:
        """What `candidate` frees on the devices in deficit before any unload."""
        return math.fsum(_on(candidate, device) for device in self.short(()))

    def covers(self, candidate: Candidate) -> bool:
        """Whether unloading `candidate` alone covers every deficit."""
        return not self.short((candidate,))


def _helps(candidate: Candidate, short: Devices) -> bool:
    return any(_on(candidate, device) > 0 for device in short)


def _take_until_covered(target: _Target, ordered: Sequence[Candidate]) -> tuple[Candidate, ...]:
    chosen: list[Candidate] = []
    for candidate in ordered:
        short = target.short(chosen)
        if not short:
            break
        if _helps(candidate, short):
            chosen.append(candidate)
    return tuple(chosen)


def _largest_first(target: _Target, movable: Sequence[Candidate]) -> tuple[Candidate, ...]:
    ordered = sorted(movable, key=lambda c: (-_key(target.frees(c)), c.name))
    return _take_until_covered(target, ordered)


def _least_recently_used(target: _Target, movable: Sequence[Candidate]) -> tuple[Candidate, ...]:
    ordered = sorted(movable, key=lambda c: (c.last_used, -_key(target.frees(c)), c.name))
    return _take_until_covered(target, ordered)


def _smallest_sufficient(target: _Target, movable: Sequence[Candidate]) -> tuple[Candidate, ...]:
    sufficient = [c for c in movable if target.covers(c)]
    if sufficient:
        return (min(sufficient, key=lambda c: (_key(c.total_gb), c.name)),)
    return _largest_first(target, movable)


_Policy = Callable[[_Target, Sequence[Candidate]], tuple[Candidate, ...]]

_POLICIES: dict[EvictionPolicy, _Policy] = {
    EvictionPolicy.LARGEST_FIRST: _largest_first,
    EvictionPolicy.LRU: _least_recently_used,
    EvictionPolicy.SMALLEST_SUFFICIENT: _smallest_sufficient,
}


def _victims(
    target: _Target, candidates: Sequence[Candidate], policy: EvictionPolicy
) -> tuple[Candidate, ...] | None:
    """What to unload so the model fits on `target`: () when it already fits,
    None when even every unpinned candidate there would not be enough."""
    short = target.short(())
    if not short:
        return ()
    movable = [c for c in candidates if not c.pinned and _helps(c, short)]
    if target.short(movable):
        return None
    return _POLICIES[policy](target, movable)


# ---- choosing the device set ----------------------------------------------------------


@dataclass(frozen=True)
class _Option:
    """One device set, planned."""

    devices: Devices
    victims: tuple[Candidate, ...] | None  # None: it cannot fit there
    leftover_gb: float  # free minus need over the set, after unloading the victims
    possible_gb: float  # free plus what every unpinned candidate frees, over the set


def _device_sets(need: Need, host: Devices) -> list[Devices]:
    if need.fixed is not None:
        unknown = sorted(set(need.fixed) - set(host))
        if unknown:
            raise ValueError(f"devices {unknown} are not on this host {host}")
        return [tuple(sorted(need.fixed))]
    if need.count > len(host):
        raise ValueError(f"{need.count} devices asked, this host has {len(host)}")
    return list(itertools.combinations(host, need.count))


def _freeable(device: int, candidates: Sequence[Candidate]) -> float:
    return math.fsum(_on(c, device) for c in candidates if not c.pinned and _on(c, device) > 0)


def _option(
    devices: Devices,
    need: Need,
    available_gb: Mapping[int, float],
    candidates: Sequence[Candidate],
    policy: EvictionPolicy,
) -> _Option:
    target = _Target(need.per_device_gb, {d: available_gb[d] for d in devices})
    victims = _victims(target, candidates, policy)
    unloaded = victims or ()
    leftover = math.fsum(
        available_gb[d] + math.fsum(_on(v, d) for v in unloaded) - need.per_device_gb
        for d in devices
    )
    possible = math.fsum(available_gb[d] + _freeable(d, candidates) for d in devices)
    return _Option(devices, victims, leftover, possible)


def _choose(options: Sequence[_Option]) -> _Option:
    free_fits = [o for o in options if o.victims == ()]
    if free_fits:
        return min(free_fits, key=lambda o: (_key(o.leftover_gb), o.devices))
    fits = [o for o in options if o.victims]
    if fits:
        return min(
            fits,
            key=lambda o: (
                len(o.victims or ()),
                _key(math.fsum(v.total_gb for v in o.victims or ())),
                _key(o.leftover_gb),
                o.devices,
            ),
        )
    return min(options, key=lambda o: (-_key(o.possible_gb), o.devices))


def _short_device(
    devices: Devices,
    per_device_gb: float,
    available: Mapping[int, float],
    freeable: Mapping[int, float],
) -> int:
    """The device with the largest shortfall after unloading everything unpinned."""
    return min(devices, key=lambda d: (-_key(per_device_gb - available[d] - freeable[d]), d))


def plan(
    need: Need,
    available_gb: Mapping[int, float],
    total_gb: Mapping[int, float],
    candidates: Sequence[Candidate],
    policy: EvictionPolicy = EvictionPolicy.LARGEST_FIRST,
) -> Plan:
    """Where `need` goes and the victims that make it fit there, or, when it fits
    nowhere, the closest set with no victims (see the module docstring).

    `available_gb` and `total_gb` map every device of the host (index -> GB).
    """
    host = tuple(sorted(available_gb))
    missing = sorted(set(host) - set(total_gb))
    if missing:
        raise ValueError(f"no total memory for devices {missing}")
    options = [
        _option(devices, need, available_gb, candidates, policy)
        for devices in _device_sets(need, host)
    ]
    chosen = _choose(options)
    devices = chosen.devices
    available = {d: available_gb[d] for d in devices}
    freeable = {d: _freeable(d, candidates) for d in devices}
    enough = chosen.victims is not None
    return Plan(
        devices=devices,
        required_by_device=dict.fromkeys(devices, need.per_device_gb),
        available_by_device=available,
        total_by_device={d: total_gb[d] for d in devices},
        freeable_by_device=freeable,
        victims=chosen.victims or (),
        enough=enough,
        short_device=None
        if enough
        else _short_device(devices, need.per_device_gb, available, freeable),
        host_devices=len(host),
    )
