"""User sessions bound to a loaded model; they expire RuntimeConfig.session_ttl_s after
creation (default one hour). Expired sessions are purged by the runtime's reaper and on
every read. Ids are `<user_id>_<random>`; only the owner or an admin may read or end one. A
user holds at most `max_per_user` live sessions (more: INVALID_INPUT_DATA)."""
from __future__ import annotations

import threading
from typing import Callable

from . import clock, ids
from .access import authorize, visible
from .caller import Caller
from .errors import InvalidInputData, NotFound, QueueFull
from .store import Store


class Sessions:
    def __init__(self, store: Store, ttl_s: float, model_entry: Callable[[str], object], max_per_user: int = 100):
        self.store = store
        self.ttl_s = ttl_s
        self.max_per_user = max_per_user
        self.model_entry = model_entry  # Registry.entry: raises INVALID_MODEL_ID for an unknown model
        self._lock = threading.Lock()

    def create(self, user_id: str, model_id: str, caller: Caller | None = None) -> dict:
        self.model_entry(model_id)
        if not isinstance(user_id, str) or not user_id:
            raise InvalidInputData("user_id is required", {"field": "user_id"})
        authorize(caller, "sessions.create", for_user=user_id)
        with self._lock:
            now = clock.now()
            live = sum(1 for _, r in self.store.items("sessions") if r["user_id"] == user_id and r["expires_at"] > now)
            if live >= self.max_per_user:
                raise QueueFull(f"user {user_id!r} has {live} live sessions, the per-user limit; end one first",
                                {"max_sessions": self.max_per_user})
            record = {"session_id": ids.session_id(user_id), "user_id": user_id, "model_id": model_id,
                      "created_at": now, "expires_at": now + self.ttl_s}
            self.store.put("sessions", record["session_id"], record)
        return _public(record)

    def get(self, session_id: str, caller: Caller | None = None) -> dict:
        record = self.store.get("sessions", session_id)
        if record is not None and record["expires_at"] <= clock.now():
            self.store.delete("sessions", session_id)
            record = None
        if record is None or not visible(caller, record["user_id"]):
            raise NotFound(f"session {session_id!r} not found (or expired)")
        return _public(record)

    def delete(self, session_id: str, caller: Caller | None = None) -> dict:
        self.get(session_id, caller)
        self.store.delete("sessions", session_id)
        return {"session_id": session_id, "message": "Session ended successfully"}

    def purge(self) -> int:
        """Delete every expired session; returns how many."""
        with self._lock:
            now = clock.now()
            gone = [k for k, r in self.store.items("sessions") if r["expires_at"] <= now]
            for k in gone:
                self.store.delete("sessions", k)
            return len(gone)


def _public(record: dict) -> dict:
    return {**record, "created_at": clock.iso(record["created_at"]), "expires_at": clock.iso(record["expires_at"])}
