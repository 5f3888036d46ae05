"""`switchd gateway` and `switchd agent`: the cluster's two commands.

`ray` is imported only once one of them runs with Ray (`--address`), so that
`switchd serve` never loads it, and a host without the `cluster` extra gets one
line saying what to install.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import uvicorn

from switchd.config import ConfigError, parse_listen
from switchd.proxy import one_line_for_cut_offs

COMMANDS = ("gateway", "agent")
NO_RAY = "switchd: the cluster needs Ray: pip install 'switchd[cluster]'"


def add_commands(commands: Any) -> None:
    gateway = commands.add_parser(
        "gateway", help="one front door for several switchd hosts (Ray, or --host-url)"
    )
    gateway.add_argument(
        "--address", help="the Ray cluster to join (`auto`: the one this machine is in)"
    )
    gateway.add_argument(
        "--host-url",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="a host without Ray (repeat it): a fixed list instead of Ray's directory",
    )
    gateway.add_argument("--listen", default="127.0.0.1:8090", help="HOST:PORT (127.0.0.1:8090)")
    gateway.add_argument("--namespace", default="switchd", help="Ray namespace of the agents")
    gateway.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    agent = commands.add_parser(
        "agent", help="start this host's agent in the Ray cluster (then exit; Ray keeps it)"
    )
    agent.add_argument("--address", default="auto", help="the Ray cluster (default: auto)")
    agent.add_argument("--name", required=True, help="this host's name in the cluster")
    agent.add_argument("--url", required=True, help="this host's switchd as the gateway reaches it")
    agent.add_argument("--namespace", default="switchd", help="Ray namespace of the agents")
    agent.add_argument("--stop", action="store_true", help="stop this host's agent instead")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(args, "log_level", "info").upper(),
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # A host dying mid-answer is one warning line, not a traceback (as in `serve`).
    logging.getLogger("uvicorn.error").addFilter(one_line_for_cut_offs)
    if args.command == "agent":
        return agent(args)
    return gateway(args)


def agent(args: argparse.Namespace) -> int:
    try:
        from switchd.cluster import ray_directory  # noqa: PLC0415 (ray is optional)
    except ImportError:
        print(NO_RAY, file=sys.stderr)
        return 2
    ray_directory.connect(args.address, args.namespace)
    try:
        if args.stop:
            stopped = ray_directory.stop_agent(args.name, args.namespace)
            print(f"agent {args.name}: {'stopped' if stopped else 'none was running'}")
            return 0
        key = os.environ.get("SWITCHD_API_KEY")
        ray_directory.start_agent(args.name, args.url, key, namespace=args.namespace)
        print(f"agent {args.name} started for {args.url}")
        return 0
    finally:
        import ray  # noqa: PLC0415

        ray.shutdown()


def static_hosts(pairs: list[str]) -> dict[str, str]:
    hosts = {}
    for pair in pairs:
        name, sep, url = pair.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise ConfigError("--host-url", "", f"{pair!r} is not NAME=http://HOST:PORT")
        hosts[name] = url.rstrip("/")
    return hosts


def gateway(args: argparse.Namespace) -> int:
    from switchd.cluster.directory import Directory, StaticDirectory  # noqa: PLC0415
    from switchd.cluster.gateway import create_gateway  # noqa: PLC0415

    try:
        host, port = parse_listen("--listen", args.listen)
        directory: Directory
        if args.host_url:
            key = os.environ.get("SWITCHD_API_KEY")
            directory = StaticDirectory(static_hosts(args.host_url), key)
        else:
            try:
                from switchd.cluster.ray_directory import RayDirectory  # noqa: PLC0415
            except ImportError:
                print(NO_RAY, file=sys.stderr)
                return 2
            directory = RayDirectory(args.address or "auto", args.namespace)
    except ConfigError as error:
        print(f"switchd: {error}", file=sys.stderr)
        return 2
    uvicorn.run(
        create_gateway(directory),
        host=host,
        port=port,
        log_level=args.log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=3,
    )
    return 0
