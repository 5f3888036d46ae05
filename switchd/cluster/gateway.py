"""The front door of several switchd hosts: the same API as one switchd.

- `GET /v1/models/status`: every host's models in one body (fleet.py);
- `POST /v1/models/switch?target_model=M[&host=H]`: forwarded to `H`, or to
  the host routing picks for M (routing.py); its stream or JSON as that host
  sends it;
- `POST /v1/models/unload?model=M[&host=H]`: to `H`, or to the one host that
  holds M (several: 400 `host_required`, naming them);
- `GET /v1/switches/{id}[/events]`: asked of the host that ran the job;
- `GET /v1/events`: every host's events, merged (merged.py);
- the OpenAI routes: each request to the host routing picks for its `model`;
  that host's scheduler loads or switches if needed. A host that does not
  answer before its answer's headers is marked down and the request goes to
  the next host that has the model; one that dies later leaves the answer cut
  short as one switchd does when an engine dies (502 `engine_died` before the
  body; a JSON body without its last chunk; an event stream ended by an
  OpenAI-shaped `engine_died` error event).

Requests travel as plain HTTP to the chosen host (switchd's pooled upstream
client), the client's Authorization header with them: each host checks its own
keys. The answer names the host in `x-switchd-host`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from switchd import __version__, errors, sse
from switchd.app import Switchd, static_dir, ui_routes
from switchd.cluster.directory import Directory, HostSnapshot
from switchd.cluster.fleet import Change, Fleet, holders, known_models, merged_status
from switchd.cluster.merged import HostFollower, MergedEvents
from switchd.cluster.routing import rank
from switchd.proxy import (
    HOP_BY_HOP,
    LARGE_BODY,
    PATH_SAFE,
    ProxyError,
    checked_path,
    off_loop_if,
    relay_response,
    requested_model,
    without_hop_by_hop,
)
from switchd.routes import BadRequest, last_event_id
from switchd.upstream import Upstream, UpstreamError

MAX_BODY_BYTES = 16 << 20
ATTEMPTS = 3  # hosts tried for one request before it is refused
HOST_HEADER = b"x-switchd-host"
FORWARDED_NOT = HOP_BY_HOP | {b"expect"}

log = logging.getLogger(__name__)


class Gateway:
    """The gateway's state, owned by the app's lifespan."""

    def __init__(self, directory: Directory, interval: float = 0.5) -> None:
        self.directory = directory
        self.interval = interval
        self.fleet = Fleet()
        self.events = MergedEvents()
        self.upstream = Upstream(idle_seconds=30, connect_seconds=2)
        self.http = httpx.AsyncClient(timeout=10)
        self.followers: dict[str, HostFollower] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="gateway-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for follower in self.followers.values():
            await follower.stop()
        await self.upstream.close()
        await self.http.aclose()
        await self.directory.close()

    async def _watch(self) -> None:
        while True:
            try:
                async for snapshots in self.directory.watch(self.interval):
                    self.apply(self.fleet.update(snapshots))
                    await self._follow(snapshots)
            except asyncio.CancelledError:
                raise
            except Exception:  # the directory's engine hiccuped: keep the last view
                log.exception("reading the hosts failed; trying again")
                await asyncio.sleep(1.0)

    def apply(self, changes: list[Change]) -> None:
        for change in changes:
            state = "reachable" if change.reachable else "unreachable"
            message = f"host {change.host} is {state}"
            if change.reason:
                message += f": {change.reason}"
            log.info("%s", message)
            self.events.publish(
                "host_state",
                {"host": change.host, "state": state, "reason": change.reason, "message": message},
            )

    async def _follow(self, snapshots: list[HostSnapshot]) -> None:
        """One event follower per host with a URL; a new URL, a new follower."""
        wanted = {s.name: s.url for s in snapshots if s.url}
        for name in list(self.followers):
            if wanted.get(name) != self.followers[name].url:
                await self.followers.pop(name).stop()
        for name, url in wanted.items():
            if name not in self.followers:
                follower = HostFollower(name, url, self.events, self.http)
                follower.start()
                self.followers[name] = follower

    def host_failed(self, host: str, reason: str) -> None:
        self.apply(self.fleet.failed(host, reason))


def gateway_of(request: Request | Scope) -> Gateway:
    app = request.app if isinstance(request, Request) else request["app"]
    found: Gateway = app.state.gateway
    return found


# ---- forwarding -----------------------------------------------------------------------


def named(send: Send, host: str) -> Send:
    """`send`, with the host that answered in the answer's headers."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message["headers"], (HOST_HEADER, host.encode())]}
        await send(message)

    return wrapped


def target_of(scope: Scope, drop: tuple[str, ...] = ()) -> str:
    query = scope.get("query_string", b"").decode("latin-1")
    if drop and query:
        query = urlencode([(k, v) for k, v in parse_qsl(query, True) if k not in drop])
    return quote(scope["path"], safe=PATH_SAFE) + (f"?{query}" if query else "")


async def read_body(receive: Receive) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ProxyError(400, "client_gone", "The client went away")
        body += message.get("body", b"")
        if len(body) > MAX_BODY_BYTES:
            raise ProxyError(413, "request_too_large", f"Request body over {MAX_BODY_BYTES} bytes")
        if not message.get("more_body", False):
            return bytes(body)


async def forward(
    gateway: Gateway,
    scope: Scope,
    send: Send,
    hosts: list[str],
    *,
    body: bytes,
    what: str,
    loads: str | None = None,
) -> None:
    """Send the request to the first of `hosts` that answers and relay its answer;
    a host that does not answer at all is marked down and the next one is tried.
    `loads`: the model the request makes its host load, if it is not there yet."""
    headers = without_hop_by_hop(scope["headers"], FORWARDED_NOT)
    target = target_of(scope, drop=("host",))
    for name in hosts[:ATTEMPTS]:
        host = gateway.fleet.get(name)
        if host is None or not host.url:
            continue
        if loads is not None:
            # Before the answer: a request held while its model loads answers late.
            gateway.fleet.routed(name, loads)
        try:
            answer = await gateway.upstream.request(
                scope["method"], host.url, target, headers, body
            )
        except (UpstreamError, OSError) as exc:
            gateway.host_failed(name, f"a request got no answer: {exc!r}")
            continue
        try:
            await relay_response(named(send, name), answer, f"{what} on host {name}")
        finally:
            answer.release()
        return
    tried = ", ".join(hosts[:ATTEMPTS]) or "none"
    raise ProxyError(
        502, "host_unreachable", f"No host answered for {what} (tried: {tried})", "server_error"
    )


class OpenAIRoutes:
    """The engines' routes, past Starlette's router (as one switchd's proxy)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = gateway_of(scope)
        try:
            checked_path(scope["path"])
            body = await read_body(receive)
            model, _ = await off_loop_if(len(body) > LARGE_BODY, requested_model, body)
            choices = rank(model, gateway.fleet.view())
            if not choices:
                known = known_models(gateway.fleet.view())
                if not any(h.reachable for h in gateway.fleet.view()):
                    raise ProxyError(503, "no_host", "No host is reachable", "server_error", 2)
                raise ProxyError(
                    404,
                    "model_not_found",
                    f"Unknown model {errors.echoed(model)!r} on every reachable host; "
                    f"known: {', '.join(known)}",
                )
            hosts = [c.host for c in choices]
            name = choices[0].model
            await forward(gateway, scope, send, hosts, body=body, what=model, loads=name)
        except ProxyError as error:
            await error.response()(scope, receive, send)


# ---- switchd's own routes ---------------------------------------------------------------


async def health(request: Request) -> Response:
    hosts = gateway_of(request).fleet.view()
    up = sum(h.reachable for h in hosts)
    return JSONResponse(
        {"status": "ok", "version": __version__, "hosts": {"reachable": up, "total": len(hosts)}}
    )


async def models_status(request: Request) -> Response:
    return JSONResponse(merged_status(gateway_of(request).fleet.view()))


def model_object(name: str, model: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "owned_by": "switchd",
        "status": model.get("status"),
        "aliases": model.get("aliases", []),
        "host": model["host"],
        "loaded_on": model["loaded_on"],
    }


async def list_models(request: Request) -> Response:
    status = merged_status(gateway_of(request).fleet.view())
    data = [model_object(name, model) for name, model in status["models"].items()]
    return JSONResponse({"object": "list", "data": data})


async def one_model(request: Request) -> Response:
    status = merged_status(gateway_of(request).fleet.view())
    wanted = request.path_params["model"]
    for name, model in status["models"].items():
        if wanted == name or wanted in (model.get("aliases") or ()):
            return JSONResponse(model_object(name, model))
    message = f"The model {wanted!r} does not exist on any reachable host"
    return errors.openai_error(404, "model_not_found", message)


async def passthrough(
    request: Request, hosts: list[str], body: bytes, what: str, loads: str | None = None
) -> Response:
    """Forward to the first of `hosts` that answers; the answer is sent from here."""
    gateway = gateway_of(request)
    scope, send = request.scope, request._send
    try:
        await forward(gateway, scope, send, hosts, body=body, what=what, loads=loads)
    except ProxyError as error:
        return errors.switchd_error(error.status, error.code, error.message)
    return Sent()


class Sent(Response):
    """The answer went out already (relayed): nothing more to send."""

    def __init__(self) -> None:
        super().__init__()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return None


def unknown_host(name: str, gateway: Gateway) -> Response:
    hosts = ", ".join(h.name for h in gateway.fleet.view()) or "none"
    return errors.switchd_error(404, "host_not_found", f"No host {name!r}; hosts: {hosts}")


def unreachable_host(name: str) -> Response:
    return errors.switchd_error(
        503, "host_unreachable", f"Host {name!r} is unreachable", {"Retry-After": "2"}
    )


async def switch(request: Request) -> Response:
    gateway = gateway_of(request)
    body = await request.body()
    target = request.query_params.get("target_model") or request.query_params.get("model")
    if target is None and body:
        with contextlib.suppress(ValueError):
            target = (await request.json()).get("target_model")
    if not target:
        return errors.switchd_error(400, "missing_parameter", "target_model is required")
    hosts = gateway.fleet.view()
    if (host := request.query_params.get("host")) is not None:
        chosen = gateway.fleet.get(host)
        if chosen is None:
            return unknown_host(host, gateway)
        if not chosen.reachable:
            return unreachable_host(host)
        return await passthrough(request, [host], body, target, loads=target)
    choices = rank(target, hosts)
    if not choices:
        known = known_models(hosts)
        return errors.switchd_error(
            404, "model_not_found", f"Unknown model {errors.echoed(target)!r}", known_models=known
        )
    hosts_in_order = [c.host for c in choices]
    return await passthrough(request, hosts_in_order, body, target, loads=choices[0].model)


async def unload(request: Request) -> Response:
    gateway = gateway_of(request)
    body = await request.body()
    model = request.query_params.get("model")
    if not model:
        return errors.switchd_error(400, "missing_parameter", "model is required")
    if (host := request.query_params.get("host")) is not None:
        chosen = gateway.fleet.get(host)
        if chosen is None:
            return unknown_host(host, gateway)
        return await passthrough(request, [host], body, model)
    views = gateway.fleet.view()
    where = [h.name for h in views if h.reachable] if model == "all" else holders(model, views)
    if len(where) > 1:
        return errors.switchd_error(
            400,
            "host_required",
            f"{model} is on several hosts; name one with host= ({', '.join(where)})",
            hosts=where,
        )
    if not where:
        where = [c.host for c in rank(model, views)][:1]
    if not where:
        return errors.switchd_error(
            404, "model_not_found", f"Unknown model {errors.echoed(model)!r}"
        )
    return await passthrough(request, where, body, model)


async def find_job(gateway: Gateway, job: str) -> str | None:
    """The host that ran `job` (job ids are unique): each reachable host is asked."""

    async def ask(host: HostSnapshot) -> str | None:
        try:
            answer = await gateway.http.get(f"{host.url}/v1/switches/{quote(job, safe='')}")
        except httpx.HTTPError:
            return None
        return host.name if answer.status_code == 200 else None

    found = await asyncio.gather(*(ask(h) for h in gateway.fleet.view() if h.reachable))
    return next((name for name in found if name is not None), None)


async def job_route(request: Request) -> Response:
    gateway = gateway_of(request)
    host = request.query_params.get("host") or await find_job(gateway, request.path_params["job"])
    if host is None:
        return errors.switchd_error(404, "job_not_found", "No reachable host knows that job")
    return await passthrough(request, [host], b"", f"job {request.path_params['job']}")


async def list_jobs(request: Request) -> Response:
    gateway = gateway_of(request)

    async def ask(host: HostSnapshot) -> list[dict[str, Any]]:
        try:
            answer = await gateway.http.get(
                f"{host.url}/v1/switches", params=dict(request.query_params)
            )
            jobs: list[dict[str, Any]] = answer.json().get("switches", [])
        except (httpx.HTTPError, ValueError, AttributeError):
            return []
        return [{**job, "host": host.name} for job in jobs]

    found = await asyncio.gather(*(ask(h) for h in gateway.fleet.view() if h.reachable))
    jobs = sorted((j for part in found for j in part), key=lambda j: str(j.get("created_at", "")))
    return JSONResponse({"switches": jobs[::-1]})


async def events(request: Request) -> Response:
    gateway = gateway_of(request)
    try:
        after = last_event_id(request)
    except BadRequest as bad:
        return bad.response

    def status() -> dict[str, Any]:
        return merged_status(gateway.fleet.view())

    stream: AsyncIterator[bytes] = gateway.events.stream(after, status)
    return StreamingResponse(stream, headers={k.decode(): v.decode() for k, v in sse.HEADERS})


def create_gateway(directory: Directory, interval: float = 0.5) -> Switchd:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        gateway = Gateway(directory, interval)
        app.state.gateway = gateway
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    routes = [
        Route("/health", health),
        Route("/v1/models", list_models),
        Route("/v1/models/status", models_status),
        Route("/v1/models/switch", switch, methods=["POST"]),
        Route("/v1/models/unload", unload, methods=["POST"]),
        Route("/v1/models/{model:path}", one_model),
        Route("/v1/switches", list_jobs),
        Route("/v1/switches/{job}", job_route),
        Route("/v1/switches/{job}/events", job_route),
        Route("/v1/events", events),
        *ui_routes(static_dir()),
    ]
    # Engine calls go straight to OpenAIRoutes, as one switchd's go to its proxy.
    return Switchd(engine_calls=OpenAIRoutes(), routes=routes, lifespan=lifespan)
