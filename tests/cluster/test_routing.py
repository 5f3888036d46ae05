"""The gateway's choice of host, from snapshots alone (switchd/cluster/routing.py)."""

from __future__ import annotations

from typing import Any

from switchd.cluster.directory import HostSnapshot
from switchd.cluster.routing import ASLEEP, FITS, NEVER_FITS, SERVING, UNLOADS, rank, resolve


def model(status: str = "exited", size: float = 24, **fields: Any) -> dict[str, Any]:
    return {
        "status": status,
        "size_gb": size,
        "estimated_load_time_seconds": fields.pop("load", 10.0),
        "gpu_memory_used_gb": size if status in ("running", "loading") else None,
        "pinned": False,
        "in_flight": 0,
        "waiting": 0,
        "gpus": "all",
        "aliases": [],
        **fields,
    }


def host(
    name: str,
    models: dict[str, dict[str, Any]],
    free: float | list[float] = 95.59,
    *,
    age: float | None = 0.2,
    error: str | None = None,
    total: float | None = None,
) -> HostSnapshot:
    """A host whose devices' totals are what is free plus what its models hold, unless
    `total` says otherwise (memory on its way back)."""
    frees = free if isinstance(free, list) else [free]
    held = sum(
        float(m["gpu_memory_used_gb"] or m["size_gb"])
        for m in models.values()
        if m["status"] in ("running", "loading", "sleeping")
    ) / len(frees)
    devices = [
        {"index": i, "name": "Simulated GPU", "available_gb": f, "total_gb": total or f + held}
        for i, f in enumerate(frees)
    ]
    status = {"models": models, "gpu": {"devices": devices}}
    return HostSnapshot(name, f"http://{name}:8080", status, age, error)


def test_a_model_goes_where_it_runs_before_anywhere_it_would_fit() -> None:
    hosts = [
        host("a", {"m": model(), "big": model("running", 80)}, 15.59),
        host("b", {"m": model("running"), "big": model()}, 71.59),
        host("c", {"m": model(), "big": model()}),
    ]
    choices = rank("m", hosts)
    assert [(c.host, c.reason) for c in choices] == [("b", SERVING), ("c", FITS), ("a", UNLOADS)]
    assert choices[2].unloads == ("big",)


def test_a_loading_model_is_joined_and_the_least_busy_host_serving_wins() -> None:
    busy = model("running", in_flight=3)
    hosts = [host("a", {"m": busy}), host("b", {"m": model("loading")})]
    assert [(c.host, c.reason) for c in rank("m", hosts)] == [("b", SERVING), ("a", SERVING)]


def test_asleep_comes_before_fitting_and_the_quickest_wake_first() -> None:
    hosts = [
        host("a", {"m": model()}),
        host("b", {"m": model("sleeping", sleep={"estimated_wake_seconds": 2.0})}),
        host("c", {"m": model("sleeping", sleep={"estimated_wake_seconds": 0.4})}),
    ]
    assert [(c.host, c.reason) for c in rank("m", hosts)] == [
        ("c", ASLEEP),
        ("b", ASLEEP),
        ("a", FITS),
    ]


def test_fitting_prefers_the_tightest_fit() -> None:
    hosts = [host("roomy", {"m": model()}, 95.59), host("snug", {"m": model()}, 30.0)]
    assert [c.host for c in rank("m", hosts)] == ["snug", "roomy"]


def test_the_host_that_unloads_least_wins_idle_and_quick_to_reload_first() -> None:
    # Each host needs one 80 GB victim put aside; on `a` it is busy, on `b` idle but
    # slow to load again, on `c` idle and quick.
    def full(victim: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {"m": model(size=40), "v": victim}

    hosts = [
        host("a", full(model("running", 80, load=5.0, in_flight=2)), 15.59),
        host("b", full(model("running", 80, load=60.0)), 15.59),
        host("c", full(model("running", 80, load=5.0)), 15.59),
    ]
    choices = rank("m", hosts)
    assert [(c.host, c.reason, c.unloads) for c in choices] == [
        ("c", UNLOADS, ("v",)),
        ("b", UNLOADS, ("v",)),
        ("a", UNLOADS, ("v",)),
    ]


def test_pinned_models_are_never_counted_as_room() -> None:
    pinned = model("running", 80, pinned=True)
    hosts = [host("a", {"m": model(size=40), "p": pinned}, 15.59)]
    assert [(c.host, c.reason) for c in rank("m", hosts)] == [("a", NEVER_FITS)]


def test_per_device_a_model_on_named_devices_needs_its_share_on_each() -> None:
    # 40 GB over devices 0 and 1: 20 on each; device 1 has only 10 free.
    two = [host("a", {"m": model(size=40, gpus=[0, 1])}, [47.0, 10.0])]
    assert rank("m", two)[0].reason == NEVER_FITS
    roomy = [host("a", {"m": model(size=40, gpus=[0, 1])}, [47.0, 20.5])]
    assert rank("m", roomy)[0].reason == FITS


def test_unreachable_and_avoided_hosts_and_other_catalogs_are_not_candidates() -> None:
    hosts = [
        host("stale", {"m": model("running")}, age=5.0),
        host("refused", {"m": model("running")}, error="ConnectError"),
        host("other", {"x": model("running")}),
        host("avoided", {"m": model("running")}),
        host("ok", {"m": model()}),
    ]
    assert [c.host for c in rank("m", hosts, avoid=["avoided"])] == ["ok"]
    assert rank("nothing", hosts) == []


def test_aliases_resolve_to_the_catalog_name() -> None:
    hosts = [host("a", {"gpt-oss-20b": model("running", aliases=["20b"])})]
    assert resolve("20b", hosts) == "gpt-oss-20b"
    assert [(c.host, c.model) for c in rank("20b", hosts)] == [("a", "gpt-oss-20b")]


def test_memory_on_its_way_back_counts_as_free() -> None:
    # Just unloaded: nothing holds the card, yet only 15.59 GB show free for now.
    releasing = host("a", {"m": model(size=80)}, 15.59, total=95.59)
    full = host("b", {"m": model(size=80), "v": model("running", 80)}, 15.59)
    assert [(c.host, c.reason) for c in rank("m", [full, releasing])] == [
        ("a", FITS),
        ("b", UNLOADS),
    ]
