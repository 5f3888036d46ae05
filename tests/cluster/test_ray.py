"""Three simulated GPU hosts on a local Ray cluster (a head and two worker nodes),
behind `switchd gateway --address`, in a network namespace with only loopback up:
routing, placement, merged events, Ray restarting an agent, a restarted gateway,
a host killed mid-traffic and its return (tests/cluster/scenario.py runs them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray", reason="Ray is the `cluster` extra: pip install 'switchd[cluster]'")

ROOT = Path(__file__).resolve().parents[2]


def loopback_namespace_problem() -> str | None:
    """Why a network namespace with loopback up cannot be made here, or None."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (util-linux, iproute2)"
    probe = subprocess.run(
        ["unshare", "--net", "--", "sh", "-c", "ip link set lo up"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return f"cannot make a network namespace (root needed): {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if (problem := loopback_namespace_problem()) is not None:
        pytest.skip(problem)
    folder = tmp_path_factory.mktemp("cluster")
    command = f"ip link set lo up && exec {sys.executable} -m tests.cluster.scenario {folder}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    run = subprocess.run(
        ["unshare", "--net", "--", "sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=ROOT,
        env=env,
        check=False,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("SCENARIO ")]
    if run.returncode != 0 or not lines:
        pytest.fail(f"the scenario failed:\n{run.stdout}\n{run.stderr[-6000:]}")
    found: dict[str, Any] = json.loads(lines[-1].removeprefix("SCENARIO "))
    return found


pytestmark = pytest.mark.timeout(200)


def test_ray_stays_on_loopback_and_each_agent_on_its_own_node(report: dict[str, Any]) -> None:
    assert report["node_ips"] == ["127.0.0.1"]
    assert report["agents_on_their_nodes"] is True
    assert report["distinct_agent_nodes"] == 3


def test_requests_go_where_their_model_runs_and_nothing_switches(report: dict[str, Any]) -> None:
    routing = report["routing"]
    assert routing["statuses"] == [200]
    assert routing["mid_hosts"] == ["gpu1"]
    assert routing["big_hosts"] in (["gpu0"], ["gpu2"], ["gpu0", "gpu2"])
    assert routing["new_jobs"] == {"gpu0": 0, "gpu1": 0, "gpu2": 0}


def test_a_model_is_placed_where_it_fits_without_unloading(report: dict[str, Any]) -> None:
    placement = report["placement"]
    assert (placement["status"], placement["host"]) == (200, "gpu1")
    assert placement["unloaded"] == []
    assert placement["stage_hosts"] == ["gpu1"]
    assert placement["stages"][0] == "memory_check"
    assert placement["stages"][-1] == "ready"
    assert "unload" not in placement["stages"]


def test_events_of_every_host_on_one_resumable_stream(report: dict[str, Any]) -> None:
    assert report["events"] == {
        "opening": "snapshot",
        "every_event_has_host": True,
        "ids_increasing": True,
        "data_ids_match": True,
        "resumed_ids": True,
        "stale_resume": "gap",
    }


def test_ray_restarts_an_agent_and_a_restarted_gateway_finds_the_hosts(
    report: dict[str, Any],
) -> None:
    assert report["agent_restarted_seconds"] < 30
    assert report["gateway_restart_found_hosts_seconds"] < 10


def test_a_host_killed_mid_traffic_none_answered_wrong(report: dict[str, Any]) -> None:
    kill = report["kill"]
    assert kill["wrong"] == 0
    assert "gpu0" in kill["hosts_before"]
    # Every request answered whole, or refused or visibly cut short by the host's
    # death: an error event ending a stream, a 502, a body the client sees cut off.
    clear = {
        "200:",
        "200:engine_died",
        "502:engine_died",
        "502:host_unreachable",
        "None:RemoteProtocolError",
    }
    assert set(kill["outcomes"]) <= clear
    assert kill["outcomes"]["200:"] > 0
    assert report["kill_detect_seconds"] < 3
    # Once the gateway knows, every request goes to the other host that has the model.
    assert set(kill["after_detected"]) == {"200@gpu2"}


def test_a_host_that_comes_back_is_used_again(report: dict[str, Any]) -> None:
    assert report["back_seconds"] < 15
    back = report["back_switch"]
    assert (back["status"], back["host"]) == (200, "gpu0")
