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
