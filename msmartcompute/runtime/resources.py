"""User allocations: memory + compute units reserved on one physical device until end_time.

An allocation draws on the device in the capacity ledger (vgpu.py), so a model load or vGPU
that no longer fits is refused while it lasts. It ends by itself at end_time: the runtime's
reaper thread expires it within RuntimeConfig.reaper_interval_s, and every read expires lazily
first, so list/get never show an allocation past its end. DELETE frees it early; only its
owner or an admin may. Allocations are persisted and restored at start.

A user (not an admin) is held to AllocationLimits, so one user cannot take a device for a
month: each allocation lasts at most `max_duration_s` and takes at most `max_share_per_user`
of its device's memory and of its compute units (more: INVALID_INPUT_DATA, it can never be
granted); together a user holds at most `max_per_user` allocations and that share (more:
503 with Retry-After, as it fits once theirs end).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from . import clock, ids
from .access import authorize, visible
from .caller import Caller
from .errors import InsufficientMemory, InvalidInputData, NotFound
from .store import Store
from .vgpu import VGPUManager

FIELDS = ("allocation_id", "user_id", "gpu_id", "memory_size", "compute_units", "start_time", "end_time")


def _positive_int(request: dict, name: str) -> int:
    value = request.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidInputData(f"{name} must be a positive integer", {"field": name})
    return value


@dataclass(frozen=True)
class AllocationLimits:
    max_per_user: int = 8
    max_share_per_user: float = 0.5       # of one device's memory, and of its compute units
    max_duration_s: float = 24 * 3600.0


class Allocations:
    def __init__(self, store: Store, vgpus: VGPUManager, limits: AllocationLimits = AllocationLimits()):
        self.store = store
        self.vgpus = vgpus
        self.limits = limits
        self._items: dict[str, dict] = {}  # allocation_id -> record (unix times)
        self._lock = threading.RLock()

    def allocate(self, request: dict, caller: Caller | None = None) -> dict:
        user_id = request.get("user_id") or (caller.user_id if caller else None)
        if not isinstance(user_id, str) or not user_id:
            raise InvalidInputData("user_id is required", {"field": "user_id"})
        authorize(caller, "allocations.allocate", for_user=user_id)
        memory = _positive_int(request, "memory_size")
        compute_units = _positive_int(request, "compute_units")
        duration = request.get("duration")
        if not isinstance(duration, (int, float)) or isinstance(duration, bool) or duration <= 0:
            raise InvalidInputData("duration must be a positive number of seconds", {"field": "duration"})
        with self._lock:
            self.expire()
            gpu = request.get("gpu_id")
            gpu = self.vgpus.least_loaded() if gpu is None else self.vgpus.device(int(gpu)).index
            if caller is not None and not caller.is_admin:
                self._check_user_limits(user_id, gpu, memory, compute_units, float(duration))
            aid = ids.allocation_id()
            self.vgpus.reserve(("alloc", aid), memory, compute_units, device=gpu)
            start = clock.now()
            record = {"allocation_id": aid, "user_id": user_id, "gpu_id": gpu, "memory_size": memory,
                      "compute_units": compute_units, "start_time": start, "end_time": start + float(duration)}
            self._items[aid] = record
            self.store.put("allocations", aid, record)
            return _public(record)

    def _check_user_limits(self, user_id: str, gpu: int, memory: int, compute_units: int, duration: float) -> None:
        limits = self.limits
        if duration > limits.max_duration_s:
            raise InvalidInputData(f"duration is at most {limits.max_duration_s:g} s for a user's allocation",
                                   {"field": "duration", "max_duration": limits.max_duration_s})
        mine = [r for r in self._items.values() if r["user_id"] == user_id]
        if len(mine) >= limits.max_per_user:
            raise InsufficientMemory(f"user {user_id!r} holds {len(mine)} allocations, the per-user limit; free one "
                                     "or retry when one ends", {"max_allocations": limits.max_per_user})
        device = self.vgpus.device(gpu)
        for name, asked, total in (("memory_size", memory, device.memory_capacity),
                                   ("compute_units", compute_units, device.compute_units)):
            cap = int(total * limits.max_share_per_user)
            held = sum(r[name] for r in mine if r["gpu_id"] == gpu)
            if asked > cap:
                raise InvalidInputData(f"{name} {asked} is over a user's share of device {gpu}: at most {cap} "
                                       f"({limits.max_share_per_user:.0%})", {"field": name, "limit": cap})
            if held + asked > cap:
                raise InsufficientMemory(f"{name}: user {user_id!r} holds {held} on device {gpu} and may hold at most "
                                         f"{cap} ({limits.max_share_per_user:.0%}); retry when one ends",
                                         {"field": name, "limit": cap, "held": held, "requested": asked})

    def get(self, allocation_id: str, caller: Caller | None = None) -> dict:
        with self._lock:
            self.expire()
            record = self._items.get(allocation_id)
            if record is None or not visible(caller, record["user_id"]):
                raise NotFound(f"allocation {allocation_id!r} not found (or expired)")
            return _public(record)

    def list(self, caller: Caller | None = None) -> list[dict]:
        with self._lock:
            self.expire()
            return [_public(r) for r in self._items.values()
                    if visible(caller, r["user_id"])]

    def deallocate(self, allocation_id: str, caller: Caller | None = None) -> dict:
        with self._lock:
            self.get(allocation_id, caller)
            self._drop(allocation_id)
            return {"allocation_id": allocation_id, "message": "Resources deallocated successfully"}

    def expire(self) -> list[str]:
        """Free every allocation past its end_time; returns their ids."""
        with self._lock:
            now = clock.now()
            gone = [aid for aid, r in self._items.items() if r["end_time"] <= now]
            for aid in gone:
                self._drop(aid)
            return gone

    def restore(self) -> None:
        with self._lock:
            for aid, record in self.store.items("allocations"):
                if aid in self._items:
                    continue
                try:
                    self.vgpus.reserve(("alloc", aid), record["memory_size"], record["compute_units"],
                                       device=record["gpu_id"])
                except Exception:
                    self.store.delete("allocations", aid)  # the device shrank: it cannot be honoured
                    continue
                self._items[aid] = record
            self.expire()

    def _drop(self, allocation_id: str) -> None:
        self._items.pop(allocation_id, None)
        self.vgpus.release(("alloc", allocation_id))
        self.store.delete("allocations", allocation_id)


def _public(record: dict) -> dict:
    out = {k: record[k] for k in FIELDS}
    out["start_time"] = clock.iso(record["start_time"])
    out["end_time"] = clock.iso(record["end_time"])
    return out
