"""Public ids: `req_<unix>_<random>`, `alloc_<unix>_<random>`, sessions `<user_id>_<random>`
(the seed's shapes), vGPUs `vgpu_<n>`. The random part is 64 bits from `secrets`: ids never
repeat across restarts and cannot be guessed or counted (a sequence would tell how busy the
server is and name other users' objects). Also the one rule for the ids
callers choose (model, user, virtual GPU ids), shared by the API's schemas and the CLI."""
from __future__ import annotations

import re
import secrets
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


def _random() -> str:
    return secrets.token_hex(8)


def request_id() -> str:
    return f"req_{int(time.time())}_{_random()}"


def allocation_id() -> str:
    return f"alloc_{int(time.time())}_{_random()}"


def session_id(user_id: str) -> str:
    return f"{user_id}_{_random()}"


def vgpu_id(store: Store) -> str:
    return f"vgpu_{store.next_counter('vgpu')}"
