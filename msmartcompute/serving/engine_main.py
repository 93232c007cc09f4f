"""The engine process: `python -m msmartcompute.serving.engine_main ...` (started by the
supervisor). Restores the Runtime from the store (models, vGPUs, allocations, jobs), registers
the configured keys, preloads the configured models, then serves the fronts until SIGTERM.
Its pid file appears once it answers and goes when it stops: fronts answer 503 meanwhile."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from ..api.ratelimit import RateLimitConfig, RateLimiter
from ..runtime.engine import Runtime, RuntimeConfig
from ..runtime.errors import MSCError
from .children import child_args, child_config, die_with_parent, settle_heap, stop_event
from .engine_server import EngineServer

log = logging.getLogger("msmartcompute.engine")


def main(argv: list[str] | None = None) -> int:
    args = child_args(argv)
    die_with_parent(args.parent)
    config = child_config(args)
    stopping = stop_event()
    try:
        runtime_config = RuntimeConfig(state_dir=config.state_dir, **config.runtime)
    except TypeError as exc:
        log.error("config file: bad [inference]/[virtualization] setting: %s", exc)
        return 2
    runtime = Runtime(runtime_config)  # `serve` registered the configured keys before starting us
    runtime.start()
    for spec in config.models:
        try:
            runtime.registry.load(dict(spec))
            log.info("preloaded model %s", spec.get("model_id"))
        except MSCError as exc:
            if exc.code != "MODEL_ALREADY_LOADED":  # restored from the store already
                log.error("could not preload model %s: %s", spec.get("model_id"), exc.message)
    limiter = RateLimiter(RateLimitConfig(config.rate_limit_per_minute, config.rate_limit_burst,
                                          config.rate_limit_enabled))
    server = EngineServer(runtime, args.engine_address, limiter)
    settle_heap()
    pid_file = Path(args.pid_file)
    tmp = pid_file.with_suffix(".tmp")
    tmp.write_text(str(os.getpid()))
    tmp.replace(pid_file)  # atomic: a front never reads half a pid
    log.info("engine ready (pid %d)", os.getpid())
    try:
        server.serve(stopping)
    finally:
        if pid_file.exists() and pid_file.read_text() == str(os.getpid()):
            pid_file.unlink()
        server.close()
        runtime.close()
    log.info("engine stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
