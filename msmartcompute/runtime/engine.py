"""The Runtime: the one object the API talks to. It owns the store and the parts
of the engine (models, batching, jobs, ...), each added in its own module."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import msmartcompute

from . import devices
from .store import Store


@dataclass
class RuntimeConfig:
    state_dir: Path = Path("var")


class Runtime:
    def __init__(self, config: RuntimeConfig):
        self.config = config
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.state_dir / "msmartcompute.sqlite3")
        self.started_at = time.monotonic()

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

    def close(self) -> None:
        self.store.close()
