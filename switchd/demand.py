"""Demand: proxied requests waiting for a model that is not serving yet.

A waiter is a request with its arrival time and deadline, parked on a future
that the scheduler's worker resolves: with the engine once the request has
been admitted (counted in flight, so no job can unload the model under it),
or with the error that ends its wait. Only the scheduler touches this.
"""

from __future__ import annotations

import asyncio
from collections import deque
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


class Demand:
    """Waiters per model, each queue in arrival order."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[Waiter]] = {}

    def __len__(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def add(self, waiter: Waiter) -> None:
        self._queues.setdefault(waiter.model, deque()).append(waiter)

    def remove(self, waiter: Waiter) -> None:
        queue = self._queues.get(waiter.model)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self._queues[waiter.model]

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
        for waiter in self._queues.pop(model, deque()):
            if not waiter.future.done():
                waiter.future.set_result(engine)
                admitted += 1
        return admitted

    def fail(self, model: str, error: SwitchError) -> int:
        """End the wait of every waiter of `model` with (a copy of) `error`."""
        failed = 0
        for waiter in self._queues.pop(model, deque()):
            if not waiter.future.done():
                waiter.future.set_exception(error.copy())
                failed += 1
        return failed

    def fail_all(self, error: SwitchError) -> None:
        for model in self.models():
            self.fail(model, error)
