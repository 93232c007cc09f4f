"""Who may do what: admins manage models and vGPUs; users reach only their own sessions,
allocations and jobs. A None caller (open server, internal call) has full access."""
from __future__ import annotations

from .caller import Caller
from .errors import Forbidden


def require_admin(caller: Caller | None, action: str) -> None:
    if caller is not None and not caller.is_admin:
        raise Forbidden(f"only an admin may {action}", {"user_id": caller.user_id})


def require_owner(caller: Caller | None, owner: str | None, what: str) -> None:
    if caller is not None and not caller.is_admin and caller.user_id != owner:
        raise Forbidden(f"{what} belongs to another user", {"user_id": caller.user_id})
