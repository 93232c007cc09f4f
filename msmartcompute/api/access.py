"""Who may do what, from the API's side: the caller a request carries."""
from __future__ import annotations

from ..runtime.caller import Caller
from ..runtime.errors import Forbidden


def require_admin(caller: Caller | None, action: str) -> None:
    if caller is not None and not caller.is_admin:
        raise Forbidden(f"Only an admin may {action}", {"user_id": caller.user_id, "role": caller.role})


def require_self_or_admin(caller: Caller | None, user_id: str, action: str) -> None:
    if caller is not None and not caller.is_admin and caller.user_id != user_id:
        raise Forbidden(f"User '{caller.user_id}' may not {action} for user '{user_id}'",
                        {"user_id": caller.user_id, "requested_user_id": user_id})
