"""Public ids: `req_<unix>_<n>`, `alloc_<unix>_<n>`, sessions `<user_id>_<n>`; n from a counter
persisted in the store, so ids never repeat across restarts. Also the one rule for the ids
callers choose (model, user, virtual GPU ids), shared by the API's schemas and the CLI."""
from __future__ import annotations

import re
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


def request_id(store: Store) -> str:
    # one store write per 1000 requests: a write per request was ~9% of the serving time
    return f"req_{int(time.time())}_{store.next_in_block('req')}"


def allocation_id(store: Store) -> str:
    return f"alloc_{int(time.time())}_{store.next_counter('alloc')}"


def session_id(store: Store, user_id: str) -> str:
    return f"{user_id}_{store.next_counter('session')}"


def vgpu_id(store: Store) -> str:
    return f"vgpu_{store.next_counter('vgpu')}"
