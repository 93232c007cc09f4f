"""Loaded models: where each lives (device, vGPU), the memory it holds, its batch queue.

load: model_path must resolve (realpath, symlinks followed) under one of
RuntimeConfig.model_roots (a relative path is taken from the first root; a `..` component is
refused outright); the model is built
on its vGPU's device, or on the least-loaded device; its memory is measured (CUDA: the
allocator's growth across the build, at least tensor_bytes(); host: ServedModel.tensor_bytes()) and reserved in the
capacity ledger, which refuses it with INSUFFICIENT_MEMORY when it does not fit.
The load spec is persisted in the store, so a new Runtime on the same state dir loads the
same models at start(). unload drops every reference (registry, queue, worker), collects,
empties the CUDA cache and trims the C heap, so the memory really goes back.

swap() puts a trained or optimized module in place of the served one under the model
queue's run lock (one attribute pair, so a run sees all-old or all-new weights), re-reserves
the memory it measures and records the change in the persisted spec: a "model_path" to the
saved trained weights, and the "optimizations" list, which load() replays after building,
so a restart gives the same model.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import models
from ..models.base import is_out_of_memory, module_bytes
from . import clock, optimize
from .access import authorize
from .batching import Executor, ModelQueue
from .caller import Caller
from .generation.worker import GenerationQueue, pool_blocks
from .deadline import Deadline
from .errors import InvalidInputData, InvalidModelId, ModelAlreadyLoaded, MSCError, QueueFull, insufficient_memory
from .store import Store
from .vgpu import VGPUManager

log = logging.getLogger("msmartcompute.runtime.registry")


@dataclass
class LoadedModel:
    model_id: str
    spec: dict
    model: object            # models.ServedModel
    memory: int              # bytes, measured
    loaded_at: float         # unix
    load_time_s: float
    device: int
    vgpu_id: str | None
    executor: Executor
    queue: ModelQueue

    def public(self) -> dict:
        return {"model_id": self.model_id, "model_type": self.spec.get("model_type"), "status": "loaded",
                "memory_usage": self.memory, "load_time": clock.iso(self.loaded_at),
                "virtual_gpu_id": self.vgpu_id, "device": str(self.model.device)}


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def map_large_blocks() -> None:
    """Serve every host block of 1 MiB or more (weights, activations) with its own mmap, so
    freeing it gives it straight back to the OS. glibc's default threshold adapts upward after
    the first large free, after which freed weights stay in per-thread heaps: measured, a
    25 MB model loaded and unloaded 50 times from waitress' threads left ~90 MB more resident
    (a plateau, not a leak); with the threshold pinned it stays flat."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc
        pass


def release_memory() -> None:
    """Give freed memory back: collect cycles, empty the CUDA cache, trim glibc's heap."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _positive_int(spec: dict, name: str, default: int) -> int:
    value = spec.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidInputData(f"{name} must be an integer >= 1, got {value!r}", {"field": name})
    return value


class Registry:
    def __init__(self, store: Store, vgpus: VGPUManager, model_roots: list[Path],
                 executor_for: Callable[[int, str | None, bool], Executor], max_batch_size: int, max_queue_size: int):
        self.store = store
        self.vgpus = vgpus
        self.model_roots = [Path(os.path.realpath(r)) for r in model_roots]
        self.executor_for = executor_for
        self.default_max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.models: dict[str, LoadedModel] = {}
        self.failed: dict[str, str] = {}  # persisted models that could not be restored -> why
        self._lock = threading.RLock()  # one load at a time: the CUDA allocator delta is per process
        self._exclusive: dict[str, threading.Lock] = {}
        self._exclusive_lock = threading.Lock()

    @contextlib.contextmanager
    def exclusive(self, model_id: str, wait_s: float | None, token: Deadline | None = None):
        """Hold the lock of work that replaces a model's weights (training, optimization): one
        at a time per model. The wait is bounded, so no thread waits forever: by `wait_s`
        (None: no bound) -> QUEUE_FULL, and by `token` (cancelled, past its deadline)."""
        with self._exclusive_lock:
            lock = self._exclusive.setdefault(model_id, threading.Lock())
        give_up = None if wait_s is None else time.monotonic() + wait_s
        while not lock.acquire(timeout=0.1):
            if token is not None:
                token.check()
            if give_up is not None and time.monotonic() >= give_up:
                raise QueueFull(f"model {model_id!r} is being trained or optimized; retry later, or queue the "
                                "training with /training/async", {"model_id": model_id, "waited_s": wait_s})
        try:
            yield
        finally:
            lock.release()

    # ---- queries ------------------------------------------------------------------------------
    def entry(self, model_id) -> LoadedModel:
        entry = self.models.get(model_id)
        if entry is None:
            raise InvalidModelId(f"model {model_id!r} is not loaded",
                                 {"model_id": model_id, "available_models": sorted(self.models)})
        return entry

    def get(self, model_id) -> dict:
        return self.entry(model_id).public()

    def list(self) -> list[dict]:
        out = [e.public() for e in list(self.models.values())]
        out += [{"model_id": m, "model_type": self.store.get("models", m, {}).get("model_type"),
                 "status": "failed", "error": why, "memory_usage": 0, "load_time": None,
                 "virtual_gpu_id": None, "device": None} for m, why in self.failed.items()]
        return out

    def total_memory(self) -> int:
        return sum(e.memory for e in list(self.models.values()))

    # ---- load / unload ------------------------------------------------------------------------
    def resolve_path(self, model_path: str) -> str:
        if not isinstance(model_path, str) or not model_path:
            raise InvalidInputData("model_path must be a non-empty string", {"field": "model_path"})
        if not self.model_roots:
            raise InvalidInputData("model_path is not allowed: no model root is configured")
        path = Path(model_path)
        if ".." in path.parts:  # refused outright, wherever it would lead
            raise InvalidInputData(f"model_path {model_path!r} may not contain '..'", {"field": "model_path"})
        if not path.is_absolute():
            path = self.model_roots[0] / path
        try:
            real = Path(os.path.realpath(path))
            if not any(real == root or root in real.parents for root in self.model_roots):
                raise InvalidInputData(f"model_path {model_path!r} is outside the model roots",
                                       {"field": "model_path", "model_roots": [str(r) for r in self.model_roots]})
            usable = real.is_file() or real.is_dir()  # a weights file or a checkpoint folder
        except (OSError, ValueError) as exc:  # a name too long, a NUL byte, ...
            raise InvalidInputData(f"model_path is not a usable path: {exc.__class__.__name__}: "
                                   f"{getattr(exc, 'strerror', None) or exc}"[:300], {"field": "model_path"}) from None
        if not usable:
            raise InvalidInputData(f"model_path {model_path!r} is not a file or a checkpoint folder",
                                   {"field": "model_path"})
        return str(real)

    def resolve_save_path(self, save_path: str) -> str:
        """Where to write trained weights: a .safetensors path under a model root (its folder is made)."""
        if not isinstance(save_path, str) or not save_path.endswith(".safetensors"):
            raise InvalidInputData("save_path must be a path ending in .safetensors", {"field": "save_path"})
        if not self.model_roots:
            raise InvalidInputData("save_path is not allowed: no model root is configured", {"field": "save_path"})
        path = Path(save_path)
        if not path.is_absolute():
            path = self.model_roots[0] / path
        real = Path(os.path.realpath(path))
        if not any(root in real.parents for root in self.model_roots):
            raise InvalidInputData(f"save_path {save_path!r} is outside the model roots",
                                   {"field": "save_path", "model_roots": [str(r) for r in self.model_roots]})
        real.parent.mkdir(parents=True, exist_ok=True)
        return str(real)

    def trained_weights_path(self, model_id: str) -> str | None:
        """Where a training without save_path keeps its weights, so a restart serves them and
        does not revert to the loaded ones: `<first model root>/trained/<model_id>.safetensors`;
        None with no model root (then the trained weights last until the model is unloaded)."""
        if not self.model_roots:
            return None
        return self.resolve_save_path(str(self.model_roots[0] / "trained" / f"{model_id}.safetensors"))

    def swap(self, entry: LoadedModel, module, dtype: torch.dtype, spec_changes: dict) -> None:
        """Serve `module` (compute dtype `dtype`) in place of entry's; see the module docstring."""
        with self._lock:
            if self.models.get(entry.model_id) is not entry:
                raise InvalidModelId(f"model {entry.model_id!r} was unloaded meanwhile; the result was dropped",
                                     {"model_id": entry.model_id})
            memory = max(0, entry.memory - entry.model.tensor_bytes() + module_bytes(module))
            self.vgpus.resize(("model", entry.model_id), memory)
            with entry.queue.run_lock:
                entry.model.module, entry.model.dtype = module, dtype
            entry.memory = int(memory)
            entry.spec.update(spec_changes)
            self.store.put("models", entry.model_id, dict(entry.spec))
        release_memory()

    def load(self, spec: dict, caller: Caller | None = None, *, persist: bool = True) -> dict:
        authorize(caller, "registry.load")
        model_id = spec.get("model_id")
        if not isinstance(model_id, str) or not model_id:
            raise InvalidInputData("model_id must be a non-empty string", {"field": "model_id"})
        with self._lock:
            if model_id in self.models:
                raise ModelAlreadyLoaded(f"model {model_id!r} is already loaded", {"model_id": model_id})
            build_spec = dict(spec)
            for key in ("model_path", "weights_path"):  # weights_path: trained weights for a checkpoint folder
                if spec.get(key):
                    build_spec[key] = self.resolve_path(spec[key])
            max_batch = _positive_int(spec, "max_batch_size", self.default_max_batch_size)
            priority = spec.get("priority", 0)
            if not isinstance(priority, int) or isinstance(priority, bool):
                raise InvalidInputData("priority must be an integer", {"field": "priority"})
            vgpu_id = spec.get("virtual_gpu_id")
            if vgpu_id and vgpu_id not in self.vgpus.vgpus:
                raise InvalidInputData(f"virtual_gpu_id {vgpu_id!r} does not exist",
                                       {"field": "virtual_gpu_id", "available_vgpus": sorted(self.vgpus.vgpus)})
            device = self.vgpus.get(vgpu_id).physical_gpu_id if vgpu_id else self.vgpus.least_loaded()
            torch_device = self.vgpus.device(device).torch_device

            t0 = time.perf_counter()
            # the bytes the spec plans are reserved before the build, so a model that cannot fit is
            # refused unbuilt; the reservation then becomes the measured bytes
            key = ("model", model_id)
            self.vgpus.reserve(key, self._planned_bytes(model_id, build_spec), device=device, vgpu=vgpu_id or None)
            try:
                model, memory = self._build(model_id, build_spec, device, torch_device,
                                            spec.get("optimizations") or [])
                self.vgpus.resize(key, memory)
            except BaseException:
                self.vgpus.release(key)
                model = None
                release_memory()
                raise
            generative = getattr(model, "generative", False)
            if generative:
                try:
                    queue = self._generation_queue(model_id, model, spec, device, vgpu_id or None, max_batch, priority)
                except MSCError:
                    self.vgpus.release(("model", model_id))
                    del model
                    release_memory()
                    raise
            else:
                queue = ModelQueue(model_id, model, max_batch, self.max_queue_size, priority)
            load_time = time.perf_counter() - t0
            executor = self.executor_for(device, vgpu_id or None, generative)
            executor.add(queue)
            self.models[model_id] = LoadedModel(model_id, dict(spec), model, int(memory), clock.now(),
                                                load_time, device, vgpu_id or None, executor, queue)
            self.failed.pop(model_id, None)
            if persist:
                self.store.put("models", model_id, dict(spec))
            return {"model_id": model_id, "message": "Model loaded successfully",
                    "memory_allocated": int(memory), "load_time": round(load_time, 6)}

    @staticmethod
    def _planned_bytes(model_id: str, spec: dict) -> int:
        """models.planned_bytes (0 when only the build tells: user programs); a bad spec is a 400."""
        try:
            return models.planned_bytes(spec) or 0
        except ValueError as exc:
            details = {"model_id": model_id, **({"field": exc.field} if getattr(exc, "field", None) else {})}
            raise InvalidInputData(f"cannot load model {model_id!r}: {exc}", details) from None

    def _build(self, model_id: str, spec: dict, device: int, torch_device: torch.device,
               optimizations: list):
        """Build the model and replay its recorded optimizations in order (see swap); returns
        (model, measured bytes). On CUDA the build holds the device's slot, so no run's
        activations fall inside the allocator delta."""
        cuda = torch_device.type == "cuda"
        try:
            with self.vgpus.schedulers[device].slot("__load__") if cuda else contextlib.nullcontext():
                before = torch.cuda.memory_allocated(torch_device) if cuda else 0
                model = models.build_model(spec, torch_device)
                for step in optimizations:
                    if not isinstance(step, dict) or step.get("target_precision") not in ("int8", "fp16", "bf16"):
                        raise ValueError(f"optimizations holds an unknown step {step!r}")
                    model.module, model.dtype = optimize.convert(model, step)
                grown = torch.cuda.memory_allocated(torch_device) - before if cuda else 0
        except Exception as exc:
            if is_out_of_memory(exc):
                release_memory()
                raise insufficient_memory(exc, "loading", model_id=model_id) from None
            if not isinstance(exc, (ValueError, OSError)):
                raise
            details = {"model_id": model_id}
            if getattr(exc, "field", None):  # models.spec.SpecError names the request field at fault
                details["field"] = exc.field
            raise InvalidInputData(f"cannot load model {model_id!r}: {exc}", details) from None
        # a request's input freed meanwhile can only lower the delta; never report below the tensors
        return model, max(grown, model.tensor_bytes())

    def _generation_queue(self, model_id: str, model, spec: dict, device: int, vgpu_id: str | None,
                          max_running: int, priority: int) -> GenerationQueue:
        """A decoder's KV pool and scheduler. The pool is reserved in the ledger beside the
        weights (key ("kv", model_id)), so the vGPU's quota bounds the tokens it can hold."""
        requested = spec.get("kv_cache_memory")
        if requested is not None and (not isinstance(requested, int) or isinstance(requested, bool) or requested < 1):
            raise InvalidInputData(f"kv_cache_memory must be a number of bytes >= 1, got {requested!r}",
                                   {"field": "kv_cache_memory"})
        free = self.vgpus.vgpu_free(vgpu_id) if vgpu_id else self.vgpus.device_free(device)[0]
        blocks = pool_blocks(model, free, max_running, requested_bytes=requested)
        queue = GenerationQueue(model_id, model, max_running, self.max_queue_size, priority, blocks)
        self.vgpus.reserve(("kv", model_id), queue.kv_cache_bytes, device=device, vgpu=vgpu_id)
        return queue

    def unload(self, model_id: str, caller: Caller | None = None, *, forget: bool = True) -> dict:
        authorize(caller, "registry.unload")
        with self._lock:
            if model_id in self.failed and forget:
                del self.failed[model_id]
                self.store.delete("models", model_id)
                return {"model_id": model_id, "message": "Model unloaded successfully"}
            entry = self.entry(model_id)
            del self.models[model_id]
            entry.executor.remove(model_id, InvalidModelId(f"model {model_id!r} was unloaded",
                                                           {"model_id": model_id}))
            self.vgpus.release(("model", model_id))
            self.vgpus.release(("kv", model_id))
            if forget:
                self.store.delete("models", model_id)
            # callers that looked the entry up a moment ago still hold it: they are refused at
            # submit (the queue is gone) and the model is freed when the last of them returns
            del entry
            release_memory()
            return {"model_id": model_id, "message": "Model unloaded successfully"}

    def restore(self) -> None:
        """Load every persisted model again (vGPUs must be restored first)."""
        for model_id, spec in self.store.items("models"):
            if model_id in self.models:
                continue
            try:
                self.load(spec, persist=False)
            except MSCError as exc:
                log.warning("could not restore model %s: %s", model_id, exc.message)
                self.failed[model_id] = exc.message

    def close(self) -> None:
        """Drop every model from memory; the persisted specs stay for the next start."""
        for model_id in list(self.models):
            self.unload(model_id, forget=False)
