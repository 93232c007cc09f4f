"""Training a loaded model on a request's data: POST /training (sync and async).

The Training service (at the end) runs requests and jobs; the functions above it are the math.

parse() checks a request against the model and turns it into a Plan (tensors + settings);
every mistake a caller can make is an InvalidInputData naming the field. fit() trains a
DEEP COPY of the served module (float32 master weights, cast back to the served dtype at
the end) and returns it; the runtime then swaps it in under the model queue's run lock, so
inference keeps running on the old weights during training and never sees half-updated
ones. A non-finite loss stops the run at once (TrainingDiverged), the served model untouched.

Losses: mlp / encoder outputs with cross_entropy (labels as one-hot / probability rows
[N, C], or class indices [N] / [N, 1]) or mse (labels [N, out]); transformer with
cross_entropy on token sequences: labels omitted = next-token prediction on training_data,
labels given = per-position target ids [N, S] (predict labels[:, t] at position t).
"""
from __future__ import annotations

import copy
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.base import is_out_of_memory
from ..models.layers import QuantizedLinear
from . import clock, ids
from .access import authorize, visible
from .caller import Caller
from .deadline import Deadline
from .errors import InternalError, InvalidInputData, NotFound, QueueFull, insufficient_memory

MAX_EPOCHS = 10_000
MAX_ROWS = 65_536
MAX_ELEMENTS = 16_777_216
MAX_STEPS = 10_000_000          # epochs x batches: a bound on one request's work
MAX_LEARNING_RATE = 1.0         # above it every optimizer here diverges on any model
MAX_TARGET = 1e9                # |mse target|: its square stays far from float32's overflow
OPTIMIZERS = ("adam", "adamw", "sgd")
LOSSES = ("cross_entropy", "mse")


class TrainingDiverged(InvalidInputData):
    """The loss became NaN or Inf: the hyperparameters (usually learning_rate) are unusable."""


@dataclass
class Plan:
    x: torch.Tensor                 # [N, in] float32 or [N, S] int64 token ids (CPU)
    y: torch.Tensor | None          # targets (CPU): float [N, C], int64 [N] / [N, S], or None (next token)
    loss: str                       # cross_entropy | mse | next_token
    epochs: int
    learning_rate: float
    optimizer: str
    batch_size: int
    gradient_clip_norm: float | None
    weight_decay: float
    momentum: float
    seed: int
    save_path: str | None = None
    task: str = "regression"        # classification | regression | language_model (optimize's default metric)
    extra: dict = field(default_factory=dict)


def _bad(field_name: str, message: str, **details) -> InvalidInputData:
    return InvalidInputData(f"{field_name} {message}", {"field": field_name, **details})


def _number(value, name: str, default, low: float, high: float, *, integer: bool = False,
            low_open: bool = False):
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise _bad(name, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        raise _bad(name, f"must lie in {'(' if low_open else '['}{low}, {high}], got {value!r}")
    return value


def _matrix(value, name: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except ValueError:
        raise _bad(name, "must be rectangular: every row the same length") from None
    if arr.dtype == object or arr.dtype.kind not in "iufb" or arr.dtype.kind == "b":
        raise _bad(name, "must hold numbers")
    if arr.size == 0:
        raise _bad(name, "must not be empty")
    if arr.size > MAX_ELEMENTS:
        raise _bad(name, f"has {arr.size} elements, more than the limit of {MAX_ELEMENTS}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise _bad(name, "must hold only finite numbers")
    return arr


def check_trainable(model) -> None:
    if not model.trainable:
        raise InvalidInputData(f"a {model.model_type} model cannot be trained: it is a fixed program, "
                               "served as is", {"field": "model_id", "model_type": model.model_type})
    if any(isinstance(m, QuantizedLinear) for m in model.module.modules()):
        raise InvalidInputData("this model is int8-quantized and cannot be trained: load it without "
                               "enable_quantization (or before optimizing), train, then quantize",
                               {"field": "model_id", "quantized": True})


def parse(request: dict, model) -> Plan:
    """Check a training request against `model`; raises InvalidInputData naming the field."""
    check_trainable(model)
    hp = request.get("hyperparameters") or {}
    if not isinstance(hp, dict):
        raise _bad("hyperparameters", "must be an object")
    epochs = _number(request.get("epochs"), "epochs", 1, 1, MAX_EPOCHS, integer=True)
    lr = _number(request.get("learning_rate"), "learning_rate", 1e-3, 0, MAX_LEARNING_RATE, low_open=True)
    optimizer = request.get("optimizer", "adam") or "adam"
    if optimizer not in OPTIMIZERS:
        raise _bad("optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    loss = request.get("loss_function", "cross_entropy") or "cross_entropy"
    if loss not in LOSSES:
        raise _bad("loss_function", f"must be one of {', '.join(LOSSES)}, got {loss!r}")
    batch_size = _number(hp.get("batch_size"), "hyperparameters.batch_size", 32, 1, MAX_ROWS, integer=True)
    clip = _number(hp.get("gradient_clip_norm"), "hyperparameters.gradient_clip_norm", None, 0, 1e6,
                   low_open=True)
    weight_decay = _number(hp.get("weight_decay"), "hyperparameters.weight_decay", 0.0, 0, 10.0)
    momentum = _number(hp.get("momentum"), "hyperparameters.momentum", 0.9, 0, 1.0)
    seed = _number(request.get("seed"), "seed", 0, 0, 2**63 - 1, integer=True)

    if "training_data" not in request or request["training_data"] is None:
        raise _bad("training_data", "is required")
    data = _matrix(request["training_data"], "training_data")
    if data.ndim != 2:
        raise _bad("training_data", f"must be a list of rows (2-D), got shape {tuple(data.shape)}")
    if data.shape[0] > MAX_ROWS:
        raise _bad("training_data", f"has {data.shape[0]} rows, more than the limit of {MAX_ROWS}")
    try:  # the model's own input rules (width, token range, sequence length)
        x = model.data_rows(data)
    except ValueError as exc:
        raise _bad("training_data", f"does not fit the model: {exc}") from None
    n = x.shape[0]
    steps = epochs * math.ceil(n / batch_size)
    if steps > MAX_STEPS:
        raise _bad("epochs", f"x batches per epoch = {steps} optimizer steps, more than the limit of {MAX_STEPS}")

    labels = request.get("labels")
    y, task = None, "regression"
    if model.language_model:
        if loss != "cross_entropy":
            raise _bad("loss_function", "must be cross_entropy for a transformer (next-token prediction)")
        if labels is None:
            if x.shape[1] < 2:
                raise _bad("training_data", "sequences must have at least 2 tokens for next-token training")
            loss = "next_token"
        else:
            lab = _matrix(labels, "labels")
            if lab.shape != tuple(x.shape):
                raise _bad("labels", f"must be target token ids shaped like training_data {tuple(x.shape)}, "
                           f"got {tuple(lab.shape)}")
            if lab.dtype.kind == "f" and (lab != np.round(lab)).any():
                raise _bad("labels", "must be integer token ids")
            y = torch.from_numpy(np.ascontiguousarray(lab, dtype=np.int64))
            vocab = model.output_width
            if int(y.min()) < 0 or int(y.max()) >= vocab:
                raise _bad("labels", f"token ids must lie in [0, {vocab})")
        task = "language_model"
    else:
        if labels is None:
            raise _bad("labels", f"is required to train a {model.model_type} model")
        lab = _matrix(labels, "labels")
        if lab.shape[0] != n:
            raise _bad("labels", f"has {lab.shape[0]} rows but training_data has {n}", rows=n)
        out_width = model.output_width
        if loss == "mse":
            if lab.ndim == 1:
                lab = lab[:, None]
            if lab.ndim != 2 or lab.shape[1] != out_width:
                raise _bad("labels", f"rows must have {out_width} values (the model's output width) for mse, "
                           f"got shape {tuple(lab.shape)}")
            if np.abs(lab).max() > MAX_TARGET:
                raise _bad("labels", f"mse targets must lie in [-{MAX_TARGET:g}, {MAX_TARGET:g}] (scale them: "
                           "their squares must stay finite in float32)")
            y = torch.from_numpy(np.ascontiguousarray(lab, dtype=np.float32))
        else:
            task = "classification"
            if lab.ndim == 2 and lab.shape[1] == 1:
                lab = lab[:, 0]
            if lab.ndim == 1:  # class indices
                if lab.dtype.kind == "f" and (lab != np.round(lab)).any():
                    raise _bad("labels", "class indices must be integers")
                y = torch.from_numpy(np.ascontiguousarray(lab, dtype=np.int64))
                if int(y.min()) < 0 or int(y.max()) >= out_width:
                    raise _bad("labels", f"class indices must lie in [0, {out_width}) (the model's output width)")
            elif lab.ndim == 2 and lab.shape[1] == out_width:  # one-hot / probability rows
                if (lab < 0).any() or (lab > 1).any():
                    raise _bad("labels", "one-hot / probability rows must lie in [0, 1]")
                y = torch.from_numpy(np.ascontiguousarray(lab, dtype=np.float32))
            else:
                raise _bad("labels", f"must be one-hot rows of {out_width} values or class indices, "
                           f"got shape {tuple(lab.shape)}")
    save_path = request.get("save_path")
    if save_path is not None and (not isinstance(save_path, str) or not save_path):
        raise _bad("save_path", "must be a non-empty string")
    return Plan(x=x, y=y, loss=loss, epochs=epochs, learning_rate=float(lr), optimizer=optimizer,
                batch_size=batch_size, gradient_clip_norm=None if clip is None else float(clip),
                weight_decay=float(weight_decay), momentum=float(momentum), seed=seed, save_path=save_path,
                task=task)


def _loss(plan: Plan, out: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor | None) -> torch.Tensor:
    if plan.loss == "next_token":
        return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), xb[:, 1:].reshape(-1))
    if out.dim() == 3:  # transformer with per-position labels
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), yb.reshape(-1))
    if plan.loss == "mse":
        return F.mse_loss(out, yb)
    return F.cross_entropy(out, yb)  # class indices [N] or probability rows [N, C]


def _optimizer(plan: Plan, params) -> torch.optim.Optimizer:
    if plan.optimizer == "adam":
        return torch.optim.Adam(params, lr=plan.learning_rate, weight_decay=plan.weight_decay)
    if plan.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=plan.learning_rate, weight_decay=plan.weight_decay)
    return torch.optim.SGD(params, lr=plan.learning_rate, momentum=plan.momentum, weight_decay=plan.weight_decay)


@dataclass
class Outcome:
    module: nn.Module               # the trained copy, in the served dtype, eval mode
    loss_history: list[float]       # mean loss per epoch
    training_time: float
    model_updated: bool


def fit(model, plan: Plan, progress: Callable[[int, float, list[float]], None] | None = None,
        should_stop: Callable[[], bool] | None = None) -> Outcome:
    """Train a copy of model.module on the plan; the served module is never written to.

    progress(epochs_completed, epoch_loss, loss_history) after each epoch; should_stop() is
    polled between steps (raises InterruptedError when it answers True)."""
    t0 = time.perf_counter()
    served = model.module
    served_dtype = model.dtype
    device = model.device
    module = copy.deepcopy(served).float().train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = _optimizer(plan, params)
    x, y = plan.x.to(device), None if plan.y is None else plan.y.to(device)
    n = x.shape[0]
    gen = torch.Generator().manual_seed(plan.seed)
    history: list[float] = []
    with torch.enable_grad():
        for epoch in range(plan.epochs):
            order = torch.randperm(n, generator=gen).to(device)
            total, seen = 0.0, 0
            for start in range(0, n, plan.batch_size):
                if should_stop is not None and should_stop():
                    raise InterruptedError("the server is shutting down")
                idx = order[start:start + plan.batch_size]
                xb, yb = x[idx], None if y is None else y[idx]
                loss = _loss(plan, model.outputs(module, xb), xb, yb)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingDiverged(
                        f"training diverged at epoch {epoch + 1}: the loss became {value}; the model was left "
                        "unchanged (lower learning_rate or set hyperparameters.gradient_clip_norm)",
                        {"field": "learning_rate", "epoch": epoch + 1, "loss": str(value)})
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if plan.gradient_clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, plan.gradient_clip_norm)
                opt.step()
                total += value * idx.numel()
                seen += idx.numel()
            history.append(total / seen)
            if progress is not None:
                progress(epoch + 1, history[-1], history)
    for p in module.parameters():
        if not torch.isfinite(p).all():
            raise TrainingDiverged("training diverged: the weights became non-finite; the model was left "
                                   "unchanged (lower learning_rate)", {"field": "learning_rate"})
    opt.zero_grad(set_to_none=True)  # the served copy carries no gradients
    module = module.to(served_dtype).eval()
    old, new = served.state_dict(), module.state_dict()
    updated = any(not torch.equal(old[k], new[k]) for k in old)
    return Outcome(module, history, time.perf_counter() - t0, updated)


def _write_safetensors(weights: dict, path: str) -> None:
    """Replace `path` atomically: a crash mid-write leaves the previous file whole."""
    from safetensors.torch import save_file

    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    save_file(weights, tmp)
    os.replace(tmp, path)


@dataclass(frozen=True)
class TrainingLimits:
    max_sync: int = 4                  # synchronous trainings at once (each holds an HTTP thread)
    sync_timeout_s: float = 600.0      # a synchronous training stops after this (REQUEST_TIMEOUT)
    lock_wait_s: float = 10.0          # a synchronous training / optimize waits this long for its model


class Training:
    """The training service: POST /training (sync), /training/async, GET /training/{id}.

    Training works on a deep copy and swaps it in at the end (Registry.swap), so inference on
    the model goes on during training and never sees half-updated weights. One training or
    optimization per model at a time (Registry.exclusive). Jobs cut short by a shutdown fail
    with the reason and are not resumed (rerun_on_restart=False).

    Nothing waits or runs unbounded: a synchronous training holds an HTTP thread, so at most
    `limits.max_sync` run at once (more: QUEUE_FULL at once), each waits at most
    `limits.lock_wait_s` for its model (then QUEUE_FULL) and runs at most `limits.sync_timeout_s`
    (then REQUEST_TIMEOUT, the model untouched). Long work belongs in /training/async, whose
    jobs `cancel()` stops between mini-batches."""

    def __init__(self, store, registry, jobs, stopping: Callable[[], bool], limits: "TrainingLimits | None" = None):
        self.store, self.registry, self.jobs = store, registry, jobs
        self.stopping = stopping
        self.limits = limits or TrainingLimits()
        self._sync_slots = threading.BoundedSemaphore(self.limits.max_sync)
        jobs.register("training", self._job, rerun_on_restart=False)

    def train(self, request: dict, caller: Caller | None = None) -> dict:
        """Train synchronously: {request_id, final_loss, loss_history, training_time,
        epochs_completed, model_updated, seed, weights_persisted}."""
        authorize(caller, "training.train")
        if not self._sync_slots.acquire(blocking=False):
            raise QueueFull(f"{self.limits.max_sync} synchronous trainings are running; retry later, or queue "
                            "this one with /training/async", {"max_sync_trainings": self.limits.max_sync})
        try:
            return self._train(request, ids.request_id(), caller, Deadline.after(self.limits.sync_timeout_s),
                               self.limits.lock_wait_s)
        finally:
            self._sync_slots.release()

    def cancel(self, request_id: str, caller: Caller | None = None) -> dict:
        """DELETE /training/{id}: a queued job ends `cancelled` at once; a running one stops at
        its next mini-batch, its model untouched. {request_id, status, message}."""
        job = self.jobs.get(request_id)
        if job is None or job["kind"] != "training" or not visible(caller, job["owner"]):
            raise NotFound(f"training request {request_id!r} not found")
        status = self.jobs.cancel(request_id)
        message = {"cancelled": "Training cancelled",
                   "running": "Cancelling: the training stops at its next mini-batch"}.get(
                       status, f"Training already {status}; nothing to cancel")
        return {"request_id": request_id, "status": status, "message": message}

    def submit(self, request: dict, caller: Caller | None = None) -> dict:
        """Queue a training job (validated now). estimated_completion: now + (jobs ahead / job
        workers + 1) x the mean duration of recent training jobs (now when there is none yet)."""
        authorize(caller, "training.submit")
        entry = self.registry.entry(request.get("model_id"))
        plan = parse(request, entry.model)
        if plan.save_path is not None:
            self.registry.resolve_save_path(plan.save_path)
        rid = ids.request_id()
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
        eta = clock.now() + (ahead // max(1, self.jobs.workers_for("training")) + 1) * per_job
        return {"request_id": rid, "status": "queued", "estimated_completion": clock.iso(eta)}

    def get(self, request_id: str, caller: Caller | None = None) -> dict:
        """{request_id, status, final_loss, loss_history, training_time, completion_time,
        epochs_completed, current_loss, model_updated}; while running the progress so far;
        failed adds "error": {code, message}."""
        job = self.jobs.get(request_id)
        if job is None or job["kind"] != "training" or not visible(caller, job["owner"]):
            raise NotFound(f"training request {request_id!r} not found")
        self.jobs.mark_read(job)
        result, progress = job["result"] or {}, job.get("progress") or {}
        history = result.get("loss_history", progress.get("loss_history") or [])
        out = {"request_id": request_id, "status": job["status"], "final_loss": result.get("final_loss"),
               "loss_history": history, "training_time": result.get("training_time"),
               "completion_time": clock.iso(job["completed_at"]) if job["status"] == "completed" else None,
               "epochs": progress.get("epochs", job["request"].get("epochs", 1)),
               "epochs_completed": result.get("epochs_completed", progress.get("epochs_completed", 0)),
               "current_loss": history[-1] if history else None,
               "model_updated": result.get("model_updated"), "weights_persisted": result.get("weights_persisted")}
        if job["status"] in ("failed", "cancelled"):
            out["error"] = {k: job["error"][k] for k in ("code", "message")}
        return out

    def _train(self, request: dict, request_id: str, caller: Caller | None, token: Deadline,
               lock_wait_s: float | None, progress=None) -> dict:
        model_id = request.get("model_id")
        self.registry.entry(model_id)
        with self.registry.exclusive(model_id, lock_wait_s, token):
            entry = self.registry.entry(model_id)
            plan = parse(request, entry.model)
            save_path = None if plan.save_path is None else self.registry.resolve_save_path(plan.save_path)
            try:
                outcome = fit(entry.model, plan, progress, lambda: self.stopping() or token.stopped())
            except InterruptedError:
                token.check()  # cancelled or past its deadline: that is the reason; the model is untouched
                raise InternalError("the server stopped while this training job was running; training jobs "
                                    "are not resumed", {"request_id": request_id}) from None
            except Exception as exc:
                if is_out_of_memory(exc):
                    raise insufficient_memory(exc, "training") from None
                raise
            changes = {"trained_task": plan.task}
            if save_path is None and outcome.model_updated:  # kept, so a restart does not revert it
                save_path = self.registry.trained_weights_path(model_id)
            if save_path is not None:
                weights, spec_key = entry.model.weights_to_save(outcome.module)
                _write_safetensors(weights, save_path)
                changes[spec_key] = save_path
            if outcome.model_updated or save_path is not None:
                self.registry.swap(entry, outcome.module, entry.model.dtype, changes)
        history = outcome.loss_history
        return {"request_id": request_id, "final_loss": history[-1], "loss_history": history,
                "training_time": outcome.training_time, "epochs_completed": len(history),
                "model_updated": outcome.model_updated, "seed": plan.seed,
                "weights_persisted": save_path is not None}

    def _job(self, stored: dict, token: Deadline) -> dict:
        rid = stored["request_id"]
        caller = Caller(*stored["caller"]) if stored.get("caller") else None
        last = [0.0]

        def progress(epochs_completed: int, loss: float, history: list[float]) -> None:
            now = time.monotonic()
            if now - last[0] >= 0.1 or epochs_completed == stored.get("epochs", 1):
                last[0] = now
                self.jobs.set_progress(rid, {"epochs_completed": epochs_completed, "current_loss": loss,
                                             "loss_history": list(history), "epochs": stored.get("epochs", 1)})

        out = self._train(stored, rid, caller, token, None, progress)
        return {k: v for k, v in out.items() if k != "request_id"}
