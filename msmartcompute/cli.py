"""Command line: `msmartcompute serve | keys ... | bench <suite>`."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys
from pathlib import Path

from .config import load_config

log = logging.getLogger("msmartcompute")


def _is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def _runtime(config):
    from .runtime.engine import Runtime, RuntimeConfig

    try:
        runtime_config = RuntimeConfig(state_dir=config.state_dir, **config.runtime)
    except TypeError as exc:
        raise SystemExit(f"config file: bad [inference]/[virtualization] setting: {exc}") from None
    return Runtime(runtime_config)


def serve(args: argparse.Namespace) -> int:
    import waitress

    from .api import create_app
    from .api.app import ApiConfig
    from .api.ratelimit import RateLimitConfig
    from .runtime.errors import MSCError
    from .runtime.keys import KeyStore

    config = load_config(args.config, {"host": args.host, "port": args.port, "state_dir": args.state_dir,
                                       "threads": args.threads})
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runtime = _runtime(config)
    keys = KeyStore(runtime.store)
    for entry in config.api_keys:
        keys.add(entry["key"], entry.get("user_id", "admin"), entry.get("role", "admin"))
    open_mode = keys.count() == 0
    if open_mode and not _is_loopback(config.host):
        runtime.close()
        log.error("refusing to serve on %s with no API keys: create one with "
                  "`msmartcompute keys create --user U --role admin` or bind to 127.0.0.1", config.host)
        return 2
    if open_mode:
        log.warning("no API keys configured: serving OPEN (no authentication) on loopback only")
    runtime.start()
    for spec in config.models:
        try:
            runtime.load_model(dict(spec))
            log.info("preloaded model %s", spec.get("model_id"))
        except MSCError as exc:
            if exc.code != "MODEL_ALREADY_LOADED":  # restored from the store already
                log.error("could not preload model %s: %s", spec.get("model_id"), exc.message)
    app = create_app(runtime, ApiConfig(
        max_body_bytes=config.max_body_bytes, open_mode=open_mode,
        rate_limit=RateLimitConfig(config.rate_limit_per_minute, config.rate_limit_burst,
                                   config.rate_limit_enabled)))
    log.info("serving on http://%s:%d (state dir %s)", config.host, config.port, Path(config.state_dir).resolve())
    try:
        waitress.serve(app, host=config.host, port=config.port, threads=config.threads, ident="msmartcompute",
                       max_request_body_size=config.max_body_bytes, clear_untrusted_proxy_headers=True)
    finally:
        runtime.close()
    return 0


def keys_command(args: argparse.Namespace) -> int:
    from .runtime.keys import KeyStore
    from .runtime.store import Store

    config = load_config(args.config, {"state_dir": args.state_dir})
    store = Store(Path(config.state_dir) / "msmartcompute.sqlite3")
    keys = KeyStore(store)
    if args.keys_command == "create":
        try:
            key = keys.create(args.user, args.role)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(key)
        print(f"created a {args.role} key for {args.user}; it is shown only once", file=sys.stderr)
    elif args.keys_command == "list":
        for entry in keys.list():
            print(f"{entry['key_id']}  {entry['role']:<5}  {entry['user_id']}")
    elif args.keys_command == "revoke":
        if not keys.revoke(args.key_id):
            print(f"error: no key with id {args.key_id}", file=sys.stderr)
            return 1
    store.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msmartcompute", description="MSmartCompute engine and server")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="start the REST server")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8080)")
    p.add_argument("--state-dir", help="folder for the SQLite store and state (default ./var)")
    p.add_argument("--config", help="config file, JSON or TOML")
    p.add_argument("--threads", type=int,
                   help="waitress worker threads (default 32: a batch holds at most this many requests)")
    p.set_defaults(func=serve)

    k = sub.add_parser("keys", help="manage API keys (stored hashed in the state dir)")
    k.add_argument("--state-dir", help="state dir (default ./var)")
    k.add_argument("--config", help="config file, JSON or TOML")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    c = ksub.add_parser("create", help="create a key and print it once")
    c.add_argument("--user", required=True)
    c.add_argument("--role", choices=["admin", "user"], default="user")
    ksub.add_parser("list", help="list key ids, roles and users (never the keys)")
    r = ksub.add_parser("revoke", help="revoke a key by id")
    r.add_argument("key_id")
    k.set_defaults(func=keys_command)

    from .bench import add_parser as add_bench_parser
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
