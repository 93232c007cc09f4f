"""Which implementation runs an op: ours (the extension's CUDA or CPU kernels, Triton) or
torch's own, and for ``backend="auto"`` the one measured fastest here.

Every op goes through `dispatch`: it hands over one zero-argument callable per backend that
can take its inputs (or, instead of a callable, the reason that backend cannot), and a
`key` saying which inputs behave alike (dtype, flags, sizes bucketed by `pow2`). For
``auto``, the first call with a new (op, device, key) runs every candidate that can run on
the device, times them, keeps the fastest for the rest of the process (and, with
``MSC_KERNEL_CACHE=path.json``, across processes on the same machine), logs the choice and
records it for `backend_choices()`. ``backend=`` or ``MSC_KERNEL_BACKEND`` names a backend
outright and nothing is measured.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import threading
import time
from typing import Any, Callable

import torch

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")
log = logging.getLogger("msmartcompute.ops")

try:
    from msmartcompute import _C  # noqa: F401  (registers torch.ops.msmartcompute.*)

    EXTENSION_ERROR: str | None = None
except ImportError as exc:  # not built: the torch implementations still work
    _C = None
    EXTENSION_ERROR = str(exc)


def extension_loaded() -> bool:
    return _C is not None


def extension_has_cuda() -> bool:
    """True when the built extension registered CUDA kernels."""
    if _C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("msmartcompute::quantize_int8", "CUDA")


def triton_usable(device: torch.device) -> bool:
    """Triton runs CUDA tensors, and CPU tensors only in interpreter mode."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    device = torch.device(device)
    found = []
    if device.type == "cuda" and extension_has_cuda():
        found.append("cuda")
    if triton_usable(device):
        found.append("triton")
    if device.type == "cpu" and extension_loaded():
        found.append("cpu")
    found.append("torch")
    return found


def auto_candidates(device: torch.device) -> list[str]:
    """What `auto` may pick on `device`: the Triton interpreter (CPU) is a test tool, never fast."""
    return [b for b in available_backends(device) if b != "triton" or device.type == "cuda"]


def extension_info() -> dict:
    return {
        "loaded": extension_loaded(),
        "cuda_kernels": extension_has_cuda(),
        "error": EXTENSION_ERROR,
    }


def resolve(requested: str | None, device: torch.device, op: str) -> str:
    """The backend named by `requested` / MSC_KERNEL_BACKEND, checked for `device`. For "auto"
    this is the static preference (ours first) that `dispatch` falls back to where it cannot
    measure (FakeTensor tracing, torch.compile); `dispatch` measures otherwise."""
    requested = requested or os.environ.get("MSC_KERNEL_BACKEND") or "auto"
    if requested not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    usable = available_backends(device)
    if requested == "auto":
        candidates = auto_candidates(device)
        return next(choice for choice in ("cuda", "cpu", "triton", "torch") if choice in candidates)
    if requested not in usable:
        reason = {
            "cuda": "needs a CUDA tensor and an extension built with CUDA",
            "cpu": f"needs a CPU tensor and the built extension ({EXTENSION_ERROR or 'loaded'})",
            "triton": "needs triton and a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)",
        }[requested]
        raise ValueError(
            f"{op}: backend {requested!r} cannot run a tensor on {device}: it {reason}; "
            f"usable here: {', '.join(usable)}"
        )
    return requested


def pow2(n: int) -> int:
    """The shape bucket of a size: the next power of two (0 stays 0)."""
    return 1 << (int(n) - 1).bit_length() if n > 0 else 0


Impl = Callable[[], Any]


def dispatch(op: str, requested: str | None, device: torch.device, key: tuple,
             impls: dict[str, Impl | str]) -> Any:
    """Run `op` on the backend asked for, or for "auto" on the fastest measured for `key`.

    impls: backend -> a zero-argument callable computing the op on these inputs, or a string
    saying why that backend cannot take them. Backends the device cannot run are ignored.
    """
    name = requested or os.environ.get("MSC_KERNEL_BACKEND") or "auto"
    if name == "auto":
        # the hot path of every op call: one dict lookup once the choice is made
        known = _CHOICES.memo.get((op, device, key, torch.get_num_threads()))
        if known is not None:
            return impls[known]()
    chosen = resolve(name, device, op)
    if name != "auto":
        impl = impls.get(chosen, f"there is no {chosen} implementation")
        if isinstance(impl, str):
            raise ValueError(f"{op}: backend {chosen!r} cannot run these inputs: {impl}")
        return impl()
    runnable = {b: f for b, f in impls.items() if b in auto_candidates(device) and not isinstance(f, str)}
    if not runnable:
        raise ValueError(f"{op}: no backend on {device} takes these inputs: "
                         + "; ".join(f"{b}: {why}" for b, why in impls.items() if isinstance(why, str)))
    if len(runnable) == 1 or not _measurable(device):
        return runnable[chosen]() if chosen in runnable else next(iter(runnable.values()))()
    return _CHOICES.run(op, device, key, runnable)


def _measurable(device: torch.device) -> bool:
    """Timing needs real kernels on a real device: not while torch.compile traces."""
    return device.type in ("cpu", "cuda") and not torch.compiler.is_compiling()


def device_label(device: torch.device) -> str:
    """What a measured choice is valid for: the card, or the CPU with the threads torch uses."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.machine()}:{torch.get_num_threads()}threads"


def measure(impls: dict[str, Impl], device: torch.device, warmup: int, min_reps: int, max_reps: int,
            min_time_s: float, clear_after: int | None = None
            ) -> tuple[dict[str, list[float]], dict[str, Any], dict[str, str]]:
    """Times each callable side by side: `warmup` untimed calls each, then rounds of one timed
    call per callable, in a rotating order, until `min_reps` rounds and `min_time_s` have passed
    (at most `max_reps`), or, from round `clear_after` on, until one callable's fastest call is
    under a third of every other's. Returns the samples in seconds, each callable's last result, and
    the error of any callable that raised (it takes no further part)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, impl in impls.items():
        try:
            for _ in range(warmup):
                results[name] = impl()
            sync()
        except Exception as exc:  # noqa: BLE001 - a candidate that fails is not a candidate
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    order = [name for name in impls if name not in errors]
    samples: dict[str, list[float]] = {name: [] for name in order}
    start = time.perf_counter()
    rounds = 0
    while order and rounds < max_reps and (rounds < min_reps or time.perf_counter() - start < min_time_s):
        for name in order[rounds % len(order):] + order[:rounds % len(order)]:
            t0 = time.perf_counter()
            results[name] = impls[name]()
            sync()
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
        if clear_after is not None and rounds >= clear_after and len(order) > 1:
            fastest, second = sorted(typical(s) for s in samples.values())[:2]
            if 3 * fastest <= second:
                break
    return samples, results, errors


def typical(samples: list[float]) -> float:
    """A call's time when no other process takes the cores: the fastest sample (waits only add)."""
    return min(samples)


def _spread(samples: list[float]) -> float:
    """Interquartile range over the median: how steady a candidate's timings are."""
    if len(samples) < 4:
        return 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return (q3 - q1) / max(statistics.median(samples), 1e-12)


class _Choices:
    """The measured choices: per (op, device label, key), the backend and every candidate's time."""

    # How a choice is measured: every candidate first runs WARMUP times untimed (a Triton JIT
    # compile, first-touch allocations, cold caches). Then the candidates take turns, one timed
    # call each per round in a rotating order, so a burst of load from another process falls on
    # all of them alike; rounds go on until there are MIN_REPS and MIN_TIME_S has passed (at
    # most MAX_REPS). A candidate's time is its fastest sample (`typical`): on a busy box a call
    # that uses two threads often waits a scheduler slice (10+ ms) for the second, which only
    # ever adds time, and the median of a few samples then measures the wait, not the kernel. Candidates within
    # TIE_MARGIN of the fastest are a tie (a 2-core box shared with builds swings more than
    # that): the one whose samples spread least (interquartile range over median) wins, as the
    # steadier kernel is the better bet for the rest of the process.
    # A candidate three times as fast as every other after CLEAR_AFTER rounds ends the measuring
    # early (the first call of a bucket runs inside a served request); not sooner, as a stalled
    # two-thread call looks 4x slower than it is.
    WARMUP, MIN_REPS, MAX_REPS, MIN_TIME_S, TIE_MARGIN, CLEAR_AFTER = 2, 9, 41, 0.2, 0.05, 5

    def __init__(self):
        self.lock = threading.Lock()
        self.table: dict[tuple, dict] = {}  # (op, device label, repr(key)) -> the visible entry
        self.memo: dict[tuple, str] = {}    # (op, device, key, torch threads) -> backend: the hot path
        self.loaded_from: str | None = None

    def run(self, op: str, device: torch.device, key: tuple, runnable: dict[str, Impl]) -> Any:
        self._load()
        full_key = (op, device_label(device), repr(key))
        memo_key = (op, device, key, torch.get_num_threads())
        with self.lock:  # one measurement at a time: a concurrent one would skew both
            entry = self.table.get(full_key)
            if entry is not None and entry["backend"] in runnable:
                self.memo[memo_key] = entry["backend"]
                return runnable[entry["backend"]]()
            samples, results, errors = measure(runnable, device, self.WARMUP, self.MIN_REPS, self.MAX_REPS,
                                               self.MIN_TIME_S, self.CLEAR_AFTER)
            if not samples:
                raise RuntimeError(f"{op}: every backend failed on these inputs: {errors}")
            times = {b: typical(s) for b, s in samples.items()}
            spread = {b: _spread(s) for b, s in samples.items()}
            fastest = min(times.values())
            tied = [b for b in times if times[b] <= fastest * (1 + self.TIE_MARGIN)]
            best = min(tied, key=lambda b: (spread[b], times[b]))
            self.table[full_key] = {"op": op, "device": full_key[1], "key": full_key[2], "backend": best,
                                    "times_us": {b: round(t * 1e6, 1) for b, t in times.items()},
                                    "spread": {b: round(v, 3) for b, v in spread.items()},
                                    "samples": len(next(iter(samples.values()))), "errors": errors}
            log.info("auto backend: %s on %s %s -> %s (%s)", op, full_key[1], full_key[2], best,
                     ", ".join(f"{b} {t * 1e6:.0f} us +-{spread[b]:.0%}"
                               for b, t in sorted(times.items(), key=lambda i: i[1])))
            self.memo[memo_key] = best
            self._save()
            return results[best]

    def _load(self) -> None:
        path = os.environ.get("MSC_KERNEL_CACHE")
        if not path or self.loaded_from == path:
            return
        self.loaded_from = path
        try:
            with open(path) as f:
                for entry in json.load(f):
                    self.table.setdefault((entry["op"], entry["device"], entry["key"]), entry)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.info("auto backend: no usable choices in %s (%s); measuring", path, exc)

    def _save(self) -> None:
        path = os.environ.get("MSC_KERNEL_CACHE")
        if not path:
            return
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(list(self.table.values()), f, indent=1)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("auto backend: cannot save the choices to %s: %s", path, exc)

    def clear(self) -> None:
        with self.lock:
            self.table.clear()
            self.memo.clear()
            self.loaded_from = None


_CHOICES = _Choices()


def backend_choices() -> list[dict]:
    """Every choice `auto` has made in this process (or loaded from MSC_KERNEL_CACHE): op, device,
    key, the backend picked, each candidate's time in microseconds and any candidate's error."""
    return [dict(entry) for entry in _CHOICES.table.values()]


def clear_backend_choices() -> None:
    """Forget every measured choice (the next auto call of each kind measures again)."""
    _CHOICES.clear()
