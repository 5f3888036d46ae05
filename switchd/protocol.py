"""switchd's HTTP/1.1 server protocol: uvicorn's httptools protocol, plus what
switchd needs from the connection itself.

- Headers that never finish are cut off: uvicorn has no timeout for a request's
  headers, so 300 connections sending a byte now and then (slowloris) would stay
  open forever. A connection whose request headers are not complete within
  `header_timeout_seconds` is closed, with a log line.
- A small answer leaves in one write (`ResponseTransport`), and a connection
  closed with bytes its client never takes is cut off.
- What the connection knows of its client (`ClientState`): that it left, told to
  whoever asked, so the proxy needs no task per request waiting on `receive()`
  for an `http.disconnect`; and that a request's body is all in. And a way to
  give up on a client that stopped reading.
- That the server stops: uvicorn asks every open connection to shut down
  (`shutdown()`), and an event stream on it is told, so it ends properly at once
  rather than holding up the graceful shutdown (`watch_stopping`).

All of this subclasses uvicorn's httptools protocol, which is no public API:
pyproject.toml bounds uvicorn to the versions it was checked with, and
`uvicorn_problem` says in one line, before serving, what an installed uvicorn lacks.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.metadata
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.types import Receive, Scope

if TYPE_CHECKING:  # imported where subclassed, after `uvicorn_problem` could say why not
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

# The uvicorn versions switchd's protocol was checked with: pyproject.toml's bound too.
UVICORN_SUPPORTED = ">=0.30,<0.56"
HTTPTOOLS_IMPL = "uvicorn.protocols.http.httptools_impl"
# What SwitchdProtocol overrides or calls of uvicorn's HttpToolsProtocol.
UVICORN_NEEDED = (
    "connection_made",
    "connection_lost",
    "on_message_begin",
    "on_headers_complete",
    "shutdown",
)

# The scope extension under which a request finds its connection's ClientState.
CLIENT_STATE = "switchd.client"

# A connection closed with answer bytes still unsent is cut off after this long: a
# client that stopped reading (an event stream's watcher let go) never takes them,
# and a plain close would wait for it, holding the socket and its buffer for good.
UNSENT_CLOSE_SECONDS = 5.0


class ClientState:
    """What switchd's protocol knows of a connection's client, for the request it
    serves now: whether it left (and a call back when it does), and whether the
    request's body has all arrived.

    A request asks through its scope (`client_state`) rather than through
    `receive()`: that would take a task per request waiting for the
    `http.disconnect` (measured: a creation, two steps and a turn of the loop).
    """

    __slots__ = ("_callback", "_protocol", "_stop_callback", "gone", "stopping")

    def __init__(self, protocol: HttpToolsProtocol) -> None:
        # Until the client leaves: the protocol holds this too, and a cycle would keep
        # a closed connection's objects until a full garbage collection.
        self._protocol: HttpToolsProtocol | None = protocol
        self._callback: Callable[[], None] | None = None
        self._stop_callback: Callable[[], None] | None = None
        self.gone = False
        self.stopping = False  # the server stops: what it answers now should end

    def on_leave(self, callback: Callable[[], None] | None) -> None:
        """Call `callback` once if the client leaves from now on; None: no longer."""
        self._callback = callback
        if callback is not None and self._protocol is not None:
            # A connection not read from cannot show its end (uvicorn pauses reading
            # behind a pipelined request); `receive()` resumes it the same way.
            self._protocol.flow.resume_reading()

    def on_stop(self, callback: Callable[[], None] | None) -> None:
        """Call `callback` once if the server stops from now on; None: no longer."""
        self._stop_callback = callback

    def stop(self) -> None:
        self.stopping = True
        callback, self._stop_callback = self._stop_callback, None
        if callback is not None:
            callback()

    def body_arrived(self) -> bool:
        """The request's whole body is in, so `receive()` gives it without waiting.
        False, to be safe, while pipelined requests queue (`cycle` is then theirs)."""
        protocol = self._protocol
        if protocol is None:
            return False
        cycle = protocol.cycle
        return cycle is not None and not cycle.more_body and not protocol.pipeline

    def drop(self) -> None:
        """Give up on the client (it stopped reading): its connection is closed, the
        bytes it never took cut off after a while (ResponseTransport), and uvicorn
        knows it gone, so the answer left unfinished is not logged as the app's error."""
        protocol = self._protocol
        if protocol is None:
            return  # it left already
        if protocol.pipeline:  # `cycle` is a queued request's, not the one answered
            protocol.transport.close()
            return
        protocol.cycle.disconnected = True
        protocol.cycle.transport.close()

    def left(self) -> None:
        self.gone = True
        self._protocol = None
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


def client_state(scope: Scope) -> ClientState | None:
    """The request's ClientState, where switchd's protocol serves it (not in tests
    that call the app in-process, nor under another server)."""
    state: ClientState | None = scope.get("extensions", {}).get(CLIENT_STATE)
    return state


def watch_leaving(
    scope: Scope, receive: Receive, callback: Callable[[], None]
) -> Callable[[], object] | None:
    """Call `callback` once if the request's client leaves; gives what stops the
    watching, or None when the client has left already.

    Told by switchd's protocol (ClientState) where it serves the request; under
    another server (tests in-process), by a task waiting on `receive()` for the
    `http.disconnect`.
    """
    client = client_state(scope)
    if client is None:

        async def wait_for_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            callback()

        return asyncio.create_task(wait_for_disconnect()).cancel
    if client.gone:
        return None
    client.on_leave(callback)
    return functools.partial(client.on_leave, None)


def watch_stopping(scope: Scope, callback: Callable[[], None]) -> Callable[[], object] | None:
    """Call `callback` once if the server stops while it answers this request (at
    once if it does already); gives what stops the watching, or None where no
    switchd protocol serves the request (tests in-process: they stop it themselves)."""
    client = client_state(scope)
    if client is None:
        return None
    if client.stopping:
        callback()
        return None
    client.on_stop(callback)
    return functools.partial(client.on_stop, None)


def uvicorn_problem(module_name: str = HTTPTOOLS_IMPL) -> str | None:
    """Why the installed uvicorn cannot carry switchd's protocol, in one line; None
    when it has all that `server_protocol` subclasses."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        lacks = f"no {module_name} ({exc})"
    else:
        base = getattr(module, "HttpToolsProtocol", None)
        if base is None:
            lacks = f"no HttpToolsProtocol in {module_name}"
        else:
            missing = [name for name in UVICORN_NEEDED if not callable(getattr(base, name, None))]
            if not missing:
                return None
            lacks = f"an HttpToolsProtocol without {', '.join(missing)}"
    try:
        installed = importlib.metadata.version("uvicorn")
    except importlib.metadata.PackageNotFoundError:
        installed = "(not installed)"
    return (
        f"switchd needs uvicorn{UVICORN_SUPPORTED}; the installed uvicorn {installed} has {lacks}"
    )


def server_protocol(
    header_timeout_seconds: float, unsent_close_seconds: float = UNSENT_CLOSE_SECONDS
) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with the header timeout, each response's writes
    through a ResponseTransport, and a ClientState in each request's scope."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # noqa: PLC0415 - after uvicorn_problem

    class SwitchdProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        # When the headers being read began (loop time); None when none are pending.
        _headers_since: float | None = None
        _client: ClientState | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._client = ClientState(self)
            self._headers_begun()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._headers_begun()

        def on_headers_complete(self) -> None:
            self._headers_since = None  # its timer, if any, finds nothing to do
            extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
            extensions[CLIENT_STATE] = self._client
            before = self.cycle
            super().on_headers_complete()
            if self.cycle is not before:  # (an upgrade makes no cycle)
                self.cycle.transport = ResponseTransport(
                    self.transport, self.loop, unsent_close_seconds
                )

        def shutdown(self) -> None:
            # uvicorn stops (SIGTERM): an event stream answering on this connection
            # ends properly now; uvicorn closes the connection once it has.
            super().shutdown()
            if self._client is not None:
                self._client.stop()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)
            if self._client is not None:
                self._client.left()

        def _headers_begun(self) -> None:
            # One timer per connection, checked when it fires, rather than one set
            # and cancelled for every request on a kept connection.
            self._headers_since = self.loop.time()
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(
                    header_timeout_seconds, self._check_headers
                )

        def _check_headers(self) -> None:
            self._header_timer = None
            if self._headers_since is None:
                return  # the next request's first byte sets it again
            left = self._headers_since + header_timeout_seconds - self.loop.time()
            if left > 0:  # these headers began after the timer was set
                self._header_timer = self.loop.call_later(left, self._check_headers)
            elif not self.transport.is_closing():
                where = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
                log.warning(
                    "closed the connection of %s: no complete request headers within %g s",
                    where,
                    header_timeout_seconds,
                )
                self.transport.close()

    return SwitchdProtocol


class ResponseTransport(asyncio.Transport):
    """What one response writes through (uvicorn's cycle has it as its transport).

    - Its status line and headers leave together with the first piece of its body,
      when that comes in the same turn of the loop. uvicorn writes the headers at
      once, then the body: two writes, two packets, and a client woken twice, for
      what is most often one small answer; measured on the proxy (bench/proxy.py),
      one write saves CPU on both sides. Headers alone still leave at the end of the
      loop's turn, so a stream that starts slowly is not held back.
    - Closed with bytes still unsent, the connection is cut off (abort) after
      `unsent_close_seconds` unless they went by then.
    """

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        unsent_close_seconds: float = UNSENT_CLOSE_SECONDS,
    ) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._unsent_close_seconds = unsent_close_seconds
        self._first = True
        self._held = b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        data = bytes(data)
        if self._first:  # the status line and headers
            self._first = False
            self._held = data
            self._loop.call_soon(self._flush)
        elif self._held:
            data, self._held = self._held + data, b""
            self._transport.write(data)
        else:
            self._transport.write(data)

    def _flush(self) -> None:
        held, self._held = self._held, b""
        if held and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()
        if self._transport.get_write_buffer_size():
            self._loop.call_later(self._unsent_close_seconds, self._cut_off)

    def _cut_off(self) -> None:
        if self._transport.get_write_buffer_size():  # (0 once it is all sent and closed)
            self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()
