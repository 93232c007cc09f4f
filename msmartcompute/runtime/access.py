"""Who may do what: the one authorization table, one rule per engine operation
(runtime/operations.py; tests/test_api_auth.py checks that every operation has its rule).

  ADMIN  admins only: what changes what every user is served (models and their weights, vGPUs)
  SELF   a user for themself (the request's user_id), an admin for anyone
  OWNER  a user reaches only their own objects (sessions, allocations, async jobs); another
         user's object answers NOT_FOUND, as an id that does not exist does: a 403 would tell
         that the id is in use. Listings show a user only their own.
  ANY    any authenticated caller

Training is ADMIN: every model is shared, and a training swaps in the weights every user of
the model is then served, so a plain user may not retrain it for everyone. A None caller (an
open server, internal calls, the CLI) may do everything. The services call authorize() /
visible() at their entry, before any work, so every route (HTTP, OpenAI-compatible, engine
call) passes the same check.
"""
from __future__ import annotations

from .caller import Caller
from .errors import Forbidden

ADMIN, SELF, OWNER, ANY = "admin", "self", "owner", "any"

# operation -> (rule, what a refusal says the caller tried)
POLICY: dict[str, tuple[str, str]] = {
    "registry.load": (ADMIN, "load a model"),
    "registry.unload": (ADMIN, "unload a model"),
    "registry.list": (ANY, "list models"),
    "registry.get": (ANY, "read a model"),
    "inference.infer": (ANY, "run inference"),
    "inference.infer_stream": (ANY, "run inference"),
    "inference.infer_batch": (ANY, "run inference"),
    "inference.submit": (ANY, "queue inference"),
    "inference.get": (OWNER, "read an inference result"),
    "inference.chat_prompt": (ANY, "render a chat prompt"),
    "training.train": (ADMIN, "train a model (its weights are shared by every user)"),
    "training.submit": (ADMIN, "train a model (its weights are shared by every user)"),
    "training.get": (OWNER, "read a training"),
    "training.cancel": (OWNER, "cancel a training"),
    "optimization.optimize": (ADMIN, "optimize a model"),
    "sessions.create": (SELF, "create a session"),
    "sessions.get": (OWNER, "read a session"),
    "sessions.delete": (OWNER, "end a session"),
    "allocations.allocate": (SELF, "allocate resources"),
    "allocations.get": (OWNER, "read an allocation"),
    "allocations.list": (OWNER, "list allocations"),
    "allocations.deallocate": (OWNER, "free an allocation"),
    "vgpus.create": (ADMIN, "create a virtual GPU"),
    "vgpus.describe": (ANY, "read a virtual GPU"),
    "vgpus.list": (ANY, "list virtual GPUs"),
    "delete_vgpu": (ADMIN, "delete a virtual GPU"),
    "health": (ANY, "read health"),
    "metrics": (ANY, "read metrics"),
    "metrics_history": (ANY, "read metrics"),
    "list_jobs": (OWNER, "list jobs"),
}


def authorize(caller: Caller | None, operation: str, for_user: str | None = None) -> None:
    """Raise Forbidden unless `caller` may do `operation` (ADMIN, or SELF for `for_user`)."""
    rule, action = POLICY[operation]
    if caller is None or caller.is_admin or rule in (ANY, OWNER):
        return
    if rule == ADMIN:
        raise Forbidden(f"only an admin may {action}", {"user_id": caller.user_id, "role": caller.role})
    if for_user != caller.user_id:
        raise Forbidden(f"user {caller.user_id!r} may not {action} for user {for_user!r}",
                        {"user_id": caller.user_id, "requested_user_id": for_user})


def visible(caller: Caller | None, owner: str | None) -> bool:
    """Whether `caller` may reach an object `owner` owns (an OWNER rule); if not, the service
    answers NOT_FOUND."""
    return caller is None or caller.is_admin or caller.user_id == owner


def owner_filter(caller: Caller | None) -> str | None:
    """The owner a listing is limited to: None (everything) for an admin or an open server."""
    return None if caller is None or caller.is_admin else caller.user_id
