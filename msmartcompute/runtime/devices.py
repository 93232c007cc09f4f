"""Physical devices and their live readings: NVML for GPUs, /proc for the host.

With no GPU, readings that only a GPU has (utilization, temperature, power) are
None and `gpu_status()` says why; they are never invented.
"""
from __future__ import annotations

import os
import threading

import torch

_nvml_lock = threading.Lock()
_nvml_state: dict = {}


def _nvml():
    """The initialised pynvml module, or None with the reason kept in _nvml_state."""
    with _nvml_lock:
        if "module" in _nvml_state:
            return _nvml_state["module"]
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml_state["module"] = pynvml
        except Exception as exc:  # NVMLError_LibraryNotFound with no driver, ImportError
            _nvml_state["module"] = None
            _nvml_state["reason"] = f"NVML unavailable: {type(exc).__name__}: {exc}"
        return _nvml_state["module"]


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_status() -> str:
    """'available' when CUDA devices are usable, else 'unavailable'."""
    return "available" if gpu_count() > 0 else "unavailable"


def gpu_unavailable_reason() -> str | None:
    if gpu_count() > 0:
        return None
    nvml = _nvml()
    if nvml is None:
        return _nvml_state.get("reason", "no CUDA device")
    return "torch sees no CUDA device"


def host_memory() -> tuple[int, int]:
    """(total, available) host memory in bytes, from /proc/meminfo."""
    fields = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, value = line.split(":", 1)
                fields[name] = int(value.split()[0]) * 1024
        return fields["MemTotal"], fields.get("MemAvailable", fields.get("MemFree", 0))
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        return total, avail


def host_memory_usage() -> float:
    """Fraction of host memory in use (0..1)."""
    total, available = host_memory()
    return (total - available) / total if total else 0.0


def gpu_readings(index: int = 0) -> dict:
    """NVML readings of one GPU; every value None when NVML cannot read it."""
    readings = {"gpu_utilization": None, "memory_used": None, "memory_total": None,
                "temperature": None, "power_usage": None}
    nvml = _nvml()
    if nvml is None or gpu_count() == 0:
        return readings
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        util = nvml.nvmlDeviceGetUtilizationRates(handle)
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        readings.update(
            gpu_utilization=util.gpu / 100.0,
            memory_used=int(mem.used),
            memory_total=int(mem.total),
            temperature=float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
            power_usage=nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
        )
    except Exception:  # a reading the driver refuses stays None
        pass
    return readings
