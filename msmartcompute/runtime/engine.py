"""The Runtime: the engine's parts wired together, with their lifecycle. The API calls the
services directly, each in its own module:

  registry      models: load, list, get, unload          (registry.py)
  inference     infer, infer_batch, submit, get          (inference.py)
  training      train, submit, get, cancel               (training.py)
  optimization  optimize                                 (optimize.py)
  sessions      create, get, delete                      (sessions.py)
  allocations   allocate, get, list, deallocate          (resources.py)
  vgpus         create, get, list (+ Runtime.delete_vgpu, which also closes its executor)

and health(), metrics(), metrics_history() here. Batching (queues and workers, one executor
per vGPU or device), jobs (async work), metrics and the store are shared by the services."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import msmartcompute

from . import clock, devices
from .access import authorize, owner_filter
from .batching import Executor
from .caller import Caller
from .generation.worker import GenerationWorker
from .errors import InternalError, MSCError
from .inference import Inference
from .jobs import JobLimits, JobRunner
from .metrics import Metrics
from .operations import OPERATIONS
from .optimize import Optimization
from .registry import Registry, map_large_blocks
from .resources import AllocationLimits, Allocations
from .sessions import Sessions
from .store import STORE_FILENAME, Store
from .training import Training, TrainingLimits
from .vgpu import VGPUManager

log = logging.getLogger("msmartcompute.runtime")


@dataclass
class RuntimeConfig:
    state_dir: Path = Path("var")
    model_roots: list[Path] | None = None          # None: [state_dir / "models"]
    host_memory_capacity: int | None = None        # bytes of the host as device 0; None: half the RAM
    max_batch_size: int = 32                       # when the load spec gives none
    max_queue_delay_ms: float = 5.0                # 0: batching off
    max_queue_size: int = 1024                     # per model; beyond it QUEUE_FULL
    request_timeout_s: float = 30.0                # when the request gives no `timeout`
    max_output_values: int = 1 << 22               # numbers in one response (inference/batch: all together)
    session_ttl_s: float = 3600.0
    max_sessions_per_user: int = 100
    max_allocations_per_user: int = 8
    max_allocation_share_per_user: float = 0.5     # of a device's memory and of its compute units
    max_allocation_duration_s: float = 24 * 3600.0
    job_workers: int = 4                           # async inference jobs
    training_job_workers: int = 1                  # async trainings: their own pool, never holding inference's
    max_jobs_per_user: int = 64                    # queued + running async jobs of one user (more: QUEUE_FULL)
    job_read_ttl_s: float = 3600.0                 # a finished job is deleted this long after, once read
    job_unread_ttl_s: float = 7 * 24 * 3600.0      # ... or this long after, never read
    max_sync_trainings: int = 4                    # POST /training at once (each holds an HTTP thread)
    sync_training_timeout_s: float = 600.0         # POST /training stops after this; longer: /training/async
    model_lock_wait_s: float = 10.0                # a sync training / optimize waits this long for its model
    reaper_interval_s: float = 1.0                 # allocation expiry, session purge
    metrics_sample_interval_s: float = 10.0
    metrics_window_s: float = 60.0
    metrics_retention_s: float = 7 * 24 * 3600.0


class Runtime:
    def __init__(self, config: RuntimeConfig):
        self.config = config
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.state_dir / STORE_FILENAME)
        self.started_at = time.monotonic()
        roots = config.model_roots if config.model_roots is not None else [self.state_dir / "models"]
        self.meter = Metrics(self.store, config.metrics_window_s)
        self.vgpus = VGPUManager(self.store, config.host_memory_capacity)
        self.allocations = Allocations(self.store, self.vgpus, AllocationLimits(
            config.max_allocations_per_user, config.max_allocation_share_per_user, config.max_allocation_duration_s))
        self.executors: dict[str, Executor] = {}
        self._executors_lock = threading.Lock()
        self.registry = Registry(self.store, self.vgpus, roots, self._executor_for,
                                 config.max_batch_size, config.max_queue_size)
        self.sessions = Sessions(self.store, config.session_ttl_s, self.registry.entry, config.max_sessions_per_user)
        self._stop = threading.Event()
        self.jobs = JobRunner(self.store, config.job_workers, {"training": config.training_job_workers},
                              JobLimits(config.max_jobs_per_user, config.job_read_ttl_s, config.job_unread_ttl_s))
        self.inference = Inference(self.store, self.registry, self.jobs, self.meter,
                                   config.request_timeout_s, config.job_workers, config.max_output_values)
        self.training = Training(self.store, self.registry, self.jobs, self._stop.is_set,
                                 TrainingLimits(config.max_sync_trainings, config.sync_training_timeout_s,
                                                config.model_lock_wait_s))
        self.optimization = Optimization(self.registry, config.model_lock_wait_s)
        self._threads: list[threading.Thread] = []
        self._state = "new"  # new -> started -> closed
        self._state_lock = threading.Lock()

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Restore persisted state (vGPUs, allocations, models, jobs), start workers and threads."""
        with self._state_lock:
            if self._state != "new":
                return
            self._state = "started"
        map_large_blocks()  # unloaded models give their host memory back (registry.py)
        for what, restore in (("virtual GPUs", self.vgpus.restore), ("allocations", self.allocations.restore)):
            try:
                restore()
            except MSCError as exc:
                log.warning("could not restore %s: %s", what, exc.message)
        self.registry.restore()
        self.jobs.start()
        self._every(self.config.reaper_interval_s, self._reap, "msc-reaper")
        self._every(self.config.metrics_sample_interval_s, self._sample, "msc-metrics")

    def close(self) -> None:
        """Stop threads and workers promptly; persisted state stays for the next start."""
        with self._state_lock:
            if self._state == "closed":
                return
            self._state = "closed"
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        self.jobs.stopping()  # running jobs cut short by the executors' close are queued again
        with self._executors_lock:
            executors, self.executors = list(self.executors.values()), {}
        for ex in executors:
            ex.close(InternalError("the runtime is shutting down"))
        self.jobs.close()
        self.registry.close()
        self.store.close()

    def _every(self, interval: float, fn, name: str) -> None:
        def loop():
            try:
                while not self._stop.wait(interval):
                    try:
                        fn()
                    except Exception:
                        log.exception("%s failed", name)
            finally:
                self.store.close()
        t = threading.Thread(target=loop, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _reap(self) -> None:
        self.allocations.expire()
        self.sessions.purge()
        self.jobs.purge()

    def _sample(self) -> None:
        self.meter.persist(self.metrics())
        self.meter.prune_history(clock.now() - self.config.metrics_retention_s)

    def _executor_for(self, device: int, vgpu_id: str | None, generative: bool = False) -> Executor | GenerationWorker:
        """The worker of a vGPU (or device): the batching Executor, or for decoders the
        GenerationWorker; both share the device's time through its DeviceScheduler."""
        key = f"vgpu:{vgpu_id}" if vgpu_id else f"device:{device}"
        if generative:
            key = f"generation:{key}"
        with self._executors_lock:
            ex = self.executors.get(key)
            if ex is None:
                if vgpu_id:
                    v = self.vgpus.get(vgpu_id)
                    policy, units = v.scheduling_policy, v.compute_units
                else:
                    policy, units = "round_robin", max(1, self.vgpus.device_free(device)[1])
                cuda = self.vgpus.device(device).torch_device
                if generative:
                    ex = GenerationWorker(key, policy, self.vgpus.schedulers[device], units, self.meter)
                else:
                    ex = Executor(key, policy, self.vgpus.schedulers[device], units,
                                  self.config.max_queue_delay_ms / 1000.0, self.meter,
                                  cuda if cuda.type == "cuda" else None)
                self.executors[key] = ex
            return ex

    # ---- health ---------------------------------------------------------------------------------
    def health(self) -> dict:
        """The seed's health fields, all measured now."""
        if devices.gpu_count() > 0:
            readings = devices.gpu_readings(0)
            memory_usage = (readings["memory_used"] / readings["memory_total"]
                            if readings["memory_total"] else devices.host_memory_usage())
        else:
            memory_usage = devices.host_memory_usage()
        return {
            "status": "healthy",
            "version": msmartcompute.__version__,
            "uptime": round(time.monotonic() - self.started_at, 3),
            "gpu_status": devices.gpu_status(),
            "memory_usage": round(memory_usage, 4),
        }

    def operation(self, op: str):
        """The bound method an OPERATIONS name stands for."""
        if op not in OPERATIONS:
            raise KeyError(op)
        target = self
        for part in op.split("."):
            target = getattr(target, part)
        return target

    # ---- virtual GPUs: deleting one also closes its executor ---------------------------------
    def delete_vgpu(self, vgpu_id: str, caller: Caller | None = None) -> dict:
        authorize(caller, "delete_vgpu")
        self.vgpus.delete(vgpu_id)
        with self._executors_lock:
            closing = [self.executors.pop(k, None) for k in (f"vgpu:{vgpu_id}", f"generation:vgpu:{vgpu_id}")]
        for ex in closing:
            if ex is not None:
                ex.close(InternalError(f"virtual GPU {vgpu_id} was deleted"))
        return {"virtual_gpu_id": vgpu_id, "message": "Virtual GPU destroyed successfully"}

    # ---- metrics --------------------------------------------------------------------------------
    def queued_requests(self) -> int:
        with self._executors_lock:
            executors = list(self.executors.values())
        return sum(ex.depth() for ex in executors) + self.jobs.count("queued")

    def metrics(self) -> dict:
        with self._executors_lock:
            executors = list(self.executors.values())
        depths = {m: d for ex in executors for m, d in ex.depths().items()}
        snapshot = self.meter.snapshot(sum(depths.values()) + self.jobs.count("queued"), depths)
        loaded = {m["model_id"] for m in self.registry.list()}
        for model_id in set(snapshot["models"]) - loaded:  # unloaded since: its figures go with it
            self.meter.forget_model(model_id)
            del snapshot["models"][model_id]
        snapshot["devices"] = [{"index": d.index, "name": d.name, "memory_total": d.memory_capacity,
                                "memory_unreserved": self.vgpus.device_free(d.index)[0],
                                "compute_units": d.compute_units} for d in self.vgpus.devices]
        snapshot["generation"] = {m: s for ex in executors if isinstance(ex, GenerationWorker)
                                  for m, s in ex.snapshots().items()}
        return snapshot

    def list_jobs(self, limit: int = 50, caller: Caller | None = None) -> list[dict]:
        """The latest async inference and training jobs, newest first (a user's own only):
        {request_id, kind, status, model_id, owner, created_at, started_at, completed_at, error}, and
        for training epochs, epochs_completed, current_loss, loss_history."""
        out = []
        for job in self.jobs.recent(limit, owner_filter(caller)):
            item = {"request_id": job["id"], "kind": job["kind"], "status": job["status"],
                    "model_id": job["model_id"], "owner": job["owner"],
                    **{k: clock.iso(job[k]) if job[k] else None for k in ("created_at", "started_at", "completed_at")},
                    "error": (job["error"] or {}).get("message")}
            if job["kind"] == "training":
                progress = (job["result"] or {}) if job["status"] == "completed" else (job["progress"] or {})
                history = progress.get("loss_history") or []
                item.update(epochs=(job["progress"] or {}).get("epochs"),
                            epochs_completed=progress.get("epochs_completed", len(history)),
                            current_loss=history[-1] if history else None, loss_history=history)
            out.append(item)
        return out

    def metrics_history(self, start_time: datetime | None = None, end_time: datetime | None = None,
                        interval: int = 60) -> list[dict]:
        return self.meter.history(clock.to_unix(start_time), clock.to_unix(end_time), interval)
