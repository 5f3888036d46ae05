"""`switchd serve | demo | status | switch | unload | reload | events | gateway | agent`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import logging
import os
import shlex
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import uvicorn

from switchd import __version__
from switchd.app import check_gpu, create_app
from switchd.client import run_client
from switchd.cluster import commands as cluster_commands
from switchd.config import ConfigError, LogFormat, Settings, load_settings, parse_listen
from switchd.follow import add_follow_arguments, follow_command
from switchd.gpu import GpuUnavailable
from switchd.logs import configure
from switchd.protocol import server_protocol, uvicorn_problem
from switchd.proxy import one_line_for_cut_offs
from switchd.runtime.base import RUNTIMES
from switchd.schema import schema_text

DEFAULT_URL = "http://127.0.0.1:8080"
GRACEFUL_SHUTDOWN_SECONDS = 5
PORTS_TRIED_FOR_A_HINT = 100  # after a busy port, the next free one is suggested

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def demo_config(gpus: int = 1) -> Path:
    """The demo's catalog: one 95.59 GB card, or (`--gpus 2`) two 47.79 GB cards."""
    name = "demo.yaml" if gpus == 1 else "demo-2gpu.yaml"
    return Path(str(resources.files("switchd.demo").joinpath(name)))


@contextlib.contextmanager
def demo_state(state_dir: str | None) -> Iterator[Path]:
    """`state_dir` as given, else a fresh temporary directory, removed on leaving.

    A demo run learns load times and footprints; in a directory of its own they
    do not leak into the next run.
    """
    if state_dir is not None:
        yield Path(state_dir).expanduser()
        return
    with tempfile.TemporaryDirectory(prefix="switchd-demo-", ignore_cleanup_errors=True) as fresh:
        yield Path(fresh)


def demo_settings(gpus: int, state_dir: Path) -> Settings:
    """The demo's settings, its learned state kept in `state_dir`."""
    return dataclasses.replace(load_settings(demo_config(gpus)), state_dir=state_dir)


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_error(host: str, port: int) -> OSError | None:
    """Why uvicorn could not listen on host:port, or None: bound and closed as it binds.

    Every address the host resolves to, with SO_REUSEADDR (and IPV6_V6ONLY), as
    asyncio's create_server does; an address family the host lacks is skipped.
    """
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return exc
    skipped: OSError | None = None
    bound = False
    for family, kind, proto, _, sockaddr in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL:
                    return exc
                skipped = exc
            else:
                bound = True
    return None if bound else skipped


def free_port_after(host: str, port: int) -> int:
    """The first port after `port` that `host` can listen on (else simply the next one)."""
    for candidate in range(port + 1, min(port + PORTS_TRIED_FOR_A_HINT, 65535) + 1):
        if bind_error(host, candidate) is None:
            return candidate
    return port + 1 if port < 65535 else port - 1


def cannot_listen(host: str, port: int, exc: OSError, elsewhere: str) -> str:
    """One line: the address is taken (and what to type instead), or why it cannot be had."""
    if exc.errno == errno.EADDRINUSE:
        other = address(host, free_port_after(host, port))
        return (
            f"switchd: {address(host, port)} is already in use; pick another address: "
            + elsewhere.replace("{listen}", other)
        )
    return f"switchd: cannot listen on {address(host, port)}: {exc.strerror or exc}"


def serve(
    settings: Settings,
    listen: str | None,
    insecure: bool,
    log_level: str,
    *,
    elsewhere: str = "switchd serve --listen {listen}",
    startup: str | None = None,
    log_format: str | None = None,
) -> int:
    """Serve until stopped: 0, or 1 if the server never started, or 2 after a refusal.

    `elsewhere` is what to type for another address (`{listen}` filled in), told
    when the port is taken; `startup` is logged once every check has passed.
    """
    host, port = (settings.host, settings.port)
    if listen is not None:
        host, port = parse_listen("--listen", listen)
    if not settings.api_keys and not is_loopback(host) and not insecure:
        print(
            f"switchd: refusing to listen on {host}:{port} without API keys; set api_keys "
            "(or SWITCHD_API_KEYS) or pass --insecure",
            file=sys.stderr,
        )
        return 2
    # uvicorn binds only after the app's start-up, which logs `switchd ready`: a port
    # already taken would show as an error after that line. Tried first instead.
    if (error := bind_error(host, port)) is not None:
        print(cannot_listen(host, port, error, elsewhere), file=sys.stderr)
        return 2
    if (unreachable := RUNTIMES[settings.runtime].preflight()) is not None:
        print(f"switchd: {unreachable}", file=sys.stderr)
        return 2
    try:
        # Only an opened GPU shows `gpus: [5]` on a 2-GPU host to be wrong: one clear
        # line now (main prints a ConfigError), not a traceback from the lifespan.
        asyncio.run(check_gpu(settings))
    except GpuUnavailable as exc:
        print(f"switchd: {exc}", file=sys.stderr)
        return 2
    if (problem := uvicorn_problem()) is not None:
        print(f"switchd: {problem}", file=sys.stderr)
        return 2
    app = create_app(settings)
    if startup is not None:
        log.info("%s", startup)
    chosen = LogFormat(log_format) if log_format else settings.log_format
    logs = configure(log_level, chosen)
    config = uvicorn.Config(
        app,
        log_config=logs,  # uvicorn's lines in switchd's format (None: as configured)
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        # switchd writes its own access log, with credentials masked (switchd/access.py).
        access_log=False,
        # Slow headers are cut off, and connections past the limit get 503 (limits.py).
        http=server_protocol(settings.header_read_timeout_seconds),
        limit_concurrency=settings.max_connections,
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down; landing
    # it in its own handler instead makes a SIGTERM stop an orderly exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, server.handle_exit)
    server.run()
    return 0 if server.started else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchd", description="Model-switching front door for LLM GPU hosts."
    )
    parser.add_argument("--version", action="version", version=f"switchd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_cmd = commands.add_parser("serve", help="serve the catalog of a config file")
    serve_cmd.add_argument("--config", "-c", required=True, help="path to switchd.yaml")
    demo_cmd = commands.add_parser("demo", help="serve the demo: a simulated GPU, 4 models")
    demo_cmd.add_argument(
        "--gpus", type=int, choices=[1, 2], default=1, help="one 96 GB card, or two 48 GB cards"
    )
    demo_cmd.add_argument(
        "--state-dir",
        metavar="DIR",
        help="keep learned times here (default: a fresh directory per run, removed at exit)",
    )
    for command in (serve_cmd, demo_cmd):
        command.add_argument("--listen", help="HOST:PORT (overrides the config's `listen`)")
        command.add_argument(
            "--insecure", action="store_true", help="allow a non-loopback address without keys"
        )
        command.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
        command.add_argument(
            "--log-format", choices=[f.value for f in LogFormat], help="overrides log_format"
        )

    client_parent = argparse.ArgumentParser(add_help=False)
    client_parent.add_argument(
        "--url",
        help=f"switchd's address: http://HOST:PORT or HOST:PORT (or SWITCHD_URL; {DEFAULT_URL})",
    )
    client_parent.add_argument(
        "--key", default=os.environ.get("SWITCHD_API_KEY"), help="API key (or SWITCHD_API_KEY)"
    )
    commands.add_parser("status", parents=[client_parent], help="models and GPU memory")
    switch_cmd = commands.add_parser(
        "switch", parents=[client_parent], help="switch to a model, showing each stage"
    )
    switch_cmd.add_argument("model")
    unload_cmd = commands.add_parser(
        "unload", parents=[client_parent], help="unload a model (`all`: every unpinned one)"
    )
    unload_cmd.add_argument("model")
    events_cmd = commands.add_parser(
        "events", parents=[client_parent], help="follow every event as JSON lines (collectors)"
    )
    add_follow_arguments(events_cmd)
    commands.add_parser(
        "reload", parents=[client_parent], help="read the config file again (live, as a diff)"
    )
    commands.add_parser("config-schema", help="print the JSON Schema of switchd.yaml")
    cluster_commands.add_commands(commands)
    return parser


def client_url(flag: str | None) -> tuple[str, str]:
    """switchd's address for a client command and where it came from, to name it if bad."""
    if flag is not None:
        return flag, "--url"
    if from_env := os.environ.get("SWITCHD_URL"):
        return from_env, "SWITCHD_URL"
    return DEFAULT_URL, "--url"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "config-schema":
        sys.stdout.write(schema_text())
        return 0
    if args.command == "events":
        return follow_command(args, client_url(args.url)[0])
    if args.command in ("status", "switch", "unload", "reload"):
        url, source = client_url(args.url)
        return run_client(args.command, url, args.key, getattr(args, "model", None), source)
    if args.command in cluster_commands.COMMANDS:
        return cluster_commands.run(args)
    configure(args.log_level, LogFormat(args.log_format or LogFormat.TEXT))
    logging.getLogger("uvicorn.error").addFilter(one_line_for_cut_offs)
    try:
        if args.command == "demo":
            return demo(args)
        settings = load_settings(Path(args.config))
        elsewhere = f"switchd serve --config {shlex.quote(args.config)} --listen {{listen}}"
        if args.insecure:
            elsewhere += " --insecure"
        return serve(
            settings,
            args.listen,
            args.insecure,
            args.log_level,
            elsewhere=elsewhere,
            log_format=args.log_format,
        )
    except ConfigError as error:
        print(f"switchd: bad configuration: {error}", file=sys.stderr)
        return 2


def demo(args: argparse.Namespace) -> int:
    command, make = "switchd demo --listen {listen}", "make demo LISTEN={listen}"
    if args.gpus != 1:
        command, make = f"{command} --gpus {args.gpus}", f"{make} GPUS={args.gpus}"
    if args.insecure:
        command += " --insecure"
    with demo_state(args.state_dir) as state_dir:
        kept = ", fresh for this run, removed at exit (--state-dir DIR keeps it)"
        if args.state_dir is not None:
            kept = ""
        return serve(
            demo_settings(args.gpus, state_dir),
            args.listen,
            args.insecure,
            args.log_level,
            elsewhere=f"{command} ({make})",
            startup=f"demo state (learned load times) in {state_dir}{kept}",
            log_format=args.log_format,
        )
