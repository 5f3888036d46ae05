"""`switchd serve | demo | status | switch | unload`."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import sys
from importlib import resources
from pathlib import Path

import uvicorn

from switchd import __version__
from switchd.app import check_gpu, create_app
from switchd.client import run_client
from switchd.config import ConfigError, RuntimeKind, Settings, load_settings, parse_listen
from switchd.gpu import GpuUnavailable
from switchd.limits import guarded_protocol
from switchd.proxy import one_line_for_cut_offs
from switchd.runtime.docker import DockerUnavailable, connect_docker

DEFAULT_URL = "http://127.0.0.1:8080"
GRACEFUL_SHUTDOWN_SECONDS = 5


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


def serve(settings: Settings, listen: str | None, insecure: bool, log_level: str) -> int:
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
    if settings.runtime is RuntimeKind.DOCKER:
        try:
            connect_docker().close()  # one clear line now, not a traceback from the lifespan
        except DockerUnavailable as exc:
            print(f"switchd: {exc}", file=sys.stderr)
            return 2
    try:
        # Only an opened GPU shows `gpus: [5]` on a 2-GPU host to be wrong: one clear
        # line now (main prints a ConfigError), not a traceback from the lifespan.
        asyncio.run(check_gpu(settings))
    except GpuUnavailable as exc:
        print(f"switchd: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        # switchd writes its own access log, with credentials masked (switchd/access.py).
        access_log=False,
        # Slow headers are cut off, and connections past the limit get 503 (limits.py).
        http=guarded_protocol(settings.header_read_timeout_seconds),
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
    for command in (serve_cmd, demo_cmd):
        command.add_argument("--listen", help="HOST:PORT (overrides the config's `listen`)")
        command.add_argument(
            "--insecure", action="store_true", help="allow a non-loopback address without keys"
        )
        command.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])

    client_parent = argparse.ArgumentParser(add_help=False)
    client_parent.add_argument(
        "--url", default=os.environ.get("SWITCHD_URL", DEFAULT_URL), help="switchd's address"
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("status", "switch", "unload"):
        return run_client(args.command, args.url, args.key, getattr(args, "model", None))
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    # One line per health poll drowns what matters; keep httpx to warnings.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").addFilter(one_line_for_cut_offs)
    path = demo_config(args.gpus) if args.command == "demo" else Path(args.config)
    try:
        settings = load_settings(path)
        return serve(settings, args.listen, args.insecure, args.log_level)
    except ConfigError as error:
        print(f"switchd: bad configuration: {error}", file=sys.stderr)
        return 2
