"""create_app(): the one place where routes, middleware and lifespan are wired.

The lifespan owns every client (GPU probe, runtime, HTTP client): nothing is
created at import time, and tests pass their own fakes in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from switchd import wire
from switchd.access import RequestLine, configured_secrets
from switchd.auth import BearerAuth
from switchd.catalog import ENGINE
from switchd.config import ConfigError, RuntimeKind, Settings, check_devices
from switchd.events import EventBus
from switchd.fanout import Shutdown
from switchd.gpu import GpuProbe, ledger_of, open_probe
from switchd.journal import Journal, first_id
from switchd.limits import BodyBudget
from switchd.llamacpp_api import ROUTES as LLAMACPP_ROUTES
from switchd.logs import JobLog
from switchd.memory_history import ROUTES as MEMORY_ROUTES
from switchd.memory_history import MemoryHistory
from switchd.metrics import Metrics
from switchd.proxy import Proxy, is_engine_call
from switchd.reload import Reloader, ReloadError
from switchd.routes import ROUTES, Services, http_error, proxy_context
from switchd.runtime.base import RUNTIMES, Runtime
from switchd.scheduler import Scheduler
from switchd.stats import LearnedStats
from switchd.units import gib
from switchd.upstream import Upstream

log = logging.getLogger(__name__)

# Proxied traffic: switchd's own lean HTTP/1.1 client (upstream.py). Streams can
# be slow and long, so no read timeout (a client that leaves closes its upstream
# request); no cap on connections either: each is one client's request, and those
# are capped by `max_connections`.
# An idle connection is not reused after this, before the engine closes it: uvicorn
# (so vLLM and SGLang) and llama.cpp's server close theirs after 5 s, and a request
# sent on a connection the engine is closing at that moment fails (502). Measured:
# a benchmark client that kept connections 15 s (aiohttp's default) hit exactly that.
UPSTREAM_IDLE_SECONDS = 4.0
UPSTREAM_CONNECT_SECONDS = 10.0


# The UI loads only its own files and talks only to switchd: nothing injected can run.
UI_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def static_dir() -> Path:
    """The UI's files: SWITCHD_STATIC_DIR (the image sets it), else the checkout's."""
    configured = os.environ.get("SWITCHD_STATIC_DIR")
    return Path(configured) if configured else Path(__file__).resolve().parents[1] / "static"


def ui_routes(ui: Path) -> list[BaseRoute]:
    """`/` and `/static/`: the browser UI, when its files are there."""
    if not (ui / "index.html").is_file():
        log.warning("no UI at %s (set SWITCHD_STATIC_DIR): serving the API only", ui)
        return []

    async def index(request: Request) -> FileResponse:
        return FileResponse(ui / "index.html", headers=UI_HEADERS)

    return [Route("/", index), Mount("/static", StaticFiles(directory=ui), name="static")]


def check_runtime(settings: Settings) -> None:
    """Refuse, before serving, a catalog its runtime cannot run."""
    choice = RUNTIMES[settings.runtime.value]
    missing = [s.name for s in settings.models.values() if not choice.runs(s)]
    if missing:
        raise ConfigError(
            settings.source,
            f"models.{missing[0]}",
            f"the {settings.runtime.value} runtime needs {choice.needs} for every model",
        )


async def open_runtime(settings: Settings) -> Runtime:
    return await RUNTIMES[settings.runtime.value].open(settings)


async def check_probe_devices(settings: Settings, probe: GpuProbe) -> None:
    """Only an opened probe knows NVML's devices: refuse models asking for others."""
    source_name = "NVML" if probe.source == "nvml" else "the simulated GPU"
    devices = (await probe.snapshot()).devices
    smallest = min((gib(d.total_bytes) for d in devices), default=None)
    check_devices(settings, len(devices), source_name, smallest)


async def check_gpu(settings: Settings) -> None:
    """Before serving: the GPU opens, and has the devices the models name."""
    probe = await open_probe(settings.gpu, settings.simulated_gpu)
    try:
        await check_probe_devices(settings, probe)
    finally:
        await probe.close()


def create_app(
    settings: Settings,
    *,
    runtime: Runtime | None = None,
    gpu: GpuProbe | None = None,
    http_transport: httpx.AsyncBaseTransport | None = None,
) -> Starlette:
    if runtime is None:
        check_runtime(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            probe = gpu or await open_probe(settings.gpu, settings.simulated_gpu)
            stack.push_async_callback(probe.close)
            await check_probe_devices(settings, probe)
            journal, bus = await open_journal(settings)
            if journal is not None:
                # Closed last: what the shutdown publishes is written too.
                stack.push_async_callback(asyncio.to_thread, journal.close)
            engines = runtime or await open_runtime(settings)
            if (
                runtime is None
                and settings.runtime is RuntimeKind.PROCESS
                and not settings.keep_engines_on_exit
            ):
                # Its engines stop with switchd: their model_state says so (journaled).
                stack.callback(lambda: stopped_engines(app))
            stack.push_async_callback(engines.close)
            # Health checks: a few requests a second during loads, injectable in tests.
            http = await stack.enter_async_context(httpx.AsyncClient(transport=http_transport))
            upstream = Upstream(
                idle_seconds=UPSTREAM_IDLE_SECONDS, connect_seconds=UPSTREAM_CONNECT_SECONDS
            )
            stack.push_async_callback(upstream.close)
            stats = LearnedStats(settings.state_dir)
            await stats.load()
            metrics = Metrics()
            bus.add_listener(metrics.observe)
            bus.add_listener(JobLog().observe)
            scheduler = Scheduler(
                settings,
                runtime=engines,
                gpu=probe,
                ledger=ledger_of(probe),
                bus=bus,
                stats=stats,
                http=http,
                on_wait=metrics.waited,
            )
            await scheduler.start()
            stack.push_async_callback(scheduler.close)
            app.state.memory_history = memory = MemoryHistory(probe)
            sampling = asyncio.create_task(memory.run(), name="switchd-memory-history")
            stack.push_async_callback(_cancelled, sampling)
            bodies = BodyBudget(settings.max_buffered_body_bytes)
            shutdown = Shutdown()
            shutdown.on_stopping.append(scheduler.stop)
            stack.callback(shutdown.close)
            app.state.services = Services(
                settings, scheduler, bus, metrics, upstream, bodies, shutdown, journal
            )

            async def validate(new: Settings) -> None:
                if runtime is None:
                    check_runtime(new)
                await check_probe_devices(new, probe)

            reloader = Reloader(lambda: scheduler.settings, scheduler.reload, validate, bus)
            app.state.reloader = reloader
            stack.callback(_on_sighup(reloader))
            log.info(
                "switchd ready: %d models, %s runtime, %s GPU",
                len(settings.models),
                settings.runtime.value,
                probe.source,
            )
            yield
        log.info("switchd stopped")

    layers = middleware(settings)
    return Switchd(
        routes=[*ROUTES, *LLAMACPP_ROUTES, *MEMORY_ROUTES, *ui_routes(static_dir())],
        middleware=layers,
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
        engine_calls=wrapped(Proxy(proxy_context), layers),
    )


async def open_journal(settings: Settings) -> tuple[Journal | None, EventBus]:
    """The bus, its ids past every journaled one, and the journal listening to it."""
    if not settings.journal_max_bytes:
        return None, EventBus()
    journal = Journal(settings.state_dir, settings.journal_max_bytes)
    found = await asyncio.to_thread(journal.open)
    bus = EventBus(first_id=first_id(found, time.time_ns() // 1000))
    journal.start(bus.last_id)
    bus.add_listener(journal.append)
    return journal, bus


def stopped_engines(app: Starlette) -> None:
    """After the runtime stopped the engines it owns: a `model_state` for each."""
    services: Services | None = getattr(app.state, "services", None)
    if services is None:
        return
    for record in services.scheduler.records.values():
        if record.state in ENGINE:
            data = {"model": record.spec.name, "from": record.state.value, "to": "exited"}
            services.bus.publish(wire.MODEL_STATE, {**data, "error": "switchd stopped"})


def _on_sighup(reloader: Reloader) -> Callable[[], None]:
    """Reload the config on SIGHUP (where the loop can take signals); returns the undo."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        with contextlib.suppress(ReloadError):  # logged and published by the reloader
            await reloader.reload()

    def on_signal() -> None:
        log.info("SIGHUP: reloading the config")
        task = loop.create_task(reload(), name="switchd-reload")
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_signal)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, Windows
        log.info("no SIGHUP handler here: reload with POST /v1/config/reload")
        return lambda: None

    def undo() -> None:
        loop.remove_signal_handler(signal.SIGHUP)

    return undo


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class Switchd(Starlette):
    """Starlette, with engine calls (`proxy.is_engine_call`) sent to the proxy under
    the same middleware, but past Starlette's error layer and router, which they
    never use: a layer less for every proxied request (bench/proxy.py)."""

    def __init__(self, *, engine_calls: ASGIApp, **options: Any) -> None:
        super().__init__(**options)
        self.engine_calls = engine_calls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_engine_call(scope):
            scope["app"] = self  # as Starlette does: routes.proxy_context reads it
            await self.engine_calls(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def wrapped(app: ASGIApp, layers: list[Middleware]) -> ASGIApp:
    """`app` under `layers`, outermost first, as Starlette stacks them."""
    for cls, args, kwargs in reversed(layers):
        app = cls(app, *args, **kwargs)
    return app


def middleware(settings: Settings) -> list[Middleware]:
    """Outermost first; all pure ASGI, so event streams pass through untouched."""
    stack = [Middleware(RequestLine, secrets=configured_secrets(settings))]
    if settings.cors_allow_origins:  # off unless origins are named
        stack.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_allow_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
            )
        )
    stack.append(
        Middleware(
            BearerAuth,
            keys=settings.api_keys,
            inference_keys=settings.inference_keys,
            read_keys=settings.read_keys,
        )
    )
    return stack
