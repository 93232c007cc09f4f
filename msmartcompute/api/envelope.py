"""The seed's response shapes: success bodies and the error envelope."""
from __future__ import annotations

from datetime import datetime, timezone


def utc_now_iso() -> str:
    """ISO 8601 UTC with a Z, as the seed writes timestamps."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
