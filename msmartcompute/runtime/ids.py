"""Public ids: `req_<unix>_<n>`, `alloc_<unix>_<n>`, sessions `<user_id>_<n>`; n from a counter
persisted in the store, so ids never repeat across restarts."""
from __future__ import annotations

import time

from .store import Store


def request_id(store: Store) -> str:
    # one store write per 1000 requests: a write per request was ~9% of the serving time
    return f"req_{int(time.time())}_{store.next_in_block('req')}"


def allocation_id(store: Store) -> str:
    return f"alloc_{int(time.time())}_{store.next_counter('alloc')}"


def session_id(store: Store, user_id: str) -> str:
    return f"{user_id}_{store.next_counter('session')}"


def vgpu_id(store: Store) -> str:
    return f"vgpu_{store.next_counter('vgpu')}"
