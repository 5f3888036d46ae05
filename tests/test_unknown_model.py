"""A 404 for an unknown model echoes at most a capped part of the name it was given."""

from __future__ import annotations

from pathlib import Path

import pytest

from switchd.errors import ECHOED_CHARACTERS, echoed
from switchd.jobs import SwitchError
from tests.fakes import make_settings
from tests.test_scheduler import rig


def test_a_short_text_is_echoed_whole() -> None:
    assert echoed("gpt-5") == "gpt-5"
    assert echoed("x" * ECHOED_CHARACTERS) == "x" * ECHOED_CHARACTERS


def test_a_long_text_is_cut_with_an_ellipsis() -> None:
    assert echoed("y" * 10_000) == "y" * ECHOED_CHARACTERS + "…"


async def test_a_huge_unknown_model_name_is_not_echoed_in_full(tmp_path: Path) -> None:
    async with rig(make_settings(tmp_path)) as r:
        with pytest.raises(SwitchError) as unknown:
            r.scheduler.known("z" * 3_000_000)  # was: all 3 MB of it in the 404
    message = unknown.value.message
    assert message.startswith("Unknown model '" + "z" * ECHOED_CHARACTERS + "…'; known models: ")
    assert len(message) < ECHOED_CHARACTERS + 200
