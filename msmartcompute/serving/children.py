"""What the engine and front processes share: the arguments the supervisor starts them with,
and dying with the supervisor (SIGKILL of the supervisor takes the whole group down)."""
from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import os
import signal
import threading

from ..config import load_config

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel sends SIGKILL when the supervisor goes, however it goes."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(1)


def child_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--state-dir")
    p.add_argument("--engine-address", required=True)
    p.add_argument("--pid-file", required=True)
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--listen-fd", type=int)
    p.add_argument("--heartbeat", help="a front's heartbeat file (serving/heartbeat.py)")
    p.add_argument("--open-mode", action="store_true")
    return p.parse_args(argv)


def child_config(args: argparse.Namespace):
    config = load_config(args.config, {"host": args.host, "port": args.port, "state_dir": args.state_dir})
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return config


def stop_event() -> threading.Event:
    """Set by SIGTERM / SIGINT."""
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopping.set())
    return stopping


def settle_heap() -> None:
    """Once started: move every object made so far (modules, the app, the model registry) out of
    the cyclic collector's sight, so its collections while serving walk only what requests make."""
    gc.collect()
    gc.freeze()
