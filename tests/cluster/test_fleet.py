"""The gateway's view of its hosts (switchd/cluster/fleet.py)."""

from __future__ import annotations

from switchd.cluster.directory import HostSnapshot
from switchd.cluster.fleet import Change, Fleet, merged_status
from switchd.cluster.routing import FITS, SERVING, rank
from tests.cluster.test_routing import host, model


def test_a_model_just_sent_to_a_host_counts_as_loading_there_until_the_host_shows_it() -> None:
    fleet = Fleet()
    fleet.update([host("a", {"big": model(size=80), "mid": model(size=40)})])
    fleet.routed("a", "big")
    [seen] = fleet.view()
    assert seen.status is not None
    assert seen.status["models"]["big"]["status"] == "loading"
    assert seen.status["gpu"]["devices"][0]["available_gb"] == 95.59 - 80
    # So mid, next, is not placed there as if the card were empty.
    fleet.update([*fleet.view(), host("b", {"big": model(size=80), "mid": model(size=40)})])
    assert [(c.host, c.reason) for c in rank("mid", fleet.view())] == [
        ("b", FITS),
        ("a", "unloads"),
    ]
    # The host's own read shows it: the guess is dropped, the read is what counts.
    loaded = host("a", {"big": model("running", 80), "mid": model(size=40)}, 15.59)
    fleet.update([loaded])
    assert fleet.view() == [loaded]
    assert [(c.host, c.reason) for c in rank("big", fleet.view())] == [("a", SERVING)]


def test_reachability_changes_and_a_failed_request_takes_a_host_out_for_a_moment() -> None:
    fleet = Fleet()
    up = host("a", {"m": model()})
    assert fleet.update([up]) == [Change("a", True, None)]
    assert fleet.update([up]) == []
    assert fleet.failed("a", "no answer") == [Change("a", False, "no answer")]
    assert rank("m", fleet.view()) == []
    gone = HostSnapshot("a", up.url, up.status, None, "agent unreachable")
    assert fleet.update([gone]) == []
    assert fleet.update([]) == []


def test_merged_status_names_hosts_and_sums_memory() -> None:
    hosts = [
        host("a", {"m": model("running", 24)}, 71.59),
        host("b", {"m": model("sleeping", 24, sleep={"estimated_wake_seconds": 1})}, 90.0),
        host("down", {"m": model("running", 24)}, 71.59, error="ConnectError"),
    ]
    status = merged_status(hosts)
    entry = status["models"]["m"]
    assert (entry["host"], entry["loaded_on"], entry["asleep_on"]) == ("a", ["a"], ["b"])
    assert set(entry["hosts"]) == {"a", "b"}
    assert status["gpu"]["available_gb"] == 161.59
    assert [d["host"] for d in status["gpu"]["devices"]] == ["a", "b"]
    assert {n: h["reachable"] for n, h in status["hosts"].items()} == {
        "a": True,
        "b": True,
        "down": False,
    }
