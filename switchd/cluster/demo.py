"""`make demo-cluster`: three simulated hosts and a gateway, on one machine.

Three `switchd demo` processes (a simulated 95.59 GB card each, the demo's four
models), a one-node Ray cluster on loopback (one CPU, no dashboard, a 75 MB
object store) holding their three agents, and the gateway serving the UI and
the API at `--listen`. Without Ray installed, the gateway reads the three hosts
from a fixed list instead, and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import uvicorn

from switchd.cluster.directory import Directory, StaticDirectory
from switchd.cluster.gateway import create_gateway
from switchd.config import parse_listen
from switchd.runtime.process import free_port

HOSTS = ("gpu-a", "gpu-b", "gpu-c")
OBJECT_STORE_BYTES = 75 * 1024 * 1024

log = logging.getLogger("switchd.cluster.demo")


@contextlib.contextmanager
def demo_hosts() -> Iterator[dict[str, str]]:
    """Three `switchd demo` processes on free loopback ports; stopped on leaving."""
    processes: list[subprocess.Popen[bytes]] = []
    urls: dict[str, str] = {}
    try:
        for name in HOSTS:
            port = free_port()
            listen = f"127.0.0.1:{port}"
            command = [sys.executable, "-m", "switchd", "demo", "--listen", listen]
            processes.append(subprocess.Popen([*command, "--log-level", "warning"]))
            urls[name] = f"http://127.0.0.1:{port}"
        for url in urls.values():
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                time.sleep(0.1)
        yield urls
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


def ray_directory(urls: dict[str, str]) -> Directory | None:
    try:
        import ray  # noqa: PLC0415 (optional)

        from switchd.cluster import ray_directory as on_ray  # noqa: PLC0415
    except ImportError:
        return None
    ray.init(
        num_cpus=1,
        include_dashboard=False,
        object_store_memory=OBJECT_STORE_BYTES,
        namespace=on_ray.NAMESPACE,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    for name, url in urls.items():
        on_ray.start_agent(name, url)
    return on_ray.RayDirectory(None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:8080")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    host, port = parse_listen("--listen", args.listen)
    with demo_hosts() as urls:
        directory = ray_directory(urls)
        try:
            if directory is None:
                log.info("Ray is not installed (pip install 'switchd[cluster]'): a fixed host list")
                directory = StaticDirectory(urls)
            for name, url in urls.items():
                log.info("host %s: %s", name, url)
            log.info("the gateway, its UI and its API: http://%s:%d", host, port)
            uvicorn.run(
                create_gateway(directory),
                host=host,
                port=port,
                log_level="warning",
                access_log=False,
                lifespan="on",
            )
        finally:
            if "ray" in sys.modules:
                sys.modules["ray"].shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
