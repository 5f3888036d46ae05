"""Proxy overhead: the same demo engine reached directly, through switchd, nginx and LiteLLM.

Starts `switchd serve` with one stand-in engine (1,000 tokens/s) and loads it;
then, pointed at that same engine:
  - nginx, where `/usr/sbin/nginx` (or an `nginx` on PATH) exists: a plain
    reverse proxy from a generated config in a temporary folder (no daemon,
    one worker process like switchd's one process, HTTP/1.1 keep-alive
    upstream, `proxy_buffering off` so streams pass through as they come);
  - LiteLLM's proxy (`litellm[proxy]`), installed by this benchmark into its
    own virtual environment under `.bench-cache/` (kept between runs; the
    folder ignores itself for git), with the engine as an OpenAI-compatible
    model and a master key (it refuses to start without one). It keeps working
    in the background (logging, housekeeping), which took a fifth or more of the
    others' requests/s, so it is stopped (SIGSTOP) while they are measured and
    continued (SIGCONT) for its own turns; what it does in the pause after each
    of its own blocks still counts in its CPU.
Whichever cannot be had is skipped with the reason printed. Then in one run,
each target side by side:
  - latency of a small non-streamed chat completion, sequential (the targets
    taking turns, so drift hits all alike) and at 64 concurrent clients
    (p50/p99, and what each proxy adds to the direct figure), and requests/s
    at 64 concurrent clients (saturation: every target is CPU-bound there);
  - each proxy's CPU per request (its processes' scheduler time, from /proc), in
    the sequential part (after each block's pause: a cold start each time) and
    at 64 concurrent (busy: what it costs under load);
  - the delivered token rate of streamed answers (300 tokens; 500 without
    `--quick`) at 1, 16 and 128 concurrent streams: tokens over the time from
    the request to the stream's end, and each proxy's as a % of direct.
Everything (client, proxies, engine) shares this machine's CPUs, so the
ratios, not the absolute figures, are the result. Loopback only.
Run: `.venv/bin/python -m bench.proxy [--quick] [--no-nginx] [--no-litellm]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import yaml

import bench
from bench.server import cpu_seconds, free_port, heading, percentile, start_switchd, stop

MODEL = "bench-engine"
TOKENS_PER_SECOND = 1000
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
CONCURRENCY = 64
SEQUENTIAL_BLOCKS = 5  # turns per target in the sequential part
BLOCK_PAUSE_SECONDS = 0.3
STREAMS = (1, 16, 128)

REPO_ROOT = Path(bench.__file__).resolve().parents[1]
CACHE = REPO_ROOT / ".bench-cache"
LITELLM_VENV = CACHE / "litellm-venv"
LITELLM_PACKAGE = "litellm[proxy]"
INSTALL_SECONDS = 600
START_SECONDS = 120  # LiteLLM's proxy takes seconds to import
NGINX_PATHS = ("/usr/sbin/nginx", "nginx")


@dataclass
class Target:
    name: str
    base: str
    pids: list[int] = field(default_factory=list)  # whose CPU is its
    children: bool = False  # their children's CPU too (nginx's workers; not switchd's engine)
    headers: dict[str, str] = field(default_factory=dict)
    # Stopped (SIGSTOP) while the others are measured: it keeps working in the
    # background (LiteLLM: its logging and housekeeping), which took CPU from them.
    stopped_between: bool = False


@dataclass
class Figures:
    sequential: list[float] = field(default_factory=list)
    concurrent: list[float] = field(default_factory=list)
    throughput: float = 0.0
    cpu_ms: float | None = None  # per request, one at a time (sequential)
    busy_cpu_ms: float | None = None  # per request, at 64 concurrent
    streams: dict[int, float] = field(default_factory=dict)  # count -> tokens/s each


def start_engine_behind_switchd(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    engine = (
        "${PYTHON} -m switchd.demo.engine --port ${PORT} --model ${MODEL} "
        f"--load-seconds 0.2 --tokens-per-second {TOKENS_PER_SECOND}"
    )
    return start_switchd(folder, {MODEL: {"cmd": engine, "size_gb": 10}})


def tree(pid: int) -> list[int]:
    """`pid` and its live descendants (nginx's workers, say)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU of `pid` and its live descendants."""
    total = 0.0
    for member in tree(pid):
        with contextlib.suppress(OSError):
            total += cpu_seconds(member)
    return total


def turn_of(target: Target | None, targets: list[Target]) -> None:
    """`target` runs; every other target that is stopped between turns is stopped.
    None: every target runs (before they are stopped for good)."""
    for other in targets:
        if other.stopped_between:
            wanted = signal.SIGCONT if target in (other, None) else signal.SIGSTOP
            for pid in other.pids:
                for member in tree(pid):
                    with contextlib.suppress(OSError):
                        os.kill(member, wanted)


def wait_until_up(url: str, seconds: float, process: subprocess.Popen[bytes]) -> str | None:
    """None once `url` answers 200, else why not."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"it exited with status {process.returncode}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return None
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return f"it did not answer within {seconds:g} s"


# ---- nginx ---------------------------------------------------------------------


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
{user}pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream engine {{
        server {engine};
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def find_nginx() -> str | None:
    for candidate in NGINX_PATHS:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def start_nginx(
    folder: Path, engine: str
) -> tuple[subprocess.Popen[bytes] | None, Target | None, str]:
    """nginx in front of `engine` (host:port); the process, its target, or why not."""
    binary = find_nginx()
    if binary is None:
        return None, None, "no nginx (/usr/sbin/nginx or on PATH); `apt-get install nginx`"
    prefix = folder / "nginx"
    prefix.mkdir()
    port = free_port()
    # As root, nginx's workers would run as `nobody`, who cannot use this folder.
    user = f"user {getpass.getuser()};\n" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user=user, prefix=prefix, engine=engine, port=port))
    version = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    process = subprocess.Popen(
        [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    why = wait_until_up(f"{base}/v1/models", 20, process)
    if why is not None:
        stop(process, 5)
        log = (prefix / "error.log").read_text(errors="replace").strip().splitlines()
        return None, None, f"nginx did not start: {why}; {log[-1] if log else ''}"
    label = version.stderr.strip().removeprefix("nginx version: ") or "nginx"
    return process, Target("nginx", base, [process.pid], children=True), label


# ---- LiteLLM ---------------------------------------------------------------------


def litellm_binary() -> tuple[Path | None, str]:
    """LiteLLM's proxy in its cached venv, installed if needed; or None and why not."""
    binary = LITELLM_VENV / "bin" / "litellm"
    if binary.exists():
        return binary, "cached"
    CACHE.mkdir(exist_ok=True)
    (CACHE / ".gitignore").write_text("# made by bench/proxy.py: nothing here is source\n*\n")
    print(f"installing {LITELLM_PACKAGE} into {LITELLM_VENV}", file=sys.stderr)
    steps = [
        [sys.executable, "-m", "venv", str(LITELLM_VENV)],
        [
            str(LITELLM_VENV / "bin" / "pip"),
            "install",
            "--quiet",
            "--retries",
            "1",
            "--timeout",
            "30",
            LITELLM_PACKAGE,
        ],
    ]
    deadline = time.monotonic() + INSTALL_SECONDS
    for step in steps:
        try:
            done = subprocess.run(
                step,
                capture_output=True,
                text=True,
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
            )
        except subprocess.TimeoutExpired:
            shutil.rmtree(LITELLM_VENV, ignore_errors=True)
            return None, f"installing {LITELLM_PACKAGE} took over {INSTALL_SECONDS} s"
        if done.returncode != 0:
            shutil.rmtree(LITELLM_VENV, ignore_errors=True)
            lines = (done.stderr or done.stdout).strip().splitlines()
            return None, f"`{' '.join(step[:3])} …` failed: {lines[-1] if lines else '?'}"
    return (binary, "installed now") if binary.exists() else (None, "no litellm after install")


def start_litellm(
    folder: Path, engine: str
) -> tuple[subprocess.Popen[bytes] | None, Target | None, str]:
    binary, how = litellm_binary()
    if binary is None:
        return None, None, how
    key = f"sk-bench-{secrets.token_hex(16)}"
    config = {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {
                    "model": f"openai/{MODEL}",
                    "api_base": f"http://{engine}/v1",
                    "api_key": "none",
                },
            }
        ],
        "general_settings": {"master_key": key},
    }
    path = folder / "litellm.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = folder / "litellm.log"
    # The model cost map from the package, not fetched from the internet.
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(binary), "--config", str(path), "--host", "127.0.0.1", "--port", str(port)],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=folder,
        )
    base = f"http://127.0.0.1:{port}"
    why = wait_until_up(f"{base}/health/liveliness", START_SECONDS, process)
    if why is not None:
        stop(process, 5)
        lines = log.read_text(errors="replace").strip().splitlines()
        return None, None, f"LiteLLM did not start: {why}; {lines[-1] if lines else ''}"
    version = subprocess.run(
        [str(LITELLM_VENV / "bin" / "pip"), "show", "litellm"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    number = next((v.split()[-1] for v in version.splitlines() if v.startswith("Version")), "?")
    headers = {"Authorization": f"Bearer {key}"}
    target = Target("LiteLLM", base, [process.pid], True, headers, stopped_between=True)
    return process, target, f"LiteLLM {number} ({how})"


# ---- the load ----------------------------------------------------------------------


async def timed_chat(client: aiohttp.ClientSession, target: Target) -> float:
    started = time.perf_counter()
    async with client.post(
        f"{target.base}/v1/chat/completions", json=CHAT, headers=target.headers
    ) as response:
        response.raise_for_status()
        await response.read()
    return (time.perf_counter() - started) * 1000


def target_cpu(target: Target) -> float:
    if target.children:
        return sum(tree_cpu_seconds(pid) for pid in target.pids)
    return sum(cpu_seconds(pid) for pid in target.pids)


async def sequential(
    client: aiohttp.ClientSession, targets: list[Target], count: int, figures: list[Figures]
) -> None:
    """`count` requests to each target, one at a time, in blocks: the targets take
    turns block by block, so drift hits all alike, and a pause after each block lets
    a proxy's work left over from its requests (LiteLLM's logging, say) end before
    the next target's block; that work is counted in its CPU."""
    block = max(1, count // SEQUENTIAL_BLOCKS)
    cpu = [0.0 for _ in targets]
    done = 0
    while done < count:
        size = min(block, count - done)
        for index, target in enumerate(targets):
            turn_of(target, targets)
            before = target_cpu(target)
            for _ in range(size):
                figures[index].sequential.append(await timed_chat(client, target))
            await asyncio.sleep(BLOCK_PAUSE_SECONDS)
            cpu[index] += target_cpu(target) - before
        done += size
    for index, target in enumerate(targets):
        if target.pids:
            figures[index].cpu_ms = cpu[index] / count * 1000


async def concurrent(
    client: aiohttp.ClientSession, target: Target, workers: int, per_worker: int
) -> tuple[list[float], float]:
    samples: list[float] = []

    async def worker() -> None:
        for _ in range(per_worker):
            samples.append(await timed_chat(client, target))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return samples, len(samples) / (time.perf_counter() - started)


async def stream_rate(client: aiohttp.ClientSession, target: Target, tokens: int) -> float:
    """Tokens per second one streamed answer delivered: its `tokens` (the engine
    makes exactly that many) over the time from the request to the stream's end.
    Chunks are not counted: a proxy may merge or split them."""
    body = {**CHAT, "stream": True, "max_tokens": tokens, "ignore_eos": True}
    started = time.perf_counter()
    pieces = 0
    async with client.post(
        f"{target.base}/v1/chat/completions", json=body, headers=target.headers
    ) as response:
        response.raise_for_status()
        async for raw in response.content:
            if raw.startswith(b"data: {") and b'"content"' in raw:
                pieces += 1
    if not pieces:
        raise RuntimeError(f"{target.name}: a stream without content")
    return tokens / (time.perf_counter() - started)


async def streams(client: aiohttp.ClientSession, target: Target, count: int, tokens: int) -> float:
    """The mean rate of `count` concurrent streams (a lone stream: 3 in a row)."""
    rates: list[float] = []
    for _ in range(3 if count == 1 else 1):
        rates += await asyncio.gather(*(stream_rate(client, target, tokens) for _ in range(count)))
    return statistics.mean(rates)


async def measure(targets: list[Target], quick: bool) -> list[Figures]:
    figures = [Figures() for _ in targets]
    # The load generator is aiohttp: it needs about a third of httpx's CPU per
    # request, and every cycle it takes is one the engine and the proxies lack.
    # Idle connections dropped before any target's keep-alive timeout (uvicorn's
    # 5 s): reusing one a server is closing at that moment fails the request.
    connector = aiohttp.TCPConnector(limit=512, keepalive_timeout=3)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        # Warm-up: connections, imports, caches.
        await sequential(client, targets, 50, [Figures() for _ in targets])
        count = 200 if quick else 1000
        await sequential(client, targets, count, figures)
        per_worker = 5 if quick else 20
        for index, target in enumerate(targets):
            turn_of(target, targets)
            print(f"  {CONCURRENCY} concurrent: {target.name}", file=sys.stderr)
            before = target_cpu(target) if target.pids else 0.0
            latencies, rate = await concurrent(client, target, CONCURRENCY, per_worker)
            figures[index].concurrent, figures[index].throughput = latencies, rate
            if target.pids:
                used = target_cpu(target) - before
                figures[index].busy_cpu_ms = used / len(latencies) * 1000
        tokens = 300 if quick else 500
        for target in targets:  # warm-up: the streaming paths
            turn_of(target, targets)
            await streams(client, target, 4, 50)
        for count in STREAMS:
            for index, target in enumerate(targets):
                turn_of(target, targets)
                print(f"  {count} streams: {target.name}", file=sys.stderr)
                figures[index].streams[count] = await streams(client, target, count, tokens)
    return figures


def table(targets: list[Target], figures: list[Figures]) -> list[str]:
    names = [target.name for target in targets]
    rows = [
        "| measure | " + " | ".join(names) + " |",
        "|---|" + "--:|" * len(names),
    ]
    direct = figures[0]

    def latency_row(label: str, pick: str, fraction: float) -> str:
        floor = percentile(getattr(direct, pick), fraction)
        cells = []
        for figure in figures:
            value = percentile(getattr(figure, pick), fraction)
            cells.append(
                f"{value:.2f}" if figure is direct else f"{value:.2f} ({value - floor:+.2f})"
            )
        return f"| {label} | " + " | ".join(cells) + " |"

    for fraction, label in ((0.5, "p50"), (0.99, "p99")):
        rows.append(latency_row(f"sequential latency {label}, ms (added)", "sequential", fraction))
    for fraction, label in ((0.5, "p50"), (0.99, "p99")):
        rows.append(
            latency_row(
                f"{CONCURRENCY} concurrent latency {label}, ms (added)", "concurrent", fraction
            )
        )
    rows.append(
        f"| requests/s at {CONCURRENCY} concurrent (saturation) | "
        + " | ".join(f"{figure.throughput:,.0f}" for figure in figures)
        + " |"
    )
    for label, pick in (
        ("proxy CPU per request, sequential, ms", "cpu_ms"),
        (f"proxy CPU per request, {CONCURRENCY} concurrent, ms", "busy_cpu_ms"),
    ):
        values = [getattr(figure, pick) for figure in figures]
        rows.append(
            f"| {label} | "
            + " | ".join(
                "-" if figure is direct or value is None else f"{value:.2f}"
                for figure, value in zip(figures, values, strict=True)
            )
            + " |"
        )
    for count in STREAMS:
        floor = direct.streams[count]
        cells = [
            f"{figure.streams[count]:.0f}"
            if figure is direct
            else f"{figure.streams[count]:.0f} ({figure.streams[count] / floor:.0%})"
            for figure in figures
        ]
        rows.append(
            f"| stream rate, {count} concurrent, tokens/s each | " + " | ".join(cells) + " |"
        )
    return rows


def meaning(targets: list[Target], figures: list[Figures]) -> str:
    direct = percentile(figures[0].sequential, 0.5)
    parts = [
        f"{target.name} adds {percentile(figure.sequential, 0.5) - direct:.2f} ms to a request "
        f"and serves {figure.throughput:,.0f} requests/s"
        for target, figure in zip(targets[1:], figures[1:], strict=True)
    ]
    return (
        "Means: "
        + "; ".join(parts)
        + f" (direct: {figures[0].throughput:,.0f}/s). A real engine spends tens of "
        "milliseconds of GPU time per request, so what matters is the added latency and "
        "that streams keep their rate."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples, for a smoke run")
    parser.add_argument("--no-nginx", action="store_true", help="leave nginx out")
    parser.add_argument("--no-litellm", action="store_true", help="leave LiteLLM out")
    args = parser.parse_args()
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        process, url = start_engine_behind_switchd(folder)
        others: list[subprocess.Popen[bytes]] = []
        targets: list[Target] = []
        try:
            load = {"target_model": MODEL, "wait": "ready"}
            httpx.post(f"{url}/v1/models/switch", params=load, timeout=60).raise_for_status()
            status = httpx.get(f"{url}/v1/models/status").json()
            engine_url: str = status["models"][MODEL]["engine"]["url"]
            engine = engine_url.removeprefix("http://").rstrip("/")
            targets += [Target("direct", engine_url), Target("switchd", url, [process.pid])]
            starters = [
                ("nginx", args.no_nginx, start_nginx),
                ("LiteLLM", args.no_litellm, start_litellm),
            ]
            for label, left_out, starter in starters:
                if left_out:
                    notes.append(f"{label}: skipped: left out (--no-{label.lower()})")
                    continue
                print(f"starting {label}", file=sys.stderr)
                started, target, how = starter(folder, engine)
                if started is None or target is None:
                    notes.append(f"{label}: skipped: {how}")
                    continue
                others.append(started)
                targets.append(target)
                notes.append(f"{label}: {how}")
            figures = asyncio.run(measure(targets, args.quick))
        finally:
            turn_of(None, targets)  # a stopped process would not hear SIGTERM
            for other in others:
                stop(other, 10)
            stop(process)
    print(heading("## Proxy overhead: direct, switchd, nginx, LiteLLM", "bench.proxy"))
    print(
        f"One stand-in engine streaming {TOKENS_PER_SECOND} tokens/s, reached directly and "
        "through each proxy; client, proxies and engine share the CPUs. nginx: one worker, "
        "keep-alive upstream, `proxy_buffering off`.\n"
    )
    print("\n".join(f"- {note}" for note in notes) + "\n")
    print("\n".join(table(targets, figures)))
    print()
    print(meaning(targets, figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
