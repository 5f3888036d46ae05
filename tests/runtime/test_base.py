"""The runtimes by name: every `runtime:` the config accepts opens, and says what it needs."""

from __future__ import annotations

from pathlib import Path

from switchd.config import ModelSpec, RuntimeKind
from switchd.runtime.base import RUNTIMES
from switchd.runtime.process import ProcessRuntime
from tests.fakes import make_settings


def test_every_runtime_the_config_names_is_registered() -> None:
    assert set(RUNTIMES) == {kind.value for kind in RuntimeKind}


def test_each_runtime_says_which_models_it_can_run() -> None:
    command = ModelSpec("a", 1.0, cmd=("engine",))
    container = ModelSpec("b", 1.0, container="b-engine")
    image = ModelSpec("c", 1.0, image="engine:latest")
    assert [RUNTIMES["process"].runs(s) for s in (command, container, image)] == [
        True,
        False,
        False,
    ]
    assert [RUNTIMES["docker"].runs(s) for s in (command, container, image)] == [
        False,
        True,
        True,
    ]
    assert (RUNTIMES["process"].needs, RUNTIMES["docker"].needs) == (
        "`cmd`",
        "`container` or `image`",
    )


async def test_the_process_runtime_opens_by_name(tmp_path: Path) -> None:
    runtime = await RUNTIMES["process"].open(make_settings(tmp_path))
    try:
        assert isinstance(runtime, ProcessRuntime)
    finally:
        await runtime.close()
