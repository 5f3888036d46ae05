"""Runs every benchmark and writes their tables to docs/benchmarks.md.

Each benchmark runs alone as `python -m bench.NAME` (with `--quick` when given
here), bounded by a time limit; its stdout (its heading with the machine, the
command and the date, its tables and what each means) becomes its section.
A benchmark that fails gets a section saying so, with the end of its output,
and the report exits non-zero. Run: `.venv/bin/python -m bench.report [--quick]
[--only NAME ...] [--output PATH]` (`make bench` runs it; `make bench QUICK=1`
with `--quick`).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import bench
from bench.server import machine

REPO_ROOT = Path(bench.__file__).resolve().parents[1]
# In this order: the quick ones first. (name, seconds allowed, seconds allowed with --quick)
BENCHMARKS = [
    ("status", 120, 60),
    ("switch_overhead", 180, 90),
    ("fanout", 300, 150),
    ("proxy", 900, 600),  # a first run installs LiteLLM (minutes)
    ("contention", 400, 150),
    ("fairness", 300, 120),
    ("gateway", 300, 120),
    ("hung_engine", 120, 60),
]


def run(name: str, quick: bool, limit: float) -> tuple[str, bool, float]:
    """The benchmark's stdout (or why it failed), whether it passed, and its seconds."""
    command = [sys.executable, "-m", f"bench.{name}", *(["--quick"] if quick else [])]
    print(f"== bench.{name}{' --quick' if quick else ''}", file=sys.stderr, flush=True)
    started = time.monotonic()
    # A session of its own, so a benchmark past its limit goes with everything it
    # started (switchd, nginx, LiteLLM); switchd's engines die with switchd.
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        seconds = time.monotonic() - started
        return failed(name, f"it ran past its {limit:g} s limit", stderr), False, seconds
    seconds = time.monotonic() - started
    sys.stderr.write(stderr)
    if process.returncode != 0:
        why = f"it exited with status {process.returncode}"
        return failed(name, why, stderr), False, seconds
    return stdout.strip(), True, seconds


def failed(name: str, why: str, stderr: str) -> str:
    tail = "\n".join(stderr.strip().splitlines()[-15:])
    return f"## bench.{name}\n\nFailed: {why}.\n\n```\n{tail}\n```"


def revision() -> str:
    """The commit measured, and whether switchd's code differed from it."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "outside a git checkout"
    dirty = git("status", "--porcelain", "--", "switchd")
    return f"commit {commit}" + (" with uncommitted changes to switchd/" if dirty else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="every benchmark with --quick")
    parser.add_argument(
        "--only", nargs="+", choices=[name for name, _, _ in BENCHMARKS], help="just these"
    )
    parser.add_argument(
        "--output", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md", help="the report"
    )
    args = parser.parse_args()
    sections, failures, total = [], [], 0.0
    for name, limit, quick_limit in BENCHMARKS:
        if args.only and name not in args.only:
            continue
        text, passed, seconds = run(name, args.quick, quick_limit if args.quick else limit)
        total += seconds
        sections.append(f"{text}\n\n(Ran in {seconds:.0f} s.)")
        if not passed:
            failures.append(name)
    command = " ".join([".venv/bin/python -m bench.report", *sys.argv[1:]])
    intro = (
        "# Benchmarks\n\n"
        f"Written by `make bench` (`{command}`) on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"in {total / 60:.1f} minutes, on {machine()}, at {revision()}. Each section is "
        "one benchmark's own output: run it alone with the command it names (each takes "
        "`--quick`), and see the docstring at the top of its file in `bench/` for what "
        "exactly it does. Everything runs on this one machine over loopback, client and "
        "servers sharing its CPUs: the ratios between columns say more than the absolute "
        "figures."
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n\n".join([intro, *sections]) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)
    if failures:
        print(f"failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
