"""The Runtime: the one object the API talks to. It wires the parts of the engine, each in its
own module: registry (models), vgpu (devices, vGPUs, capacity, device time), resources
(allocations), batching (queues and workers), jobs (async work), sessions, metrics, store."""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

import msmartcompute

import torch

from . import clock, devices, ids, optimize, training
from .access import require_admin, require_owner
from .batching import Executor, Pending, Result
from .caller import Caller
from .errors import InsufficientMemory, InternalError, InvalidInputData, MSCError, NotFound, RequestTimeout
from .jobs import JobRunner, error_dict
from .metrics import Metrics
from .registry import Registry, map_large_blocks
from .resources import Allocations
from .sessions import Sessions
from .store import STORE_FILENAME, Store
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
    session_ttl_s: float = 3600.0
    job_workers: int = 4
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
        self.allocations = Allocations(self.store, self.vgpus)
        self.sessions = Sessions(self.store, config.session_ttl_s)
        self.executors: dict[str, Executor] = {}
        self._executors_lock = threading.Lock()
        self.registry = Registry(self.store, self.vgpus, roots, self._executor_for,
                                 config.max_batch_size, config.max_queue_size)
        self.jobs = JobRunner(self.store, config.job_workers)
        self.jobs.register("inference", self._inference_job, rerun_on_restart=True)
        self.jobs.register("training", self._training_job, rerun_on_restart=False)
        self._model_locks: dict[str, threading.Lock] = {}  # one training / optimization per model at a time
        self._model_locks_lock = threading.Lock()
        self._stop = threading.Event()
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

    def _sample(self) -> None:
        self.meter.persist(self.metrics())
        self.meter.prune_history(clock.now() - self.config.metrics_retention_s)

    def _executor_for(self, device: int, vgpu_id: str | None) -> Executor:
        key = f"vgpu:{vgpu_id}" if vgpu_id else f"device:{device}"
        with self._executors_lock:
            ex = self.executors.get(key)
            if ex is None:
                if vgpu_id:
                    v = self.vgpus.get(vgpu_id)
                    policy, units = v.scheduling_policy, v.compute_units
                else:
                    policy, units = "round_robin", max(1, self.vgpus.device_free(device)[1])
                cuda = self.vgpus.device(device).torch_device
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

    # ---- models ---------------------------------------------------------------------------------
    def load_model(self, spec: dict, caller: Caller | None = None) -> dict:
        return self.registry.load(spec, caller)

    def list_models(self, caller: Caller | None = None) -> list[dict]:
        return self.registry.list()

    def get_model(self, model_id: str, caller: Caller | None = None) -> dict:
        return self.registry.entry(model_id).public()

    def unload_model(self, model_id: str, caller: Caller | None = None) -> dict:
        out = self.registry.unload(model_id, caller)
        self.meter.forget_model(model_id)
        return out

    # ---- inference ------------------------------------------------------------------------------
    def _enqueue(self, request: dict, request_id: str, may_run_inline: bool = False) -> tuple[Executor, Pending]:
        entry = self.registry.entry(request.get("model_id"))
        model, executor = entry.model, entry.executor
        if "input_data" not in request:
            raise InvalidInputData("input_data is required", {"field": "input_data"})
        try:
            prepared = model.prepare(request["input_data"], request.get("options") or {})
        except ValueError as exc:
            raise InvalidInputData(str(exc), {"field": "input_data"}) from None
        # options.timeout is the documented field; a top-level "timeout" is accepted too
        timeout = (request.get("options") or {}).get("timeout", request.get("timeout", self.config.request_timeout_s))
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise InvalidInputData("timeout must be a positive number of seconds", {"field": "timeout"})
        pending = Pending(request_id, prepared, deadline=time.monotonic() + float(timeout))
        queue = executor.submit(entry.model_id, pending, may_run_inline)
        if queue is not None:  # the executor was idle: run it on this thread (see batching.py)
            executor.run_inline(queue, pending)
        return executor, pending

    def _wait(self, executor: Executor, pending: Pending) -> Result:
        try:
            res = pending.future.result(timeout=max(0.0, pending.deadline - time.monotonic()))
        except FutureTimeout:
            executor.abandon(pending)
            res = None
        if res is None or res.done_at > pending.deadline:  # an inline run can end past it
            raise RequestTimeout(f"request {pending.request_id} did not complete in time",
                                 {"request_id": pending.request_id}) from None
        return res

    def _finish(self, executor: Executor, pending: Pending, t0: float) -> dict:
        try:
            res = self._wait(executor, pending)
        except MSCError:
            self.meter.record_inference(False, time.perf_counter() - t0)
            raise
        elapsed = time.perf_counter() - t0
        self.meter.record_inference(True, elapsed, res.output.tokens_generated)
        data = res.output.output_data
        return {"request_id": pending.request_id,
                "output_data": data.tolist() if isinstance(data, np.ndarray) else data,
                "inference_time": elapsed, "tokens_generated": int(res.output.tokens_generated),
                "memory_used": int(res.memory_used)}

    def _infer(self, request: dict, request_id: str) -> dict:
        t0 = time.perf_counter()
        try:
            executor, pending = self._enqueue(request, request_id, may_run_inline=True)
        except MSCError:
            self.meter.record_inference(False, time.perf_counter() - t0)
            raise
        return self._finish(executor, pending, t0)

    def infer(self, request: dict, caller: Caller | None = None) -> dict:
        """Run one request through its model's batch queue. inference_time: seconds end to end
        (queue wait + run). memory_used: on CUDA the allocator's peak growth during the run that
        served it; on the host the bytes of this request's input and output tensors."""
        return self._infer(request, ids.request_id(self.store))

    def infer_batch(self, requests: list[dict], caller: Caller | None = None) -> dict:
        """All requests are queued before any is awaited, so they can share batches."""
        t0 = time.perf_counter()
        queued = []
        for request in requests:
            rid = ids.request_id(self.store)
            try:
                queued.append((rid, *self._enqueue(request, rid), None))
            except MSCError as exc:
                self.meter.record_inference(False, 0.0)
                queued.append((rid, None, None, exc))
        results = []
        for rid, executor, pending, exc in queued:
            if exc is None:
                try:
                    out = self._finish(executor, pending, t0)
                    results.append({k: out[k] for k in ("request_id", "output_data", "inference_time")})
                    continue
                except MSCError as e:
                    exc = e
            results.append({"request_id": rid, "error": error_dict(exc)})
        return {"results": results, "total_time": time.perf_counter() - t0}

    def submit_inference(self, request: dict, caller: Caller | None = None) -> dict:
        """Queue an async inference job (validated now: model and input). estimated_completion:
        now + (jobs ahead / job workers + 1) x the mean duration of recent inference jobs (else
        the recent inference latency)."""
        entry = self.registry.entry(request.get("model_id"))
        try:
            entry.model.prepare(request.get("input_data"), request.get("options") or {})
        except ValueError as exc:
            raise InvalidInputData(str(exc), {"field": "input_data"}) from None
        rid = ids.request_id(self.store)
        data = np.asarray(request["input_data"])
        stored = {k: v for k, v in request.items() if k != "input_data"}
        stored.update(input_data=data.tolist(), input_dtype=data.dtype.name, request_id=rid)
        owner = caller.user_id if caller else request.get("user_id")
        self.jobs.submit(rid, "inference", owner, stored)
        ahead = self.jobs.queued_ahead(rid)
        per_job = self.jobs.mean_duration("inference") or self.meter.recent_latency() or 0.0
        eta = clock.now() + (ahead // max(1, self.config.job_workers) + 1) * per_job
        return {"request_id": rid, "status": "queued", "estimated_completion": clock.iso(eta)}

    def _inference_job(self, stored: dict) -> dict:
        request = dict(stored)
        request["input_data"] = np.asarray(stored["input_data"], dtype=stored.get("input_dtype"))
        out = self._infer(request, stored["request_id"])
        return {k: out[k] for k in ("output_data", "inference_time", "tokens_generated", "memory_used")}

    def get_inference(self, request_id: str, caller: Caller | None = None) -> dict:
        job = self.jobs.get(request_id)
        if job is None or job["kind"] != "inference":
            raise NotFound(f"inference request {request_id!r} not found")
        require_owner(caller, job["owner"], f"request {request_id}")
        result = job["result"] or {}
        out = {"request_id": request_id, "status": job["status"], "output_data": result.get("output_data"),
               "inference_time": result.get("inference_time"),
               "completion_time": clock.iso(job["completed_at"]) if job["status"] == "completed" else None}
        if job["status"] == "failed":
            out["error"] = {k: job["error"][k] for k in ("code", "message")}
        return out

    # ---- training -------------------------------------------------------------------------------
    # Training works on a deep copy and swaps it in at the end (Registry.swap), so inference on
    # the model goes on during training and never sees half-updated weights. One training or
    # optimization per model at a time (later ones wait). Jobs cut short by a shutdown fail
    # with the reason and are not resumed (rerun_on_restart=False).

    def _model_lock(self, model_id: str) -> threading.Lock:
        with self._model_locks_lock:
            return self._model_locks.setdefault(model_id, threading.Lock())

    def train(self, request: dict, caller: Caller | None = None) -> dict:
        """Train synchronously: {request_id, final_loss, loss_history, training_time,
        epochs_completed, model_updated, seed}."""
        return self._train(request, ids.request_id(self.store), caller)

    def _train(self, request: dict, request_id: str, caller: Caller | None, progress=None) -> dict:
        model_id = request.get("model_id")
        self.registry.entry(model_id)
        with self._model_lock(model_id):
            entry = self.registry.entry(model_id)
            plan = training.parse(request, entry.model)
            save_path = None
            if plan.save_path is not None:
                require_admin(caller, "save trained weights (save_path)")
                save_path = self.registry.resolve_save_path(plan.save_path)
            try:
                outcome = training.fit(entry.model, plan, progress, self._stop.is_set)
            except InterruptedError:
                raise InternalError("the server stopped while this training job was running; training jobs "
                                    "are not resumed", {"request_id": request_id}) from None
            except (torch.OutOfMemoryError, MemoryError) as exc:
                raise InsufficientMemory(f"out of memory while training: {exc}".strip(),
                                         {"during": "training"}) from None
            changes = {"trained_task": plan.task}
            if save_path is not None:
                from safetensors.torch import save_file

                save_file({k: v.detach().cpu().contiguous() for k, v in outcome.module.state_dict().items()},
                          save_path)
                changes["model_path"] = save_path
            if outcome.model_updated or save_path is not None:
                self.registry.swap(entry, outcome.module, entry.model.dtype, changes)
        history = outcome.loss_history
        return {"request_id": request_id, "final_loss": history[-1], "loss_history": history,
                "training_time": outcome.training_time, "epochs_completed": len(history),
                "model_updated": outcome.model_updated, "seed": plan.seed}

    def submit_training(self, request: dict, caller: Caller | None = None) -> dict:
        """Queue a training job (validated now). estimated_completion: now + (jobs ahead / job
        workers + 1) x the mean duration of recent training jobs (now when there is none yet)."""
        entry = self.registry.entry(request.get("model_id"))
        plan = training.parse(request, entry.model)
        if plan.save_path is not None:
            require_admin(caller, "save trained weights (save_path)")
            self.registry.resolve_save_path(plan.save_path)
        rid = ids.request_id(self.store)
        stored = dict(request, request_id=rid, caller=None if caller is None else [caller.user_id, caller.role])
        for key in ("training_data", "labels"):
            if stored.get(key) is not None:
                stored[key] = np.asarray(stored[key]).tolist()
        owner = caller.user_id if caller else request.get("user_id")
        self.jobs.submit(rid, "training", owner, stored)
        self.jobs.set_progress(rid, {"epochs_completed": 0, "current_loss": None, "loss_history": [],
                                     "epochs": plan.epochs})
        ahead = self.jobs.queued_ahead(rid)
        per_job = self.jobs.mean_duration("training") or 0.0
        eta = clock.now() + (ahead // max(1, self.config.job_workers) + 1) * per_job
        return {"request_id": rid, "status": "queued", "estimated_completion": clock.iso(eta)}

    def _training_job(self, stored: dict) -> dict:
        rid = stored["request_id"]
        caller = Caller(*stored["caller"]) if stored.get("caller") else None
        last = [0.0]

        def progress(epochs_completed: int, loss: float, history: list[float]) -> None:
            now = time.monotonic()
            if now - last[0] >= 0.1 or epochs_completed == stored.get("epochs", 1):
                last[0] = now
                self.jobs.set_progress(rid, {"epochs_completed": epochs_completed, "current_loss": loss,
                                             "loss_history": list(history), "epochs": stored.get("epochs", 1)})

        out = self._train(stored, rid, caller, progress)
        return {k: v for k, v in out.items() if k != "request_id"}

    def get_training(self, request_id: str, caller: Caller | None = None) -> dict:
        """{request_id, status, final_loss, loss_history, training_time, completion_time,
        epochs_completed, current_loss, model_updated}; while running the progress so far;
        failed adds "error": {code, message}."""
        job = self.jobs.get(request_id)
        if job is None or job["kind"] != "training":
            raise NotFound(f"training request {request_id!r} not found")
        require_owner(caller, job["owner"], f"request {request_id}")
        result, progress = job["result"] or {}, job.get("progress") or {}
        history = result.get("loss_history", progress.get("loss_history") or [])
        out = {"request_id": request_id, "status": job["status"], "final_loss": result.get("final_loss"),
               "loss_history": history, "training_time": result.get("training_time"),
               "completion_time": clock.iso(job["completed_at"]) if job["status"] == "completed" else None,
               "epochs": progress.get("epochs", job["request"].get("epochs", 1)),
               "epochs_completed": result.get("epochs_completed", progress.get("epochs_completed", 0)),
               "current_loss": history[-1] if history else None,
               "model_updated": result.get("model_updated")}
        if job["status"] == "failed":
            out["error"] = {k: job["error"][k] for k in ("code", "message")}
        return out

    # ---- optimization ---------------------------------------------------------------------------
    def optimize_model(self, model_id: str, request: dict, caller: Caller | None = None) -> dict:
        """Quantize (int8) or convert to half precision, measured (see runtime/optimize.py):
        {model_id, optimization_type, target_precision, mode, original_size, optimized_size,
        compression_ratio, accuracy_loss, accuracy_metric, accuracy_note, optimization_time,
        model_updated, reason}."""
        require_admin(caller, "optimize a model")
        self.registry.entry(model_id)
        with self._model_lock(model_id):
            entry = self.registry.entry(model_id)
            try:
                fields, module, dtype = optimize.optimize(entry.model, request, entry.spec.get("trained_task"))
            except (torch.OutOfMemoryError, MemoryError) as exc:
                raise InsufficientMemory(f"out of memory while optimizing: {exc}".strip(),
                                         {"during": "optimization"}) from None
            step = fields.pop("step")
            if fields["model_updated"]:
                self.registry.swap(entry, module, dtype,
                                   {"optimizations": [*(entry.spec.get("optimizations") or []), step]})
        return {"model_id": model_id, **fields}

    # ---- sessions -------------------------------------------------------------------------------
    def create_session(self, user_id: str, model_id: str, caller: Caller | None = None) -> dict:
        self.registry.entry(model_id)
        return self.sessions.create(user_id, model_id, caller)

    def get_session(self, session_id: str, caller: Caller | None = None) -> dict:
        return self.sessions.get(session_id, caller)

    def delete_session(self, session_id: str, caller: Caller | None = None) -> dict:
        return self.sessions.delete(session_id, caller)

    # ---- allocations ----------------------------------------------------------------------------
    def allocate(self, request: dict, caller: Caller | None = None) -> dict:
        return self.allocations.allocate(request, caller)

    def get_allocation(self, allocation_id: str, caller: Caller | None = None) -> dict:
        return self.allocations.get(allocation_id, caller)

    def list_allocations(self, caller: Caller | None = None) -> list[dict]:
        return self.allocations.list(caller)

    def deallocate(self, allocation_id: str, caller: Caller | None = None) -> dict:
        return self.allocations.deallocate(allocation_id, caller)

    # ---- virtual GPUs ---------------------------------------------------------------------------
    def create_vgpu(self, request: dict, caller: Caller | None = None) -> dict:
        return self.vgpus.create(request, caller).to_dict()

    def get_vgpu(self, vgpu_id: str, caller: Caller | None = None) -> dict:
        return self.vgpus.get(vgpu_id).to_dict()

    def list_vgpus(self, caller: Caller | None = None) -> list[dict]:
        return [v.to_dict() for v in list(self.vgpus.vgpus.values())]

    def delete_vgpu(self, vgpu_id: str, caller: Caller | None = None) -> dict:
        require_admin(caller, "delete a virtual GPU")
        self.vgpus.delete(vgpu_id)
        with self._executors_lock:
            ex = self.executors.pop(f"vgpu:{vgpu_id}", None)
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
        snapshot["devices"] = [{"index": d.index, "name": d.name, "memory_total": d.memory_capacity,
                                "memory_unreserved": self.vgpus.device_free(d.index)[0],
                                "compute_units": d.compute_units} for d in self.vgpus.devices]
        return snapshot

    def list_jobs(self, caller: Caller | None = None, limit: int = 50) -> list[dict]:
        """The latest async inference and training jobs, newest first (a user sees only theirs):
        {request_id, kind, status, model_id, created_at, started_at, completed_at, error}, and for
        training epochs, epochs_completed, current_loss, loss_history."""
        owner = None if caller is None or caller.is_admin else caller.user_id
        out = []
        for job in self.jobs.recent(limit, owner):
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

    def record_request(self, ok: bool, latency_s: float) -> None:
        self.meter.record_request(ok, latency_s)
