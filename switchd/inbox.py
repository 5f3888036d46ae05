"""What the runtime reports (an engine's output line, an exit), applied by the scheduler.

Only the scheduler's tasks (its worker and the jobs it runs) change model state:
a report is queued by `deliver` and applied between steps and at every wait
inside one (`pause`), and only by the task that owns its model (`owner_of`: the
job acting on it, else anyone). So a report can never change a state that a
step has read and is about to act on, whatever other jobs run meanwhile. A
report about an engine being loaded goes to that load (`Inbox.loads`): its
lines become the job's `log` events, its exit fails it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from switchd.catalog import Catalog, ModelRecord
from switchd.emitter import Emitter
from switchd.jobs import Job
from switchd.runtime.base import EngineExited, EngineOutput, RuntimeEvent
from switchd.states import ModelState
from switchd.units import iso_timestamp


@dataclass
class Load:
    """A load in progress: whose job reports it, and its engine's exit if it died."""

    job: Job
    record: ModelRecord
    instance: str
    health_url: str
    exited: EngineExited | None = None

    def concerns(self, model: str, instance: str) -> bool:
        return (model, instance) == (self.record.spec.name, self.instance)


class Inbox:
    def __init__(self, catalog: Catalog, emitter: Emitter) -> None:
        self._catalog = catalog
        self._emitter = emitter
        self._reports: deque[RuntimeEvent] = deque()
        self._reported = asyncio.Event()
        # Set by the loader while it waits for an engine, by model: a load runs beside
        # the switch under way when it needs no room (switchd.scheduler).
        self.loads: dict[str, Load] = {}
        # The task whose reports a model's are (the job acting on it), or None: any.
        self.owner_of: Callable[[str], asyncio.Task[Any] | None] = lambda model: None

    def deliver(self, event: RuntimeEvent) -> None:
        """Queue a runtime report for the worker (called by the runtime's watcher)."""
        self._reports.append(event)
        self._reported.set()

    def apply(self) -> None:
        """Handle every queued report this task may: those about models it acts on,
        or that no job acts on. The rest wait for their owner's next call."""
        self._reported.clear()  # an owner that waits was woken too: it applies its own
        me = asyncio.current_task()
        kept: deque[RuntimeEvent] = deque()
        while self._reports:
            event = self._reports.popleft()
            owner = self.owner_of(event.model)
            if owner is not None and owner is not me and not owner.done():
                kept.append(event)
            elif isinstance(event, EngineOutput):
                self._on_output(event)
            else:
                self._on_exit(event)
        self._reports = kept

    async def pause(self, seconds: float, until: asyncio.Event | None = None) -> bool:
        """Wait up to `seconds` (or until `until` is set), applying reports as they come;
        True when a report cut the wait short."""
        waits = [asyncio.ensure_future(self._reported.wait())]
        if until is not None:
            waits.append(asyncio.ensure_future(until.wait()))
        try:
            await asyncio.wait(waits, timeout=max(0.0, seconds), return_when="FIRST_COMPLETED")
        finally:
            for waiting in waits:
                waiting.cancel()
        reported = self._reported.is_set()
        self.apply()
        return reported

    def _on_output(self, event: EngineOutput) -> None:
        load = self.loads.get(event.model)
        if load is not None and load.concerns(event.model, event.instance):
            self._emitter.emit_log(load.job, event.model, event.line)

    def _on_exit(self, event: EngineExited) -> None:
        load = self.loads.get(event.model)
        if load is not None and load.concerns(event.model, event.instance):
            load.exited = event  # the load fails with the engine's last lines
            return
        record = self._catalog.records.get(event.model)
        if record is None or record.engine is None or record.engine.instance != event.instance:
            return  # an engine switchd already stopped, or one from an earlier run
        if record.state not in (ModelState.RUNNING, ModelState.LOADING, ModelState.SLEEPING):
            return  # STOPPING: the job stopping it sees it go
        # RUNNING or SLEEPING, or LOADING when found so at start-up and its job has not begun.
        record.last_exit = exit_summary(event)
        lines = "\n".join(event.last_lines[-5:])
        asleep = " while asleep" if record.state is ModelState.SLEEPING else ""
        error = f"{event.reason} outside switchd{asleep}" + (f":\n{lines}" if lines else "")
        failed = event.exit_code not in (0, None)
        new = ModelState.FAILED if failed else ModelState.EXITED
        self._catalog.transition(record, record.state, new, error=error)


def exit_summary(event: EngineExited) -> dict[str, Any]:
    return {"exit_code": event.exit_code, "reason": event.reason, "at": iso_timestamp(time.time())}
