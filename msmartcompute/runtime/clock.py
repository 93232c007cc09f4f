"""Wall-clock helpers: every timestamp the runtime returns is ISO 8601 UTC ending in "Z"."""
from __future__ import annotations

import time
from datetime import datetime, timezone


def now() -> float:
    """Unix seconds (wall clock: persisted, compared across restarts)."""
    return time.time()


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def to_unix(value: datetime | float | None) -> float | None:
    """A datetime (naive = UTC) or unix seconds -> unix seconds."""
    if value is None or isinstance(value, (int, float)):
        return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()
