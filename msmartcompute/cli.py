"""Command line: `msmartcompute serve ...`."""
from __future__ import annotations

import argparse
import logging
import sys

from .config import load_config


def serve(args: argparse.Namespace) -> int:
    import waitress

    from .api import create_app
    from .runtime.engine import Runtime, RuntimeConfig

    config = load_config(args.config, {"host": args.host, "port": args.port, "state_dir": args.state_dir,
                                       "threads": args.threads})
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runtime = Runtime(RuntimeConfig(state_dir=config.state_dir))
    app = create_app(runtime)
    logging.getLogger("msmartcompute").info(
        "serving on http://%s:%d (state dir %s)", config.host, config.port, config.state_dir.resolve())
    try:
        waitress.serve(app, host=config.host, port=config.port, threads=config.threads, ident="msmartcompute")
    finally:
        runtime.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msmartcompute", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="start the REST server")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8080)")
    p.add_argument("--state-dir", help="folder for the SQLite store and state (default ./var)")
    p.add_argument("--config", help="config file, JSON or TOML")
    p.add_argument("--threads", type=int, help="waitress worker threads (default 8)")
    p.set_defaults(func=serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
