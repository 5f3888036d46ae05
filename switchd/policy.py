"""Who gets the GPU next when requests want models that do not fit together.

Pure: figures in, decisions out; the scheduler measures and acts. The policy
serves in batches with a starvation bound:

- A loaded model keeps the GPU while it has demand (requests in flight or
  waiting, or one finished within ACTIVE_GRACE_SECONDS).
- It must make room for another model's waiters only once it has had its turn:
  it has been resident at least its minimum residency (the larger of the
  configured floor and its learned load time: a switch that cost T seconds
  buys at least T seconds of service), and then either it has no demand or
  the others have waited `max_hold_seconds`.
- Among the waiting models, the one whose oldest waiter has waited longest
  goes first (a higher `priority` breaks ties). Only that one may unload
  others; a later one may load only where it fits without unloading anything.

- The hold scales with the cost of the switch it would cause: a wanted model
  that sleeps and wakes in W seconds, against a cold load of L, waits at most
  max_hold_seconds * W / L (`hold_seconds`). A cheap switch makes small batches
  worth it; a cold one keeps the full hold.

Guarantee: a waiter waits at most one hold (the larger of the minimum
residency and max_hold_seconds), plus the drain, plus one switch, for each
model ahead of it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

ACTIVE_GRACE_SECONDS = 0.5  # a model used this recently still has demand


@dataclass(frozen=True)
class Holder:
    """A loaded model that might have to make room."""

    name: str
    ready_at: float  # when it became ready (the scheduler's clock)
    min_residency_seconds: float
    in_flight: int
    waiting: int
    last_active: float  # when its last request ended (or it became ready)

    @property
    def serving(self) -> bool:
        return bool(self.in_flight or self.waiting)


@dataclass(frozen=True)
class Want:
    """A model with requests waiting for it to load."""

    name: str
    oldest: float  # arrival of its oldest waiter
    priority: int = 0


def yields_at(holder: Holder, wanted_since: float, max_hold_seconds: float) -> float:
    """The earliest time `holder` must make room for demand waiting since `wanted_since`.

    A time <= now means: now. It is recomputed whenever a request starts or
    ends, so a holder that gets busy again keeps the GPU until its hold ends.
    """
    resident_until = holder.ready_at + holder.min_residency_seconds
    hold_until = max(wanted_since, holder.ready_at) + max_hold_seconds
    if holder.serving:
        return max(resident_until, hold_until)
    idle_from = holder.last_active + ACTIVE_GRACE_SECONDS
    return max(resident_until, min(idle_from, hold_until))


def hold_seconds(max_hold_seconds: float, switch_seconds: float, cold_seconds: float) -> float:
    """How long demand waits for a busy holder when bringing its model in costs
    `switch_seconds` (a wake) instead of `cold_seconds` (a cold load)."""
    if cold_seconds <= 0 or switch_seconds >= cold_seconds:
        return max_hold_seconds
    return max_hold_seconds * max(0.0, switch_seconds) / cold_seconds


def order(wants: Iterable[Want]) -> list[Want]:
    """Longest-waiting first; priority breaks ties; the name keeps it deterministic."""
    return sorted(wants, key=lambda w: (w.oldest, -w.priority, w.name))
