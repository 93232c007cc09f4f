"""Public ids: `req_<unix>_<random>`, `alloc_<unix>_<random>`, sessions `<user_id>_<random>`
(the seed's shapes), vGPUs `vgpu_<n>`. The random part is 64 bits from the OS's CSPRNG
(os.urandom, as `secrets`): ids never repeat across restarts and cannot be guessed or counted (a
sequence would tell how busy the server is and name other users' objects). Also the one rule for
the ids callers choose (model, user, virtual GPU ids), shared by the API's schemas and the CLI."""
from __future__ import annotations

import os
import re
import threading
import time

from .store import Store

MAX_ID_LENGTH = 128
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$"


def check_id(value: str, what: str) -> str:
    """Raise ValueError with the rule when value is not a valid caller-chosen id."""
    if not value or len(value) > MAX_ID_LENGTH or not re.match(ID_PATTERN, value):
        raise ValueError(f"{what} must be 1 to {MAX_ID_LENGTH} characters: letters, digits and . _ : @ -, "
                         f"starting with a letter or digit (got {value!r})")
    return value


_POOL_BYTES = 8 * 512
_pool = {"bytes": b"", "at": 0}
_pool_lock = threading.Lock()


def random_hex() -> str:
    """16 hex digits from os.urandom, read 512 ids at a time: one getrandom() call per id was 5% of
    the engine's time per request (measured, benchmarks/README.md "Serving v6")."""
    with _pool_lock:
        at = _pool["at"]
        if at + 8 > len(_pool["bytes"]):
            _pool["bytes"], at = os.urandom(_POOL_BYTES), 0
        _pool["at"] = at + 8
        return _pool["bytes"][at:at + 8].hex()


def _forget_pool() -> None:
    """A forked child must not hand out the ids its parent is about to."""
    _pool["bytes"], _pool["at"] = b"", 0


os.register_at_fork(after_in_child=_forget_pool)


def request_id() -> str:
    return f"req_{int(time.time())}_{random_hex()}"


def allocation_id() -> str:
    return f"alloc_{int(time.time())}_{random_hex()}"


def session_id(user_id: str) -> str:
    return f"{user_id}_{random_hex()}"


def vgpu_id(store: Store) -> str:
    return f"vgpu_{store.next_counter('vgpu')}"
