"""Live config: the diff (pure), the Reloader, and the scheduler applying a diff in its
worker (against the recording fake runtime and the simulated GPU)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from switchd.config import ConfigError, Settings, engine_digest, load_settings
from switchd.events import Event, EventBus
from switchd.jobs import Cause, JobKind, SwitchError
from switchd.reload import Diff, Reloader, ReloadError, diff
from switchd.states import ModelState
from switchd.wire import CONFIG_RELOADED
from tests.fakes import make_settings
from tests.test_scheduler import finish, rig

MODELS: dict[str, Any] = {
    "a": {"cmd": "engine a", "size_gb": 10},
    "b": {"cmd": "engine b", "size_gb": 10},
    "c": {"cmd": "engine c", "size_gb": 10},
}


def with_models(tmp_path: Path, models: dict[str, Any], **extra: Any) -> Settings:
    return make_settings(tmp_path, models, **extra)


def changed(models: dict[str, Any], name: str, **fields: Any) -> dict[str, Any]:
    return {**models, name: {**models[name], **fields}}


# ---- the diff ---------------------------------------------------------------------------


def test_the_same_file_changes_nothing(tmp_path: Path) -> None:
    old = with_models(tmp_path, MODELS)
    change = diff(old, with_models(tmp_path, MODELS))
    assert change.as_json() == {
        "added": [],
        "removed": [],
        "changed": [],
        "unchanged": ["a", "b", "c"],
        "refused": {},
    }


def test_added_removed_changed_and_unchanged_models(tmp_path: Path) -> None:
    old = with_models(tmp_path, MODELS)
    models = changed(MODELS, "b", cmd="engine b --new-flag")
    models = changed(models, "a", ttl_seconds=60, size_gb=12, aliases=["alpha"])  # switchd's
    del models["c"]
    models["d"] = {"cmd": "engine d", "size_gb": 5}
    change = diff(old, with_models(tmp_path, models))
    assert (change.added, change.removed, change.changed, change.unchanged) == (
        ("d",),
        ("c",),
        ("b",),
        ("a",),
    )
    assert change.settings.models["a"].ttl_seconds == 60


@pytest.mark.parametrize(
    ("field", "value"),
    [("env", {"X": "1"}), ("url", "http://127.0.0.1:9"), ("gpus", [0])],
)
def test_every_engine_setting_is_a_change(tmp_path: Path, field: str, value: Any) -> None:
    old = with_models(tmp_path, MODELS)
    change = diff(old, with_models(tmp_path, changed(MODELS, "a", **{field: value})))
    assert change.changed == ("a",)


def test_fixed_top_level_keys_are_refused_and_kept(tmp_path: Path) -> None:
    old = with_models(tmp_path, MODELS)
    new = with_models(
        tmp_path,
        MODELS,
        listen="127.0.0.1:9999",
        runtime="docker",
        state_dir=str(tmp_path / "elsewhere"),
        drain_timeout_seconds=7,
    )
    change = diff(old, new)
    assert set(change.refused) == {"listen", "runtime", "state_dir"}
    assert change.refused["listen"] == "the listening socket is open: restart switchd to move it"
    applied = change.settings
    assert (applied.host, applied.port, applied.runtime, applied.state_dir) == (
        old.host,
        old.port,
        old.runtime,
        old.state_dir,
    )
    assert applied.drain_timeout_seconds == 7  # a live key applies


def test_the_engine_digest_ignores_switchd_only_fields(tmp_path: Path) -> None:
    old = with_models(tmp_path, MODELS).models["a"]
    same = dataclasses.replace(old, ttl_seconds=5, pinned=True, priority=3, size_gb=1)
    other = dataclasses.replace(old, cmd=("engine", "z"))
    assert engine_digest(same) == engine_digest(old)
    assert engine_digest(other) != engine_digest(old)


# ---- preload in the config -------------------------------------------------------------


def test_preload_names_models_or_aliases(tmp_path: Path) -> None:
    models = changed(MODELS, "b", aliases=["bee"])
    settings = with_models(tmp_path, models, preload=["bee", "a", "b"])
    assert settings.preload == ("b", "a")


def test_preload_of_an_unknown_model_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"preload: 'nope' is not a model of `models`"):
        with_models(tmp_path, MODELS, preload=["nope"])


# ---- the Reloader ------------------------------------------------------------------------


def write(path: Path, settings: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")


def file_data(tmp_path: Path, models: dict[str, Any]) -> dict[str, Any]:
    return {
        "runtime": "process",
        "gpu": "simulated",
        "state_dir": str(tmp_path / "state"),
        "models": models,
    }


async def test_a_file_that_does_not_parse_changes_nothing_and_says_why(tmp_path: Path) -> None:
    config = tmp_path / "switchd.yaml"
    write(config, file_data(tmp_path, MODELS))
    current = load_settings(config)
    applied: list[Diff] = []
    bus = EventBus()
    published: list[Event] = []
    bus.add_listener(published.append)

    async def apply(change: Diff, now: bool) -> None:
        applied.append(change)

    async def validate(settings: Settings) -> None:
        pass

    reloader = Reloader(lambda: current, apply, validate, bus)
    config.write_text("models: [\n", encoding="utf-8")
    with pytest.raises(ReloadError) as refused:
        await reloader.reload()
    assert refused.value.problem == f"{config}: is not valid YAML at line 2"
    assert applied == []
    assert [(e.name, {k: v for k, v in e.data.items() if k != "ts"}) for e in published] == [
        (CONFIG_RELOADED, {"status": "error", "error": refused.value.problem})
    ]
    assert "ts" in published[0].data  # every event says when (issue 22)


async def test_a_file_the_validator_refuses_changes_nothing(tmp_path: Path) -> None:
    config = tmp_path / "switchd.yaml"
    write(config, file_data(tmp_path, MODELS))
    current = load_settings(config)
    applied: list[Diff] = []

    async def apply(change: Diff, now: bool) -> None:
        applied.append(change)

    async def validate(settings: Settings) -> None:
        raise ConfigError(settings.source, "models.a.gpus", "the simulated GPU has 1 device")

    reloader = Reloader(lambda: current, apply, validate, EventBus())
    with pytest.raises(ReloadError, match=r"models\.a\.gpus: the simulated GPU has 1 device"):
        await reloader.reload()
    assert applied == []


async def test_a_valid_file_is_applied_and_published(tmp_path: Path) -> None:
    config = tmp_path / "switchd.yaml"
    write(config, file_data(tmp_path, MODELS))
    current = load_settings(config)
    seen: list[tuple[Diff, bool]] = []
    bus = EventBus()
    published: list[Event] = []
    bus.add_listener(published.append)

    async def apply(change: Diff, now: bool) -> None:
        seen.append((change, now))

    async def validate(settings: Settings) -> None:
        pass

    write(config, file_data(tmp_path, {**MODELS, "d": {"cmd": "engine d", "size_gb": 1}}))
    change = await Reloader(lambda: current, apply, validate, bus).reload(now=True)
    assert seen == [(change, True)]
    assert change.added == ("d",)
    assert [(e.name, e.data["status"], e.data["added"]) for e in published] == [
        (CONFIG_RELOADED, "ok", ["d"])
    ]


async def test_settings_not_read_from_a_file_cannot_be_reloaded(tmp_path: Path) -> None:
    async def apply(change: Diff, now: bool) -> None:
        raise AssertionError("applied")

    async def validate(settings: Settings) -> None:
        pass

    current = with_models(tmp_path, MODELS)
    current = dataclasses.replace(current, source="<defaults>")
    with pytest.raises(ReloadError, match=r"not started from a config file \(<defaults>\)"):
        await Reloader(lambda: current, apply, validate, EventBus()).reload()


# ---- the scheduler applying a diff -----------------------------------------------------


async def wait_for(check: Any, within: float = 5.0) -> None:
    """Poll `check` (state the worker changes: no event says so) until it holds."""
    async with asyncio.timeout(within):
        while True:
            if check():
                return
            await asyncio.sleep(0.01)


async def test_added_models_appear_and_loaded_unchanged_ones_keep_their_engine(
    tmp_path: Path,
) -> None:
    old = with_models(tmp_path, MODELS)
    async with rig(old) as r:
        await finish(r.scheduler.request_switch("a"))
        engine = r.scheduler.records["a"].engine
        new_models = changed({**MODELS, "d": {"cmd": "engine d", "size_gb": 1}}, "a", ttl_seconds=9)
        await r.scheduler.reload(diff(old, with_models(tmp_path, new_models)))
        assert r.scheduler.records["d"].state is ModelState.EXITED
        assert r.scheduler.known("d").name == "d"
        assert r.scheduler.records["a"].engine is engine
        assert r.scheduler.records["a"].spec.ttl_seconds == 9
        assert r.runtime.calls == ["start a"]


async def test_a_removed_model_is_drained_unloaded_then_removed(tmp_path: Path) -> None:
    old = with_models(tmp_path, MODELS)
    async with rig(old) as r:
        await finish(r.scheduler.request_switch("c"))
        holding = r.scheduler.serving("c")
        await holding.__aenter__()  # a request in flight
        models = {k: v for k, v in MODELS.items() if k != "c"}
        await r.scheduler.reload(diff(old, with_models(tmp_path, models)))
        with pytest.raises(SwitchError) as unknown:
            r.scheduler.known("c")
        assert unknown.value.http_status == 404
        await asyncio.sleep(0.1)
        assert r.runtime.calls == ["start c"]  # drained first: not stopped under a request
        await holding.__aexit__(None, None, None)
        await wait_for(lambda: "c" not in r.scheduler.records)
        assert r.runtime.calls == ["start c", "stop c"]
        (unload,) = [j for j in r.scheduler.recent_jobs(10) if j.kind is JobKind.UNLOAD]
        assert (unload.target, unload.cause) == ("c", Cause.RELOAD)


async def test_a_changed_model_is_restarted_when_next_idle(tmp_path: Path) -> None:
    old = with_models(tmp_path, MODELS)
    async with rig(old) as r:
        await finish(r.scheduler.request_switch("b"))
        holding = r.scheduler.serving("b")
        await holding.__aenter__()
        new = with_models(tmp_path, changed(MODELS, "b", cmd="engine b --v2"))
        await r.scheduler.reload(diff(old, new))
        await asyncio.sleep(0.1)
        assert r.runtime.calls == ["start b"]  # busy: not yet
        assert r.scheduler.records["b"].spec.cmd == ("engine", "b")  # its engine's until then
        await holding.__aexit__(None, None, None)
        await wait_for(lambda: r.runtime.calls == ["start b", "stop b", "start b"])
        await wait_for(lambda: r.scheduler.records["b"].state is ModelState.RUNNING)
        assert tuple(r.scheduler.records["b"].spec.cmd) == ("engine", "b", "--v2")
        causes = [(j.kind, j.cause) for j in reversed(r.scheduler.recent_jobs(10))]
        assert causes[1:] == [(JobKind.UNLOAD, Cause.RELOAD), (JobKind.SWITCH, Cause.RELOAD)]


async def test_a_changed_model_is_restarted_at_once_when_asked(tmp_path: Path) -> None:
    old = with_models(tmp_path, MODELS, drain_timeout_seconds=0.2)
    async with rig(old) as r:
        await finish(r.scheduler.request_switch("b"))
        holding = r.scheduler.serving("b")
        await holding.__aenter__()
        new = with_models(
            tmp_path, changed(MODELS, "b", cmd="engine b --v2"), drain_timeout_seconds=0.2
        )
        await r.scheduler.reload(diff(old, new), now=True)
        await wait_for(lambda: r.runtime.calls == ["start b", "stop b", "start b"])
        await holding.__aexit__(None, None, None)


async def test_a_changed_model_not_loaded_takes_its_new_settings_at_once(tmp_path: Path) -> None:
    old = with_models(tmp_path, MODELS)
    async with rig(old) as r:
        new = with_models(tmp_path, changed(MODELS, "b", cmd="engine b --v2"))
        await r.scheduler.reload(diff(old, new))
        assert r.scheduler.records["b"].spec.cmd == ("engine", "b", "--v2")
        assert r.runtime.calls == []


async def test_preload_loads_in_order_with_cause_preload(tmp_path: Path) -> None:
    settings = with_models(tmp_path, MODELS, preload=["c", "a"])
    async with rig(settings) as r:
        await wait_for(lambda: r.runtime.calls == ["start c", "start a"])
        jobs = list(reversed(r.scheduler.recent_jobs(10)))
        assert [(j.target, j.cause) for j in jobs] == [("c", Cause.PRELOAD), ("a", Cause.PRELOAD)]
        for job in jobs:
            await finish(job)
        assert r.scheduler.records["c"].state is ModelState.RUNNING


async def test_a_model_removed_then_added_back_before_its_unload_stays(tmp_path: Path) -> None:
    old = with_models(tmp_path, MODELS)
    async with rig(old) as r:
        await finish(r.scheduler.request_switch("c"))
        without = with_models(tmp_path, {k: v for k, v in MODELS.items() if k != "c"})
        back = diff(without, with_models(tmp_path, MODELS))
        assert back.added == ("c",)
        # Both reach the worker together: the unload the first queued is still to run.
        await asyncio.gather(r.scheduler.reload(diff(old, without)), r.scheduler.reload(back))
        await wait_for(lambda: r.runtime.calls == ["start c", "stop c"])
        await asyncio.sleep(0.1)
        assert r.scheduler.records["c"].state is ModelState.EXITED  # unloaded, not removed
        assert r.scheduler.known("c").name == "c"
