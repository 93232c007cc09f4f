"""Physical devices -> virtual GPUs, the capacity ledger, and the device-time dispatcher.

Physical devices come from torch (CUDA: total memory, SM count). With no GPU the host is
physical device 0: memory capacity RuntimeConfig.host_memory_capacity (default half the
host RAM), compute units = os.cpu_count().

A virtual GPU is a memory quota plus a compute-unit share on one physical device, with a
scheduling policy for the models placed on it (see `choose_queue` in batching.py):
  round_robin  the vGPU's models with work take turns, one batch each;
  priority     the model with the highest load-spec `priority` (default 0) goes first,
               ties by the oldest waiting request;
  fair_share   the model that has used the least device time on this vGPU goes first,
               so a model with heavy batches cannot starve a light one.

Capacity is reserved in one ledger: vGPU quotas, user allocations and models placed directly
on a device draw on the device; models placed on a vGPU draw on its quota. A reservation that
does not fit is refused with INSUFFICIENT_MEMORY (requested and available bytes in details).

Device time across vGPUs (DeviceScheduler): one run() at a time per physical device; when
several workers wait, the slot goes to the one with the least weighted device time, i.e.
seconds used / compute units (stride scheduling). Saturated vGPUs with 3 and 1 compute units
thus get device time 3:1. A worker that was idle starts at the current virtual time, so idling
earns no credit.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from . import clock, devices, ids
from .access import authorize
from .caller import Caller
from .errors import InsufficientMemory, InvalidInputData, NotFound
from .store import Store

POLICIES = ("round_robin", "priority", "fair_share")


@dataclass
class PhysicalDevice:
    index: int
    name: str
    torch_device: torch.device
    memory_capacity: int   # bytes
    compute_units: int     # SMs (GPU) or CPU cores (host)


@dataclass
class VirtualGPU:
    virtual_gpu_id: str
    physical_gpu_id: int
    memory_size: int
    compute_units: int
    scheduling_policy: str
    created_at: float
    status: str = "active"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["created_at"] = clock.iso(self.created_at)
        return d


@dataclass
class Reservation:
    device: int
    memory: int
    compute_units: int
    vgpu: str | None  # drawn from this vGPU's quota, else from the device


def discover_devices(host_memory_capacity: int | None) -> list[PhysicalDevice]:
    if devices.gpu_count() > 0:
        out = []
        for i in range(devices.gpu_count()):
            props = torch.cuda.get_device_properties(i)
            out.append(PhysicalDevice(i, props.name, torch.device("cuda", i), int(props.total_memory),
                                      int(props.multi_processor_count)))
        return out
    capacity = host_memory_capacity if host_memory_capacity is not None else devices.host_memory()[0] // 2
    return [PhysicalDevice(0, "host", torch.device("cpu"), int(capacity), os.cpu_count() or 1)]


class DeviceScheduler:
    """Shares one physical device's time across workers in proportion to their compute units."""

    def __init__(self):
        self._cond = threading.Condition()
        self._busy = False
        self._vtime: dict[str, float] = {}
        self._weight: dict[str, float] = {}
        self._waiting: set[str] = set()
        self._floor = 0.0  # virtual time of the latest grant
        self.used_s: dict[str, float] = {}  # device seconds per worker (measured)

    def register(self, key: str, compute_units: int) -> None:
        with self._cond:
            self._weight[key] = float(max(1, compute_units))
            self._vtime.setdefault(key, self._floor)
            self.used_s.setdefault(key, 0.0)

    def unregister(self, key: str) -> None:
        with self._cond:
            self._weight.pop(key, None)
            self._vtime.pop(key, None)

    def idle(self) -> bool:
        """Nobody holds or waits for the device now (a hint: it may change at once)."""
        with self._cond:
            return not self._busy and not self._waiting

    @contextmanager
    def slot(self, key: str, deadline: float | None = None):
        """Hold the device for one run. With a `deadline` (time.monotonic()), a wait that
        outlasts it raises TimeoutError instead of running late."""
        with self._cond:
            self._vtime[key] = max(self._vtime.get(key, 0.0), self._floor)
            self._waiting.add(key)
            try:
                while self._busy or key != min(self._waiting, key=lambda k: (self._vtime[k], k)):
                    if deadline is None:
                        self._cond.wait()
                        continue
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._cond.notify_all()  # another waiter may be next now
                        raise TimeoutError("the device stayed busy past the request's deadline")
                    self._cond.wait(left)
            finally:
                self._waiting.discard(key)
            self._busy = True
            self._floor = self._vtime[key]
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            with self._cond:
                self._vtime[key] = self._vtime.get(key, 0.0) + dt / self._weight.get(key, 1.0)
                self.used_s[key] = self.used_s.get(key, 0.0) + dt
                self._busy = False
                self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        """Hold the device: no worker runs until released (maintenance; tests use it to fill queues)."""
        with self.slot("__exclusive__"):
            yield


class VGPUManager:
    """Physical devices, virtual GPUs (persisted) and the capacity ledger."""

    def __init__(self, store: Store, host_memory_capacity: int | None):
        self.store = store
        self.devices = discover_devices(host_memory_capacity)
        self.schedulers = {d.index: DeviceScheduler() for d in self.devices}
        self.vgpus: dict[str, VirtualGPU] = {}
        self._reserved: dict[tuple, Reservation] = {}
        self._lock = threading.RLock()

    # ---- ledger ---------------------------------------------------------------------------
    def device(self, index: int) -> PhysicalDevice:
        for d in self.devices:
            if d.index == index:
                return d
        raise InvalidInputData(f"no physical device {index}",
                               {"available_devices": [d.index for d in self.devices]})

    def device_free(self, index: int) -> tuple[int, int]:
        """(memory bytes, compute units) on a device not yet reserved."""
        with self._lock:
            d = self.device(index)
            mine = [r for r in self._reserved.values() if r.device == index and r.vgpu is None]
            return (d.memory_capacity - sum(r.memory for r in mine),
                    d.compute_units - sum(r.compute_units for r in mine))

    def vgpu_free(self, vgpu_id: str) -> int:
        with self._lock:
            v = self.get(vgpu_id)
            return v.memory_size - sum(r.memory for r in self._reserved.values() if r.vgpu == vgpu_id)

    def least_loaded(self) -> int:
        """The device with the most unreserved memory (lowest index on a tie)."""
        with self._lock:
            return max(self.devices, key=lambda d: (self.device_free(d.index)[0], -d.index)).index

    def reserve(self, key: tuple, memory: int, compute_units: int = 0, *, device: int | None = None,
                vgpu: str | None = None) -> Reservation:
        """Reserve on a vGPU's quota (vgpu=) or a device (device=); refuse what does not fit."""
        with self._lock:
            if vgpu is not None:
                v = self.get(vgpu)
                free_mem, free_cu, where = self.vgpu_free(vgpu), compute_units, f"virtual GPU {vgpu}"
                total_mem, total_cu = v.memory_size, v.compute_units
                device = v.physical_gpu_id
            else:
                free_mem, free_cu = self.device_free(device)
                total_mem, total_cu = self.device(device).memory_capacity, self.device(device).compute_units
                where = f"device {device}"
            if memory > total_mem or compute_units > total_cu:  # no wait would help: a 4xx, not a 503
                raise InvalidInputData(
                    f"can never fit: {memory} bytes and {compute_units} compute units requested, {where} has "
                    f"{total_mem} bytes and {total_cu} compute units in all",
                    {"requested": int(memory), "capacity": int(total_mem), "requested_compute_units":
                     int(compute_units), "capacity_compute_units": int(total_cu), "where": where})
            if memory > free_mem:
                raise InsufficientMemory(
                    f"{memory} bytes requested on {where}, {max(free_mem, 0)} available",
                    {"requested": int(memory), "available": int(max(free_mem, 0)), "where": where})
            if compute_units > free_cu:
                raise InsufficientMemory(
                    f"{compute_units} compute units requested on {where}, {max(free_cu, 0)} available",
                    {"requested_compute_units": int(compute_units),
                     "available_compute_units": int(max(free_cu, 0)), "where": where})
            r = Reservation(device, int(memory), int(compute_units), vgpu)
            self._reserved[key] = r
            return r

    def resize(self, key: tuple, memory: int) -> None:
        """Change a reservation's bytes in place (a model swapped for a smaller or bigger one);
        growth that does not fit is refused with INSUFFICIENT_MEMORY and changes nothing."""
        with self._lock:
            r = self._reserved[key]
            free = self.vgpu_free(r.vgpu) if r.vgpu is not None else self.device_free(r.device)[0]
            if memory - r.memory > free:
                raise InsufficientMemory(f"{memory - r.memory} more bytes needed, {max(free, 0)} available",
                                         {"requested": int(memory - r.memory), "available": int(max(free, 0))})
            r.memory = int(memory)

    def release(self, key: tuple) -> None:
        with self._lock:
            self._reserved.pop(key, None)

    def reserved_bytes(self) -> int:
        with self._lock:
            return sum(r.memory for r in self._reserved.values())

    # ---- virtual GPUs ---------------------------------------------------------------------
    def get(self, vgpu_id: str) -> VirtualGPU:
        v = self.vgpus.get(vgpu_id)
        if v is None:
            raise NotFound(f"virtual GPU {vgpu_id!r} not found", {"available_vgpus": sorted(self.vgpus)})
        return v

    def describe(self, vgpu_id: str) -> dict:
        return self.get(vgpu_id).to_dict()

    def list(self) -> list[dict]:
        return [v.to_dict() for v in list(self.vgpus.values())]

    def create(self, request: dict, caller: Caller | None = None, *, persist: bool = True) -> dict:
        authorize(caller, "vgpus.create")
        with self._lock:
            vid = request.get("virtual_gpu_id") or ids.vgpu_id(self.store)
            if vid in self.vgpus:
                raise InvalidInputData(f"virtual GPU {vid!r} already exists", {"virtual_gpu_id": vid})
            memory, cu = request.get("memory_size"), request.get("compute_units")
            policy = request.get("scheduling_policy") or "round_robin"
            for name, value in (("memory_size", memory), ("compute_units", cu)):
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise InvalidInputData(f"{name} must be a positive integer", {"field": name})
            if policy not in POLICIES:
                raise InvalidInputData(f"scheduling_policy must be one of {POLICIES}",
                                       {"field": "scheduling_policy"})
            device = request.get("physical_gpu_id")
            device = self.least_loaded() if device is None else self.device(int(device)).index
            self.reserve(("vgpu", vid), memory, cu, device=device)
            v = VirtualGPU(vid, device, memory, cu, policy, request.get("created_at") or clock.now())
            self.vgpus[vid] = v
            if persist:
                self.store.put("vgpus", vid, asdict(v))
            return v.to_dict()

    def delete(self, vgpu_id: str) -> None:
        with self._lock:
            self.get(vgpu_id)
            if any(r.vgpu == vgpu_id for r in self._reserved.values()):
                users = sorted(k[1] for k, r in self._reserved.items() if r.vgpu == vgpu_id)
                raise InvalidInputData(f"virtual GPU {vgpu_id!r} still hosts models {users}; unload them first",
                                       {"models": users})
            self.release(("vgpu", vgpu_id))
            del self.vgpus[vgpu_id]
            self.store.delete("vgpus", vgpu_id)

    def restore(self) -> None:
        for vid, data in self.store.items("vgpus"):
            if vid not in self.vgpus:
                self.create(data, persist=False)

