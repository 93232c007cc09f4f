"""A front process: `python -m msmartcompute.serving.front ...` (started by the supervisor).
waitress + the Falcon app on the listening socket it inherits (shared by every front), over an
EngineClient instead of a Runtime: HTTP, typed decoding, validation, auth and response encoding
happen here, everything else in the engine. One thread: waitress' loop, each request a greenlet
on it (serving/loop.py). SIGTERM: stop accepting, finish what is in flight (at most
DRAIN_TIMEOUT_S), exit 0."""
from __future__ import annotations

import logging
import socket
import sys
import time
from pathlib import Path

from ..api import create_app
from ..api.app import ApiConfig
from ..api.ratelimit import RateLimitConfig, RemoteRateLimiter
from ..runtime.keys import KeyStore
from ..runtime.store import Store
from .children import child_args, child_config, die_with_parent, settle_heap, stop_event
from .connections import connection_settings, guard
from .engine_client import EngineClient
from .heartbeat import Heartbeat
from .loop import Loop

log = logging.getLogger("msmartcompute.front")

DRAIN_TIMEOUT_S = 30.0


def waitress_settings(config) -> dict:
    """The one place the waitress settings of every front are decided."""
    return {"ident": "msmartcompute", "max_request_body_size": config.max_body_bytes,
            "clear_untrusted_proxy_headers": True,
            # flush each write at once: a streamed token must not wait for 18 kB of output
            # (waitress' default send_bytes) or for the request's end
            "send_bytes": 1,
            **connection_settings(config)}


def main(argv: list[str] | None = None) -> int:
    import waitress

    args = child_args(argv)
    die_with_parent(args.parent)
    config = child_config(args)
    stopping = stop_event()
    loop = Loop()
    engine = EngineClient(args.engine_address, Path(args.pid_file), loop)
    store = Store(Path(config.state_dir) / "msmartcompute.sqlite3")
    rate_limit = RateLimitConfig(config.rate_limit_per_minute, config.rate_limit_burst, config.rate_limit_enabled)
    app = create_app(engine, ApiConfig(max_body_bytes=config.max_body_bytes, open_mode=args.open_mode,
                                       rate_limit=rate_limit, cors_origins=tuple(config.cors_origins)),
                     keys=KeyStore(store), limiter=RemoteRateLimiter(engine, rate_limit))
    listener = socket.socket(fileno=args.listen_fd)
    # the loop is the task dispatcher: waitress starts no task threads
    server = waitress.create_server(app, sockets=[listener], _dispatcher=loop, **waitress_settings(config))
    loop.attach(server)
    guard(server, config)
    heartbeat = Heartbeat(Path(args.heartbeat)) if args.heartbeat else None
    settle_heap()
    while not stopping.is_set():
        loop.run_once(0.2)  # short turns: a signal is noticed within 0.2 s
        if heartbeat is not None:
            heartbeat.beat()
    log.info("front stopping: no new connections; draining in-flight requests (at most %.0f s)", DRAIN_TIMEOUT_S)
    if not drain(loop, DRAIN_TIMEOUT_S):
        log.warning("drain timed out after %.0f s: closing the remaining connections", DRAIN_TIMEOUT_S)
    store.close()
    return 0


def drain(loop: Loop, timeout_s: float) -> bool:
    """Close the listening sockets, keep the loop turning until no channel has a request being
    read, queued, served or written out (or timeout_s passes), then close everything.
    Returns whether every in-flight request finished."""
    from waitress import wasyncore
    from waitress.channel import HTTPChannel
    from waitress.server import BaseWSGIServer

    smap = loop.map
    for listener in [d for d in list(smap.values()) if isinstance(d, BaseWSGIServer)]:
        wasyncore.dispatcher.close(listener)  # refuse new connections; the trigger stays

    def busy() -> bool:
        return any(isinstance(ch, HTTPChannel) and (ch.requests or ch.request is not None or ch.total_outbufs_len)
                   for ch in list(smap.values()))

    deadline = time.monotonic() + timeout_s
    while busy() and time.monotonic() < deadline:
        loop.run_once(0.05)
    drained = not busy()
    loop.shutdown()
    wasyncore.close_all(smap)
    return drained


if __name__ == "__main__":
    sys.exit(main())
