"""A config reload applied to the models: which join, which go, which restart.

switchd/reload.py reads the file and diffs it; the scheduler's worker hands each
diff here once no job runs. An added model joins the catalog. A removed one is
refused to new requests at once (404), its queued switches and waiters are
answered, and it is drained, unloaded and then dropped. A changed one keeps
serving and restarts when it is idle (or at once, if asked), loaded back if it
was running. The jobs this needs go through the scheduler (`Jobs`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Protocol

from switchd.catalog import HOLDING, Catalog
from switchd.config import ModelSpec, Settings
from switchd.demand import Demand
from switchd.jobs import Cause, Job, JobKind, SwitchError
from switchd.reload import Diff
from switchd.states import ModelState

log = logging.getLogger(__name__)


class Jobs(Protocol):
    """What applying a config change asks of the scheduler."""

    def enqueue(self, kind: JobKind, target: str, cause: Cause) -> Job: ...

    def drop_queued_switches(self, model: str, error: SwitchError) -> None: ...

    def acted_on(self, model: str) -> bool: ...


class ConfigChanges:
    def __init__(self, catalog: Catalog, demand: Demand, jobs: Jobs) -> None:
        self._catalog = catalog
        self._demand = demand
        self._jobs = jobs
        self._pending: deque[tuple[Diff, bool, asyncio.Future[None]]] = deque()
        self._respec: dict[str, tuple[ModelSpec, bool]] = {}  # changed: new spec, at once?
        self._restarting: dict[str, tuple[ModelSpec, bool]] = {}  # unloading: spec, load back?
        self._retiring: set[str] = set()  # removed from the config, unloading

    @property
    def pending(self) -> bool:
        """Reloads not applied yet: no job starts until they are."""
        return bool(self._pending)

    @property
    def restarts_waiting(self) -> bool:
        """Changed models waiting to be idle to restart."""
        return bool(self._respec)

    def submit(self, change: Diff, now: bool) -> asyncio.Future[None]:
        """Queue `change` for the worker; the future is done once it is applied."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((change, now, done))
        return done

    def cancel_pending(self) -> None:
        """switchd stops: the reloads never to be applied let their callers go."""
        while self._pending:
            self._pending.popleft()[2].cancel()

    def apply_pending(self) -> Settings | None:
        """Apply every queued reload, in order; returns the Settings now in force (the
        last applied), or None if none was."""
        applied: Settings | None = None
        while self._pending:
            change, now, done = self._pending.popleft()
            try:
                self._apply(change, now)
            except Exception as exc:  # a bug: said to the caller, the worker goes on
                log.exception("applying a config reload failed")
                done.set_exception(exc)
            else:
                applied = change.settings
                done.set_result(None)
        return applied

    def _apply(self, change: Diff, now: bool) -> None:
        new, records = change.settings, self._catalog.records
        for name in change.added:
            if name in self._retiring:  # removed by a reload before, still being unloaded
                self._retiring.discard(name)
                self._respec[name] = (new.models[name], now)
            else:
                self._catalog.add(new.models[name])
        for name in change.unchanged:  # its engine is kept; switchd-only fields apply now
            records[name].spec = new.models[name]
        for name in change.changed:
            record = records[name]
            if record.state in HOLDING or name in self._restarting:
                self._respec[name] = (new.models[name], now)
            else:
                record.spec = new.models[name]
        gone = SwitchError(
            "model_not_found", 404, "the model was removed from the config", {"removed": True}
        )
        for name in change.removed:
            self._respec.pop(name, None)
            self._restarting.pop(name, None)
            self._jobs.drop_queued_switches(name, gone)
            self._demand.fail(name, gone)
            if records[name].state in HOLDING:
                self._retiring.add(name)  # drained and unloaded, then removed
                self._jobs.enqueue(JobKind.UNLOAD, name, Cause.RELOAD)
            else:
                self._catalog.remove(name)
        self._catalog.configure(new)

    def queue_due_restarts(self) -> None:
        """Queue the restart of each changed model that is idle (or wanted at once)."""
        for name, (spec, now) in list(self._respec.items()):
            record = self._catalog.records[name]
            if name in self._restarting or self._jobs.acted_on(name):
                continue
            if record.state not in HOLDING:
                record.spec = spec
                del self._respec[name]
                continue
            if record.state not in (ModelState.RUNNING, ModelState.SLEEPING):
                continue  # loading or stopping: once it is settled
            if not now and (record.in_flight or self._demand.waiting(name)):
                continue
            del self._respec[name]
            self._restarting[name] = (spec, record.state is ModelState.RUNNING)
            log.info("restarting %s: its engine settings changed in the config", name)
            self._jobs.enqueue(JobKind.UNLOAD, name, Cause.RELOAD)

    def unloaded(self, name: str) -> None:
        """After a reload's unload: remove a retired model, or start a changed one anew."""
        record = self._catalog.records.get(name)
        if record is None:
            return
        if name in self._retiring:
            if record.state not in HOLDING:
                self._retiring.discard(name)
                self._catalog.remove(name)
            else:
                self._jobs.enqueue(JobKind.UNLOAD, name, Cause.RELOAD)  # failed: again
            return
        restart = self._restarting.pop(name, None)
        if restart is None:
            return
        spec, load_back = restart
        if record.state in HOLDING:
            self._respec.setdefault(name, (spec, False))  # not stopped: try again when idle
            return
        record.spec = spec
        if load_back:
            self._jobs.enqueue(JobKind.SWITCH, name, Cause.RELOAD)
