"""Demand: proxied requests waiting for a model that is not serving yet.

A waiter is a request with its arrival time and deadline, parked on a future
that the scheduler's worker resolves: with the engine once the request has
been admitted (counted in flight, so no job can unload the model under it),
or with the error that ends its wait. Only the scheduler touches this.

A model's claim to the GPU dates from when its demand began and continued, not
from its oldest waiter now: clients give up (a 30 s SDK timeout) and send the
same request again, and if each new waiter restarted the clock, a busy model
would hold the GPU for good whenever clients give up sooner than the hold. A
claim goes on while waiters follow one another with gaps of at most
CLAIM_GRACE_SECONDS, and ends when its waiters are served or refused.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from dataclasses import dataclass, field

from switchd.jobs import SwitchError
from switchd.runtime.base import EngineInfo


@dataclass(eq=False)
class Waiter:
    model: str
    arrived: float  # the scheduler's clock
    deadline: float
    future: asyncio.Future[EngineInfo] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def admitted(self) -> bool:
        return self.future.done() and not self.future.cancelled() and not self.future.exception()


# Clients that give up send again at once, or after a Retry-After of a few seconds:
# a gap this long between one waiter leaving and the next arriving continues a claim.
CLAIM_GRACE_SECONDS = 5.0


@dataclass
class Claim:
    """A model's continued demand: since when, and whether its waiters all left."""

    since: float  # the scheduler's clock
    lapsed_at: float | None = None  # when its last waiter gave up; None while any waits
    given_up: int = 0  # waiters that left unserved during this claim

    def lapsed(self, now: float) -> bool:
        return self.lapsed_at is not None and now - self.lapsed_at > CLAIM_GRACE_SECONDS


class Demand:
    """Waiters per model, each queue in arrival order, and each model's claim."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[Waiter]] = {}
        self._claims: dict[str, Claim] = {}
        self.given_up: Counter[str] = Counter()  # since start, per model

    def __len__(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def add(self, waiter: Waiter) -> None:
        self._queues.setdefault(waiter.model, deque()).append(waiter)
        claim = self._claims.get(waiter.model)
        if claim is None or claim.lapsed(waiter.arrived):
            self._claims[waiter.model] = Claim(waiter.arrived)
        else:
            claim.lapsed_at = None

    def remove(self, waiter: Waiter, now: float) -> None:
        """`waiter` gave up (its client left, or its deadline passed) unserved."""
        queue = self._queues.get(waiter.model)
        if queue is None or waiter not in queue:
            return
        queue.remove(waiter)
        self.given_up[waiter.model] += 1
        claim = self._claims.get(waiter.model)
        if claim is not None:
            claim.given_up += 1
            if not queue:
                claim.lapsed_at = now
        if not queue:
            del self._queues[waiter.model]

    def since(self, model: str) -> float | None:
        """When `model`'s claim began: its demand has continued since, through clients
        that gave up. None without a claim."""
        claim = self.claim(model)
        return claim.since if claim is not None else None

    def claim(self, model: str, now: float | None = None) -> Claim | None:
        claim = self._claims.get(model)
        if claim is not None and now is not None and claim.lapsed(now):
            del self._claims[model]
            return None
        return claim

    def models(self) -> list[str]:
        return list(self._queues)

    def waiting(self, model: str) -> int:
        return len(self._queues.get(model, ()))

    def oldest(self, model: str) -> float | None:
        queue = self._queues.get(model)
        return queue[0].arrived if queue else None

    def admit(self, model: str, engine: EngineInfo) -> int:
        """Hand `engine` to every waiter of `model`; returns how many were admitted."""
        admitted = 0
        self._claims.pop(model, None)  # met
        for waiter in self._queues.pop(model, deque()):
            if not waiter.future.done():
                waiter.future.set_result(engine)
                admitted += 1
        return admitted

    def fail(self, model: str, error: SwitchError) -> int:
        """End the wait of every waiter of `model` with (a copy of) `error`."""
        failed = 0
        self._claims.pop(model, None)  # answered, if not served
        for waiter in self._queues.pop(model, deque()):
            if not waiter.future.done():
                waiter.future.set_exception(error.copy())
                failed += 1
        return failed

    def earliest_deadline(self, model: str) -> float | None:
        queue = self._queues.get(model)
        return min(waiter.deadline for waiter in queue) if queue else None

    def fail_late(self, model: str, now: float, ready_at: float, error: SwitchError) -> int:
        """End the wait, with `error`, of every waiter of `model` whose deadline comes
        before `ready_at`: told now that it cannot be served in time, not at its
        deadline. Its claim goes on for the rest, and for the same clients' retries."""
        queue = self._queues.get(model)
        if not queue:
            return 0
        late = [waiter for waiter in queue if waiter.deadline < ready_at]
        for waiter in late:
            queue.remove(waiter)
            if not waiter.future.done():
                waiter.future.set_exception(error.copy())
        if not queue:
            del self._queues[model]
            claim = self._claims.get(model)
            if claim is not None:
                claim.lapsed_at = now
        return len(late)

    def fail_all(self, error: SwitchError) -> None:
        for model in self.models():
            self.fail(model, error)
