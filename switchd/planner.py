"""Eviction planning: which running models to unload so the target fits.

Pure: figures in, a Plan out. The scheduler measures, this decides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from switchd.config import EvictionPolicy


@dataclass(frozen=True)
class Candidate:
    name: str
    held_gb: float
    last_used: float  # epoch seconds; 0 when never used
    pinned: bool = False


@dataclass(frozen=True)
class Plan:
    required_gb: float
    available_gb: float
    total_gb: float
    victims: tuple[Candidate, ...]
    freeable_gb: float  # what every unpinned candidate together would free

    @property
    def enough(self) -> bool:
        return self.available_gb + sum(v.held_gb for v in self.victims) >= self.required_gb

    @property
    def total_available_gb(self) -> float:
        """Free memory if every unpinned model were unloaded."""
        return round(self.available_gb + self.freeable_gb, 2)


def _take_until_enough(ordered: Sequence[Candidate], deficit: float) -> tuple[Candidate, ...]:
    chosen: list[Candidate] = []
    freed = 0.0
    for candidate in ordered:
        if freed >= deficit:
            break
        chosen.append(candidate)
        freed += candidate.held_gb
    return tuple(chosen)


def _largest_first(candidates: Sequence[Candidate], deficit: float) -> tuple[Candidate, ...]:
    ordered = sorted(candidates, key=lambda c: (-c.held_gb, c.name))
    return _take_until_enough(ordered, deficit)


def _least_recently_used(candidates: Sequence[Candidate], deficit: float) -> tuple[Candidate, ...]:
    ordered = sorted(candidates, key=lambda c: (c.last_used, -c.held_gb, c.name))
    return _take_until_enough(ordered, deficit)


def _smallest_sufficient(candidates: Sequence[Candidate], deficit: float) -> tuple[Candidate, ...]:
    sufficient = [c for c in candidates if c.held_gb >= deficit]
    if sufficient:
        return (min(sufficient, key=lambda c: (c.held_gb, c.name)),)
    return _largest_first(candidates, deficit)


_POLICIES: dict[EvictionPolicy, Callable[[Sequence[Candidate], float], tuple[Candidate, ...]]] = {
    EvictionPolicy.LARGEST_FIRST: _largest_first,
    EvictionPolicy.LRU: _least_recently_used,
    EvictionPolicy.SMALLEST_SUFFICIENT: _smallest_sufficient,
}


def plan(
    required_gb: float,
    available_gb: float,
    total_gb: float,
    candidates: Sequence[Candidate],
    policy: EvictionPolicy = EvictionPolicy.LARGEST_FIRST,
) -> Plan:
    """Victims that make `required_gb` fit, or none when nothing would be enough.

    Pinned candidates are never chosen. When even unloading every unpinned
    candidate would not free enough, nothing is unloaded: a switch that cannot
    succeed must not take other models down on its way to failing.
    """
    movable = [c for c in candidates if not c.pinned]
    freeable = sum(c.held_gb for c in movable)
    deficit = required_gb - available_gb
    if deficit <= 0 or available_gb + freeable < required_gb:
        victims: tuple[Candidate, ...] = ()
    else:
        victims = _POLICIES[policy](movable, deficit)
    return Plan(required_gb, available_gb, total_gb, victims, freeable)
