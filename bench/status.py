"""Status latency: `GET /v1/models/status` on a real switchd, against `/health` and
against what a look inside a container costs.

Starts `switchd serve` with the simulated GPU and two demo engines running,
then times sequential keep-alive requests from one client. `/health` is the
floor (uvicorn + HTTP + the client); the ratio shows what building the status
body adds.

For scale, where a Docker daemon answers it also times `docker exec <container>
true`, the cheapest look inside a running container, both as the `docker` CLI
runs it and through the Docker API (docker-py's `exec_run`, as a supervisor
would call it). The container comes from an image imported from an empty tar
(no registry needed), with the host's /usr and /lib mounted read-only, running
`sleep`; it and its image are removed at the end. Without a daemon these rows
are skipped, and the reason printed.
Run: `.venv/bin/python -m bench.status [--quick] [--requests N]`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import docker
import docker.errors
import httpx

from bench.server import heading, percentile, start_switchd, stop

ENGINE = "${PYTHON} -m switchd.demo.engine --port ${PORT} --model ${MODEL} --load-seconds 0.2"
IMAGE_REPOSITORY = "switchd-bench-exec"
MOUNTS = ("/usr", "/lib", "/lib64", "/bin")
EXECS = 30
QUICK_EXECS = 10


def start_server(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    models = {
        name: {"cmd": ENGINE, "size_gb": size}
        for name, size in [("gpt-oss-20b", 24), ("mistral-7b-v0.1", 18), ("idle", 30)]
    }
    return start_switchd(folder, models)


def timings(client: httpx.Client, path: str, count: int) -> list[float]:
    for _ in range(50):  # warm-up: connections, caches
        client.get(path)
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        response = client.get(path)
        samples.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    return samples


def timed(call: Callable[[], object], count: int) -> list[float]:
    call()  # warm-up
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def empty_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w"):
        pass
    return buffer.getvalue()


def volumes() -> dict[str, dict[str, str]]:
    """The host's programs and libraries, read-only; a path inside another is left out."""
    chosen: list[Path] = []
    for name in MOUNTS:
        path = Path(name)
        if path.exists() and not any(path.is_relative_to(outer) for outer in chosen):
            chosen.append(path)
    return {str(path): {"bind": str(path), "mode": "ro"} for path in chosen}


def docker_exec(count: int) -> tuple[dict[str, list[float]], str]:
    """`docker exec <c> true` timings by the CLI and by the API, or none and why."""
    cli = shutil.which("docker")
    true, sleep = shutil.which("true"), shutil.which("sleep")
    if true is None or sleep is None:
        return {}, "no `true` or `sleep` on this machine"
    try:
        client = docker.from_env(version="auto", timeout=30)
        client.ping()
    except (docker.errors.DockerException, OSError) as exc:
        return {}, f"no Docker daemon answers ({exc})"
    tag = uuid.uuid4().hex[:12]
    image = f"{IMAGE_REPOSITORY}:{tag}"
    name = f"switchd-bench-exec-{tag}"
    try:
        client.api.import_image_from_data(empty_tar(), repository=IMAGE_REPOSITORY, tag=tag)
        container = client.containers.run(
            image, [sleep, "600"], name=name, detach=True, volumes=volumes()
        )
        results: dict[str, list[float]] = {}
        if cli is not None:
            argv = [cli, "exec", name, true]
            results["`docker exec <container> true` (CLI)"] = timed(
                lambda: subprocess.run(argv, check=True, capture_output=True), count
            )
        results["docker exec through the API (docker-py `exec_run`)"] = timed(
            lambda: container.exec_run([true]), count
        )
        version = client.version().get("Version", "?")
        how = f"Docker {version}" + ("" if cli else "; no `docker` CLI, so the API alone")
        return results, how
    except (docker.errors.DockerException, OSError, subprocess.CalledProcessError) as exc:
        return {}, f"Docker: {exc}"
    finally:
        with contextlib.suppress(docker.errors.DockerException):
            client.containers.get(name).remove(force=True)
        with contextlib.suppress(docker.errors.DockerException):
            client.images.remove(image, force=True)
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="500 requests, 10 execs")
    parser.add_argument("--requests", type=int, help="requests per route (default 2000)")
    args = parser.parse_args()
    requests: int = args.requests or (500 if args.quick else 2000)
    with tempfile.TemporaryDirectory() as folder:
        process, url = start_server(Path(folder))
        try:
            with httpx.Client(base_url=url, timeout=30) as client:
                for model in ("gpt-oss-20b", "mistral-7b-v0.1"):
                    params = {"target_model": model, "wait": "ready"}
                    client.post("/v1/models/switch", params=params).raise_for_status()
                health = timings(client, "/health", requests)
                status = timings(client, "/v1/models/status", requests)
        finally:
            stop(process)
    execs, docker_note = docker_exec(QUICK_EXECS if args.quick else EXECS)
    floor = percentile(health, 0.5)
    print(heading("## Status latency", "bench.status"))
    print(
        f"{requests} sequential keep-alive requests per route from one client (httpx), "
        "simulated GPU, 3 models (2 running). "
        + (
            f"Docker rows: {len(next(iter(execs.values())))} runs each; {docker_note}."
            if execs
            else f"Docker rows: skipped: {docker_note}."
        )
        + "\n"
    )
    print("| what | p50 ms | p99 ms | p50 / health |")
    print("|---|--:|--:|--:|")
    rows = [("`GET /health`", health), ("`GET /v1/models/status`", status), *execs.items()]
    for label, samples in rows:
        p50, p99 = percentile(samples, 0.50), percentile(samples, 0.99)
        print(f"| {label} | {p50:.3f} | {p99:.3f} | {p50 / floor:.2f} |")
    met = percentile(status, 0.50) <= 2.0
    print(f"\nTarget p50 <= 2 ms: {'met' if met else 'NOT met'}.\n")
    status_p50 = percentile(status, 0.5)
    scale = (
        f"; one `docker exec` costs {min(percentile(s, 0.5) for s in execs.values()):.0f} ms, "
        f"{min(percentile(s, 0.5) for s in execs.values()) / status_p50:.0f}x as much"
        if execs
        else ""
    )
    print(
        f"Means: a UI or script can poll `/v1/models/status` freely: {status_p50:.2f} ms "
        f"a call{scale}."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
