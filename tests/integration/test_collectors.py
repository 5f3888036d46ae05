"""Collectors: a real switchd, `switchd events` killed and restarted, switchd restarted
(with SIGTERM and with kill -9), and Debian's rsyslog parsing what the follower wrote."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from switchd.client import SseParser
from tests.integration.conftest import ServerFactory
from tests.integration.server import Server, seed_models

WAIT_SECONDS = 60.0


class Follower:
    """`python -m switchd events` with a cursor file, appending to one output file."""

    def __init__(self, server: Server, folder: Path) -> None:
        self.server = server
        self.output = folder / "events.jsonl"
        self.cursor = folder / "cursor"
        self.stderr = folder / "follower.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "switchd", "events", "--url", self.server.url]
        with self.output.open("ab") as out, self.stderr.open("ab") as err:
            self.process = subprocess.Popen(
                [*command, "--cursor-file", str(self.cursor)], stdout=out, stderr=err
            )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def connected(self) -> None:
        """Until its first connect's snapshot is written: it reads from there on."""
        wait_for(lambda: any(line["event"] == "snapshot" for line in self.lines()), "a snapshot")

    def lines(self) -> list[dict[str, Any]]:
        text = self.output.read_text() if self.output.exists() else ""
        return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def followers() -> Iterator[list[Follower]]:
    made: list[Follower] = []
    yield made
    for follower in made:
        if follower.process is not None and follower.process.poll() is None:
            follower.kill()


def wait_for(check: Callable[[], bool], what: str, within: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {within} s: {what}")


def switch(server: Server, model: str, *, wait: bool = True) -> str:
    params = {"target_model": model, **({"wait": "ready"} if wait else {})}
    response = httpx.post(f"{server.url}/v1/models/switch", params=params, timeout=60)
    assert response.status_code == 200, response.text
    job: str = response.json()["job"]
    return job


def job_finished(server: Server, job: str) -> bool:
    body = httpx.get(f"{server.url}/v1/switches/{job}", timeout=10).json()
    return body.get("finished") is not None


def journaled(server: Server) -> list[dict[str, Any]]:
    found = []
    for path in sorted((server.state_dir / "journal").glob("events-*.jsonl")):
        found += [json.loads(line) for line in path.read_text().splitlines()]
    return found


def ended(lines: list[dict[str, Any]], job: str) -> bool:
    return any(line.get("job") == job and line["event"] in ("result", "error") for line in lines)


def models() -> dict[str, Any]:
    return seed_models(load_seconds=1.0)


def test_a_follower_killed_and_switchd_restarted_lose_no_event(
    make_server: ServerFactory, followers: list[Follower], tmp_path: Path
) -> None:
    server = make_server(models(), log_format="json")
    follower = Follower(server, tmp_path)
    followers.append(follower)
    follower.start()
    follower.connected()
    jobs = [switch(server, "gpt-oss-20b")]
    # Killed mid-switch: the job loads while no follower reads.
    jobs.append(switch(server, "mistral-7b-v0.1", wait=False))
    follower.kill()
    wait_for(lambda: job_finished(server, jobs[-1]), "the switch ends")
    follower.start()
    jobs.append(switch(server, "gpt-oss-120b"))
    wait_for(lambda: ended(follower.lines(), jobs[-1]), "the follower caught up")
    first_run_log = server.log()
    # switchd restarted while the follower runs.
    assert server.stop() == 0
    server.start()
    jobs.append(switch(server, "deepseek-coder-33b-instruct"))
    # And again while no follower runs.
    follower.kill()
    assert server.stop() == 0
    server.start()
    jobs.append(switch(server, "gpt-oss-20b"))
    follower.start()
    wait_for(lambda: ended(follower.lines(), jobs[-1]), "the follower caught up after all")

    lines = follower.lines()
    seen = {(line["id"], line["event"]) for line in lines}
    on_disk = journaled(server)
    missing = [e for e in on_disk if (e["id"], e["event"]) not in seen]
    assert missing == [], f"{len(missing)} journaled events never reached the follower"
    for job in jobs:
        assert ended(lines, job), f"job {job}: no result line"
    ids = [line["id"] for line in lines if line["event"] not in ("snapshot", "gap")]
    assert ids == sorted(ids), "in id order, across restarts"
    assert len(set(ids)) >= len(ids) - 2, "at most the line before each kill comes twice"
    assert all({"id", "event", "ts"} <= set(line) for line in lines)
    # A snapshot only at the very first connect: every resume was served.
    assert [line["reason"] for line in lines if line["event"] == "snapshot"] == ["connect"]
    assert not [line for line in lines if line["event"] == "gap"]
    # switchd's own log: JSON lines, timestamped, one line per finished switch.
    logged = [json.loads(line) for line in first_run_log.splitlines() if line.startswith("{")]
    assert len(logged) == len(first_run_log.splitlines()), "every line is JSON"
    done = [entry for entry in logged if entry["logger"] == "switchd.jobs" and "job" in entry]
    assert [entry["job"] for entry in done] == jobs[:3]
    assert {entry["result"] for entry in done} == {"success"}
    assert all(entry["ts"].endswith("Z") for entry in logged)
    assert any(entry["logger"].startswith("uvicorn") for entry in logged)
    unloads = [entry for entry in done if entry["victims"]]
    assert unloads
    assert all(entry["freed_gb"] > 0 for entry in unloads)


def test_a_switch_cut_by_shutdown_ends_on_every_stream(make_server: ServerFactory) -> None:
    server = make_server(seed_models(load_seconds=30.0))
    received: list[dict[str, Any]] = []
    opened = threading.Event()

    def read() -> None:
        parser = SseParser()
        with httpx.stream("GET", f"{server.url}/v1/events", timeout=60) as response:
            for line in response.iter_lines():
                event = parser.feed(line)
                opened.set()
                if event is not None:
                    received.append({"event": event.name, **event.data})

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert opened.wait(10)
    job = switch(server, "mistral-7b-v0.1", wait=False)
    own: list[tuple[str | None, str, dict[str, Any]]] = []
    following = threading.Event()

    def read_job() -> None:
        parser = SseParser()
        url = f"{server.url}/v1/switches/{job}/events"
        with httpx.stream("GET", url, timeout=60) as response:
            following.set()
            for line in response.iter_lines():
                event = parser.feed(line)
                if event is not None:
                    own.append((event.id, event.name, event.data))

    job_reader = threading.Thread(target=read_job, daemon=True)
    job_reader.start()
    assert following.wait(10)
    wait_for(lambda: any(name == "start" for _, name, _ in own), "the job's stream")
    assert server.stop() == 0
    job_reader.join(10)
    assert not job_reader.is_alive()
    last_id, last_name, last = own[-1]
    assert last_name == "error"
    assert last["error"] == "shutting_down"
    assert last_id == str(last["id"])  # published: the same event as on /v1/events
    reader.join(10)
    assert not reader.is_alive(), "the stream ended when switchd stopped"
    errors = [e for e in received if e["event"] == "error" and e.get("job") == job]
    assert len(errors) == 1
    error = errors[0]
    assert error == {"event": "error", **last}
    assert error["error"] == "shutting_down"
    assert {"id", "ts", "seq", "cause"} <= set(error)
    # The engine stopped with switchd: its state says so, in the journal.
    states = [e for e in journaled(server) if e["event"] == "model_state"]
    assert states[-1]["model"] == "mistral-7b-v0.1"
    assert (states[-1]["from"], states[-1]["to"]) == ("loading", "exited")


def test_what_a_kill_9_of_switchd_loses(
    make_server: ServerFactory, followers: list[Follower], tmp_path: Path
) -> None:
    """A reader sees every event as it is sent; switchd is killed the moment the
    switch's last one reaches it. The journal must hold all but what was published
    in the last moments: measured, and printed."""
    server = make_server(models())
    seen: list[tuple[float, dict[str, Any]]] = []
    done = threading.Event()

    def read() -> None:
        parser = SseParser()
        with httpx.stream("GET", f"{server.url}/v1/events", timeout=60) as response:
            for line in response.iter_lines():
                event = parser.feed(line)
                if event is None or event.name in ("snapshot", "log"):
                    continue
                seen.append((time.monotonic(), {"event": event.name, **event.data}))
                if event.name == "result":
                    assert server.process is not None
                    os.kill(server.process.pid, signal.SIGKILL)
                    done.set()
                    return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(0.5)
    switch(server, "gpt-oss-20b", wait=False)
    assert done.wait(WAIT_SECONDS)
    killed = time.monotonic()
    assert server.process is not None
    server.process.wait()
    on_disk = {e["id"] for e in journaled(server)}
    lost = [(killed - at, e) for at, e in seen if e["id"] not in on_disk]
    print(f"kill -9: {len(lost)} of {len(seen)} events lost: {[e['event'] for _, e in lost]}")
    assert all(age < 0.5 for age, _ in lost), "only events of the last moments may be lost"
    # Restarted, it counts on past the journal, and a follower resuming from the
    # last id the reader saw gets no gap.
    server.start()
    follower = Follower(server, tmp_path)
    followers.append(follower)
    follower.cursor.write_text(f"{seen[-1][1]['id']}\n")
    follower.start()
    job = switch(server, "mistral-7b-v0.1")
    wait_for(lambda: ended(follower.lines(), job), "the follower resumed")
    lines = follower.lines()
    assert [line["event"] for line in lines if line["event"] in ("gap", "snapshot")] == []
    assert min(line["id"] for line in lines) > seen[-1][1]["id"]


RSYSLOG_CONFIG = """
global(workDirectory="{work}")
module(load="imfile" mode="polling" PollingInterval="1")
module(load="mmjsonparse")
template(name="parsed" type="list") {{
  property(name="$!id") constant(value=" ") property(name="$!event")
  constant(value=" ") property(name="$!ts") constant(value="\\n")
}}
ruleset(name="switchd") {{
  action(type="mmjsonparse" cookie="")
  if $parsesuccess == "OK" then action(type="omfile" file="{parsed}" template="parsed")
  else action(type="omfile" file="{failed}")
}}
input(type="imfile" File="{events}" Tag="switchd" ruleset="switchd" freshStartTail="off")
"""


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A separate rsyslogd of its own: config, pid file and work directory under tmp,
    no socket input, nothing of the system's syslog touched."""
    rsyslogd = shutil.which("rsyslogd") or (
        "/usr/sbin/rsyslogd" if Path("/usr/sbin/rsyslogd").exists() else None
    )
    if rsyslogd is None:
        pytest.skip("rsyslogd is not installed (apt-get install rsyslog)")
    folder = tmp_path / "rsyslog"
    (folder / "work").mkdir(parents=True)
    events, parsed = tmp_path / "events.jsonl", folder / "parsed.txt"
    config = folder / "rsyslog.conf"
    config.write_text(
        RSYSLOG_CONFIG.format(
            work=folder / "work", parsed=parsed, failed=folder / "failed.txt", events=events
        )
    )
    process = subprocess.Popen(
        [rsyslogd, "-n", "-f", str(config), "-i", str(folder / "rsyslogd.pid")],
        stdout=subprocess.DEVNULL,
        stderr=(folder / "rsyslogd.log").open("wb"),
    )
    yield events, parsed
    process.send_signal(signal.SIGTERM)
    process.wait(10)
    assert not (folder / "failed.txt").exists(), "a line rsyslog could not parse"


def test_rsyslog_parses_every_line_across_kills_and_restarts(
    make_server: ServerFactory,
    followers: list[Follower],
    tmp_path: Path,
    rsyslog: tuple[Path, Path],
) -> None:
    events, parsed = rsyslog
    server = make_server(models())
    follower = Follower(server, tmp_path)
    assert follower.output == events
    followers.append(follower)
    follower.start()
    follower.connected()
    jobs = [switch(server, "gpt-oss-20b", wait=False)]
    follower.kill()
    follower.start()
    wait_for(lambda: job_finished(server, jobs[-1]), "the switch ends")
    assert server.stop() == 0
    server.start()
    jobs.append(switch(server, "mistral-7b-v0.1"))
    wait_for(lambda: ended(follower.lines(), jobs[-1]), "the follower caught up")
    written = [(line["id"], line["event"], line["ts"]) for line in follower.lines()]

    def all_parsed() -> bool:
        text = parsed.read_text() if parsed.exists() else ""
        return len(text.splitlines()) >= len(written)

    wait_for(all_parsed, "rsyslog parsed every line")
    rows = [row.split(" ") for row in parsed.read_text().splitlines()]
    assert [(int(i), name, ts) for i, name, ts in rows] == written
    assert all(ended(follower.lines(), job) for job in jobs)
