"""The units users see, and a figure's article as it is read aloud."""

from __future__ import annotations

import pytest

from switchd.units import with_article


@pytest.mark.parametrize(
    ("figure", "said"),
    [
        ("8.18", "an 8.18"),
        ("8", "an 8"),
        ("80", "an 80"),
        ("800", "an 800"),
        ("11", "an 11"),
        ("18.5", "an 18.5"),
        ("11000", "an 11000"),
        ("1", "a 1"),
        ("1.5", "a 1.5"),
        ("0.8", "a 0.8"),
        ("30", "a 30"),
        ("110", "a 110"),
        ("180", "a 180"),
        ("1100", "a 1100"),
        ("3e+04", "a 3e+04"),
    ],
)
def test_a_figure_gets_the_article_it_is_read_with(figure: str, said: str) -> None:
    assert with_article(figure) == said
