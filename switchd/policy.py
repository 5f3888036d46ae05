"""Who gets the GPU next when requests want models that do not fit together.

Pure: figures in, decisions out; the scheduler measures and acts. The policy
serves in batches with a starvation bound:

- A loaded model keeps the GPU while it has demand (requests in flight or
  waiting, or one finished within ACTIVE_GRACE_SECONDS).
- It must make room for another model's waiters only once it has had its turn:
  it has been resident at least its minimum residency (the larger of the
  configured floor and its learned load time: a switch that cost T seconds
  buys at least T seconds of service), and then either it has no demand or
  the other model's claim is older than the hold.
- A claim dates from when a model's demand began and continued
  (switchd/demand.py): clients that give up and send again do not restart it.
- The hold scales with what switching costs (`hold_seconds`): making way for a
  model costs the holder's stop (or sleep) and the model's load (or wake), S
  seconds, each as last measured; the holder then keeps the GPU for
  S * (1 - p) / p for a switching share p (`max_switching_share`), so that
  while models take turns, switches take at most p of the GPU's time (each
  turn is a switch and the hold it bought), clamped between
  `min_residency_seconds` and `max_hold_seconds`. Cheap switches switch often,
  expensive ones batch longer.
- Where a waiter's deadline is known, the holder makes room in time for the
  switch to finish before it (never before its residency is over).
- Among the waiting models, the one whose claim is oldest goes first (a higher
  `priority` breaks ties). Only that one may unload others; a later one may
  load only where it fits without unloading anything.

Guarantee: a model with demand is served within H + D + S of its claim for each
model ahead of it in line, where H is the hold (between `min_residency_seconds`
and `max_hold_seconds`, or a holder's own longer residency), D the drain of the
holder's requests in flight (at most `drain_timeout_seconds`) and S the switch.
"""

from __future__ import annotations

import math
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
    since: float  # when its claim began (switchd/demand.py)
    priority: int = 0


def yields_at(
    holder: Holder, wanted_since: float, hold_seconds: float, start_by: float = math.inf
) -> float:
    """The earliest time `holder` must make room for a claim dating from `wanted_since`,
    or by `start_by` (a waiter's deadline less the switch), whichever comes first.

    A time <= now means: now. It is recomputed whenever a request starts or
    ends, so a holder that gets busy again keeps the GPU until its hold ends.
    """
    resident_until = holder.ready_at + holder.min_residency_seconds
    hold_until = min(max(wanted_since, holder.ready_at) + hold_seconds, start_by)
    if holder.serving:
        return max(resident_until, hold_until)
    idle_from = holder.last_active + ACTIVE_GRACE_SECONDS
    return max(resident_until, min(idle_from, hold_until))


def hold_seconds(
    switch_seconds: float, share: float, min_hold_seconds: float, max_hold_seconds: float
) -> float:
    """How long a busy holder keeps the GPU while others wait, when making way costs
    `switch_seconds` in all: switches then take at most `share` of the GPU's time
    (a hold H after each switch S: S / (H + S) <= share), within the bounds. The
    upper bound wins where the two cross."""
    if share <= 0:
        return max_hold_seconds
    wanted = max(0.0, switch_seconds) * (1.0 - min(share, 1.0)) / share
    return min(max_hold_seconds, max(min_hold_seconds, wanted))


def order(wants: Iterable[Want]) -> list[Want]:
    """The oldest claim first; priority breaks ties; the name keeps it deterministic."""
    return sorted(wants, key=lambda w: (w.since, -w.priority, w.name))
