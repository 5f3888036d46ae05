"""The units users see: GiB rounded like nvidia-smi, ISO timestamps."""

from __future__ import annotations

from datetime import UTC, datetime

GIB = 1024**3


def gib(num_bytes: float) -> float:
    """Bytes as GiB rounded to 2 decimals (a 97,887 MiB card is 95.59)."""
    return round(num_bytes / GIB, 2)


def gib_to_bytes(gb: float) -> int:
    return round(gb * GIB)


def iso_timestamp(epoch_seconds: float) -> str:
    """ISO 8601 UTC with milliseconds, `Z`-suffixed."""
    moment = datetime.fromtimestamp(epoch_seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def with_article(figure: str) -> str:
    """`figure` after "a" or "an" as it is read aloud: "an 8.18", "an 11", "a 30"
    (eight, eleven and eighteen begin with a vowel sound, as do their thousands)."""
    whole = figure.lstrip("-").split(".")[0]
    vowel = whole.startswith("8") or (len(whole) % 3 == 2 and whole[:2] in ("11", "18"))
    return f"{'an' if vowel else 'a'} {figure}"
