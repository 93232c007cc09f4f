"""API keys: created once, stored hashed, checked in constant time.

A key reads `msc_<key_id>_<secret>`. The store keeps only sha256(secret) under
key_id (a fast hash is enough: the secret is 32 random bytes, not a password).
Lookup is by key_id and the comparison of digests uses hmac.compare_digest, so
timing reveals nothing about the secret. Keys never appear in logs.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from .caller import Caller
from .ids import check_id
from .store import Store

NAMESPACE = "api_keys"
AUTH_NAMESPACE, REQUIRED = "auth", "keys_required"  # set by the first key: never open again
ROLES = ("admin", "user")


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# authenticate() keeps a looked-up key record this long: the store read was ~4% of serving time
# per request. A key revoked from another process (the CLI) stops working within this time.
# With the record it keeps the secret last verified against it (and the Caller), so the key's
# next requests in that time compare the secret in constant time instead of hashing it again
# (sha256 through OpenSSL and a Caller: 2.4% of a front's time per request under load).
RECORD_TTL_S = 2.0


class KeyStore:
    def __init__(self, store: Store, record_ttl_s: float = RECORD_TTL_S):
        self.store = store
        self.record_ttl_s = record_ttl_s
        # key_id -> (expires, record, (secret verified against it, its Caller) or None)
        self._records: dict[str, tuple[float, dict, tuple[bytes, Caller] | None]] = {}
        self._closed = False  # once keys are required, for the life of this process

    def is_open(self) -> bool:
        """True while no key was ever created. Read from the store on every call until it turns
        False (open mode is loopback-only development use), so a key created by another process
        (`msmartcompute keys create` beside a running server) closes the server at once; revoking
        every key afterwards leaves it closed (a persisted flag), never open again."""
        if self._closed:
            return False
        self._closed = bool(self.store.get(AUTH_NAMESPACE, REQUIRED) or self.store.items(NAMESPACE))
        return not self._closed

    def _record(self, key_id: str) -> dict | None:
        now = time.monotonic()
        hit = self._records.get(key_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        record = self.store.get(NAMESPACE, key_id)
        if record is not None:  # unknown ids are not kept: guessing them must not fill memory
            if len(self._records) > 10_000:
                self._records.clear()
            self._records[key_id] = (now + self.record_ttl_s, record, None)
        return record

    def create(self, user_id: str, role: str) -> str:
        """Create a key for user_id; returns the only copy of the plaintext key."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        check_id(user_id, "user_id")
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        self.store.put(AUTH_NAMESPACE, REQUIRED, True)  # first: never a key beside an open server
        self.store.put(NAMESPACE, key_id, {"user_id": user_id, "role": role, "digest": _digest(secret),
                                           "created_at": time.time()})
        return f"msc_{key_id}_{secret}"

    def add(self, key: str, user_id: str, role: str) -> None:
        """Register a key given in config/env (bootstrap). It must have the msc_<id>_<secret> shape."""
        parts = key.split("_", 2)
        if len(parts) != 3 or parts[0] != "msc" or not parts[1] or len(parts[2]) < 16:
            raise ValueError("a configured API key must look like msc_<id>_<secret of 16+ characters>")
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        self._records.pop(parts[1], None)
        self.store.put(AUTH_NAMESPACE, REQUIRED, True)  # first: never a key beside an open server
        self.store.put(NAMESPACE, parts[1], {"user_id": user_id, "role": role, "digest": _digest(parts[2]),
                                             "created_at": time.time()})

    def authenticate(self, key: str) -> Caller | None:
        parts = key.split("_", 2)
        if len(parts) != 3 or parts[0] != "msc":
            return None
        key_id, secret = parts[1], parts[2].encode()
        hit = self._records.get(key_id)
        if hit is not None and hit[2] is not None and hit[0] > time.monotonic() \
                and hmac.compare_digest(hit[2][0], secret):
            return hit[2][1]
        record = self._record(key_id)
        if record is None:
            _digest(parts[2])  # same work either way
            return None
        if not hmac.compare_digest(record["digest"], _digest(parts[2])):
            return None
        caller = Caller(user_id=record["user_id"], role=record["role"])
        kept = self._records.get(key_id)
        if kept is not None and kept[1] is record:
            self._records[key_id] = (kept[0], record, (secret, caller))
        return caller

    def list(self) -> list[dict]:
        return [{"key_id": key_id, "user_id": r["user_id"], "role": r["role"], "created_at": r["created_at"]}
                for key_id, r in self.store.items(NAMESPACE)]

    def revoke(self, key_or_id: str) -> dict | None:
        """Revoke by key id or by the whole key; returns what was revoked ({key_id, user_id, role})
        or None when no such key exists."""
        parts = key_or_id.split("_", 2)
        key_id = parts[1] if len(parts) == 3 and parts[0] == "msc" else key_or_id
        self._records.pop(key_id, None)
        record = self.store.get(NAMESPACE, key_id)
        if record is None or not self.store.delete(NAMESPACE, key_id):
            return None
        return {"key_id": key_id, "user_id": record["user_id"], "role": record["role"]}

    def count(self) -> int:
        return len(self.store.items(NAMESPACE))
