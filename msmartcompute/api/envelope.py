"""The seed's response shapes: success bodies and the error envelope."""
from __future__ import annotations

import time

_second = (None, "")  # (a whole second, its "YYYY-MM-DDTHH:MM:SS"): every response has a timestamp


def utc_now_iso() -> str:
    """ISO 8601 UTC with milliseconds and a Z, as the seed writes timestamps (1.4 -> 0.4 us: the
    date and time of the current second are formatted once)."""
    global _second
    now = time.time()
    second = int(now)
    if _second[0] != second:
        _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{_second[1]}.{int((now - second) * 1000):03d}Z"


def ok(fields: dict) -> dict:
    """A success body: the endpoint's fields plus success, error (None unless the fields hold
    one: GET /inference/{id} of a failed job) and timestamp."""
    body = {"success": True}
    body.update(fields)
    body.setdefault("error", None)  # a failed async job's result carries its {code, message} here
    body.setdefault("timestamp", utc_now_iso())
    return body


def error(code: str, message: str, details: dict | None = None) -> dict:
    return {
        "success": False,
        "error": {"code": code, "message": message, "details": details or {}},
        "timestamp": utc_now_iso(),
    }
