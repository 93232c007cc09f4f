"""Shared pieces of the reliability tests: user TorchScript programs saved under a model root,
a tiny HTTP client for live servers, and the server process's resident memory."""
import json
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import torch


class Faulty(torch.nn.Module):
    """x * 2, except: a row holding 13 raises (a program error), a row holding 7 asks the
    allocator for 1 PiB (out of memory). Input [rows, width] float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x == 13.0).any()):
            raise ValueError("marker 13 seen")
        if bool((x == 7.0).any()):
            huge = torch.empty([1 << 50], dtype=torch.uint8)
            return huge[:1].float().expand(x.shape[0], 1)
        return x * 2


class Slow(torch.nn.Module):
    """Busy for x[0, 0] units of work (a 512x512 matmul each, ~10 ms on one core), then
    x * 2: the input decides how long a request runs, so tests can hold requests in flight.
    Few, large ops: TorchScript's profiling runs stay cheap."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.eye(512) * 0.5
        y = torch.ones(512, 512)
        for _ in range(int(x[0, 0].item())):
            y = (y @ w) * 2.0
        return x * 2 + (y[0, 0] - 1.0)


def slow_units_for(seconds: float) -> int:
    """How many Slow units take at least `seconds` on this machine now: a unit is ~2 ms on a quiet
    core and ~10 ms on a loaded one, so a fixed count holds a request in flight for too short a
    time on a quiet machine. Measured here with this process's threads, which the server's
    engine does not exceed, so the server takes at least as long."""
    import time
    w, y = torch.eye(512) * 0.5, torch.ones(512, 512)
    y = (y @ w) * 2.0  # warm-up
    start, units = time.perf_counter(), 20
    for _ in range(units):
        y = (y @ w) * 2.0
    per_unit = (time.perf_counter() - start) / units
    return max(1, int(seconds / per_unit) + 1)


def save_program(module: torch.nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(module), str(path))
    return path


def program_spec(model_id: str, path: Path, **extra) -> dict:
    return {"model_id": model_id, "model_type": "torchscript", "model_path": str(path), **extra}


def http(base_url: str, method: str, path: str, body=None, key: str | None = None, timeout: float = 60):
    """(status, parsed JSON body) of one request; never raises for an HTTP error status."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(base_url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, (json.loads(raw) if raw else None)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def quiet_env(**extra) -> dict:
    """Environment for a live server whose stdout pipe is not read while it runs: warnings only."""
    return {"MSC_LOG_LEVEL": "WARNING", **extra}
