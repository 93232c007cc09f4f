"""Command line: `msmartcompute serve | keys ... | train | bench <suite>`."""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import socket
import sys
from pathlib import Path

from . import __version__
from .config import load_config

log = logging.getLogger("msmartcompute")


class CliError(Exception):
    """A mistake the user can fix: main() prints it as one line and exits with `status`."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def _config(args: argparse.Namespace, overrides: dict):
    """The merged config, or a one-line CliError naming the file or variable at fault."""
    try:
        return load_config(args.config, {"state_dir": args.state_dir, **overrides})
    except OSError as exc:
        raise CliError(f"cannot read config file {args.config}: {exc.strerror or exc}") from None
    except ValueError as exc:  # also JSON and TOML syntax errors
        where = "" if str(exc).startswith(("config file", "environment variable")) else f"config file {args.config}: "
        raise CliError(f"{where}{exc}") from None


def _is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def serve(args: argparse.Namespace) -> int:
    """The supervisor: one engine process, --workers front processes (serving/supervisor.py)."""
    from .runtime.keys import KeyStore
    from .runtime.statedir import StateDirBusy, StateDirLock
    from .runtime.store import STORE_FILENAME, Store, StoreDamaged
    from .serving.supervisor import Supervisor, default_workers

    config = _config(args, {"host": args.host, "port": args.port,
                            "require_keys": args.require_keys})
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        Path(config.state_dir).mkdir(parents=True, exist_ok=True)
        # one server per state dir, decided before anything in it is read: this process (the
        # supervisor) holds the lock for its life; its children do not inherit the descriptor
        state_lock = StateDirLock(config.state_dir).acquire()
    except StateDirBusy as exc:
        raise CliError(f"refusing to start: {exc}") from None
    except OSError as exc:
        raise CliError(f"state dir {config.state_dir}: {exc.strerror or exc}") from None
    try:
        store = Store(Path(config.state_dir) / STORE_FILENAME)
    except StoreDamaged as exc:
        raise CliError(f"refusing to start: {exc}") from None
    except OSError as exc:
        raise CliError(f"state dir {config.state_dir}: {exc.strerror or exc}") from None
    try:  # before any process starts: the engine is the only writer of the store once serving
        keys = KeyStore(store)
        for entry in config.api_keys:
            keys.add(str(entry.get("key", "")), entry.get("user_id", "admin"), entry.get("role", "admin"))
        open_mode = keys.count() == 0 and not config.require_keys
    except (ValueError, AttributeError) as exc:
        raise CliError(f"bad API key in the config file or MSC_ADMIN_KEY: {exc}") from None
    finally:
        store.close()
    if open_mode and not _is_loopback(config.host):
        log.error("refusing to serve on %s with no API keys: create one with "
                  "`msmartcompute keys create --user U --role admin` or bind to 127.0.0.1", config.host)
        return 2
    if open_mode:
        log.warning("no API keys configured: serving OPEN (no authentication) on loopback only")
    workers = args.workers if args.workers is not None else default_workers()
    if workers < 1:
        raise CliError("--workers must be at least 1")
    child_argv = [arg for name, value in (("--config", args.config), ("--host", config.host),
                                          ("--port", config.port), ("--state-dir", config.state_dir))
                  if value is not None
                  for arg in (name, str(value))]
    try:
        supervisor = Supervisor(config, child_argv, workers, open_mode)
    except OSError as exc:  # port in use, address not on this machine, privileged port
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise CliError(f"cannot listen on {config.host}:{config.port}: {reason}", 1) from None
    try:
        return supervisor.run()
    finally:
        state_lock.release()


def keys_command(args: argparse.Namespace) -> int:
    from .runtime.ids import check_id
    from .runtime.keys import KeyStore
    from .runtime.store import STORE_FILENAME, Store, StoreDamaged

    config = _config(args, {})
    path = Path(config.state_dir) / STORE_FILENAME
    if args.keys_command == "create":
        try:
            check_id(args.user, "--user")
        except ValueError as exc:
            raise CliError(str(exc)) from None
    elif not path.exists():  # list/revoke only read: never create a state dir for them
        if args.keys_command == "revoke":
            raise CliError(f"no key {args.key}: there is no store at {path}", 1)
        print(f"no keys: there is no store at {path}", file=sys.stderr)
        return 0
    try:
        store = Store(path)
    except StoreDamaged as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"state dir {config.state_dir}: {exc.strerror or exc}") from None
    keys = KeyStore(store)
    try:
        if args.keys_command == "create":
            print(keys.create(args.user, args.role))
            print(f"created a {args.role} key for {args.user}; it is shown only once", file=sys.stderr)
        elif args.keys_command == "list":
            for entry in keys.list():
                print(f"{entry['key_id']}  {entry['role']:<5}  {entry['user_id']}")
        elif args.keys_command == "revoke":
            revoked = keys.revoke(args.key)
            if revoked is None:
                raise CliError(f"no key with id {args.key}", 1)
            print(f"revoked {revoked['role']} key {revoked['key_id']} of user {revoked['user_id']}")
    finally:
        store.close()
    return 0


def store_command(args: argparse.Namespace) -> int:
    """`store backup FILE`: a consistent copy while the server runs (SQLite online backup).
    `store restore FILE`: replace the store with a checked backup; the server must be stopped."""
    from .runtime.statedir import StateDirBusy, StateDirLock
    from .runtime.store import STORE_FILENAME, Store, StoreDamaged, restore

    config = _config(args, {})
    path = Path(config.state_dir) / STORE_FILENAME
    try:
        if args.store_command == "backup":
            if not path.exists():
                raise CliError(f"no store at {path}", 1)
            store = Store(path)
            try:
                store.backup(args.file)
            finally:
                store.close()
            print(f"backed up {path} to {args.file}", file=sys.stderr)
        else:
            lock = StateDirLock(config.state_dir).acquire()
            try:
                kept = restore(args.file, path)
            finally:
                lock.release()
            print(f"restored {path} from {args.file}"
                  + (f"; the replaced store is kept as {kept}" if kept else ""), file=sys.stderr)
    except (StoreDamaged, StateDirBusy, FileExistsError) as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"{exc.filename or path}: {exc.strerror or exc}") from None
    return 0


def progress_bar(result: dict, width: int = 30) -> str:
    """One line for a training job: `[#####-----]  12/100 epochs  loss 0.1234  running`."""
    total = max(1, int(result.get("epochs") or 1))
    done = int(result.get("epochs_completed") or 0)
    filled = min(width, width * done // total)
    loss = result.get("current_loss")
    return (f"[{'#' * filled}{'-' * (width - filled)}] {done:>{len(str(total))}}/{total} epochs"
            f"  loss {'-' if loss is None else f'{loss:.4g}'}  {result.get('status', '')}")


def train_command(args: argparse.Namespace) -> int:
    """Submit a training request (a JSON file: the POST /training body) and print the result;
    --async queues it and draws a progress bar on stderr while it runs."""
    from .client import ConnectionFailedError, MSmartComputeClient, MSmartComputeError, UnauthorizedError

    try:
        with open(args.file) as f:
            body = json.load(f)
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    base = args.url.rstrip("/")
    client = MSmartComputeClient(base if base.endswith("/api/v1") else base + "/api/v1", args.key,
                                 timeout=args.timeout)
    try:
        if not args.async_:
            result = client._request("POST", "/training", body)
        else:
            job = client._request("POST", "/training/async", body)
            print(f"queued {job['request_id']}", file=sys.stderr)

            def draw(r: dict) -> None:
                print("\r" + progress_bar(r), end="", file=sys.stderr, flush=True)

            try:
                result = client.wait(job["request_id"], timeout=args.timeout, kind="training", on_progress=draw)
            finally:
                print(file=sys.stderr)
    except ConnectionFailedError as exc:
        raise CliError(f"{exc.message}; is `msmartcompute serve` running there?", 1) from None
    except UnauthorizedError as exc:
        raise CliError(f"{exc}; pass --key or set MSC_API_KEY", 1) from None
    except MSmartComputeError as exc:
        raise CliError(str(exc), 1) from None
    print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msmartcompute", description="MSmartCompute engine and server")
    parser.add_argument("--version", action="version", version=f"msmartcompute {__version__}")
    _add_state_options(parser)
    # the same options after a subcommand; SUPPRESS keeps a value given before it
    state = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    _add_state_options(state)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="start the REST server", parents=[state])
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8080)")
    p.add_argument("--workers", type=int,
                   help="front processes (HTTP), sharing one socket (default: one per core, at least 2)")
    p.add_argument("--require-keys", action="store_true", default=None,
                   help="refuse requests without a valid key even while no key exists (never serve open)")
    p.set_defaults(func=serve)

    k = sub.add_parser("keys", help="manage API keys (stored hashed in the state dir)", parents=[state])
    ksub = k.add_subparsers(dest="keys_command", required=True)
    c = ksub.add_parser("create", help="create a key and print it once", parents=[state])
    c.add_argument("--user", required=True, help="the user id the key acts as (the API's id rules)")
    c.add_argument("--role", choices=["admin", "user"], default="user")
    ksub.add_parser("list", help="list key ids, roles and users (never the keys)", parents=[state])
    r = ksub.add_parser("revoke", help="revoke a key, given the key or its id", parents=[state])
    r.add_argument("key", help="the key id (as `keys list` shows it) or the whole msc_... key")
    k.set_defaults(func=keys_command)

    s = sub.add_parser("store", help="back up or restore the state dir's SQLite store", parents=[state])
    ssub = s.add_subparsers(dest="store_command", required=True)
    ssub.add_parser("backup", help="copy the store to FILE, also while the server runs",
                    parents=[state]).add_argument("file")
    ssub.add_parser("restore", help="replace the store with FILE (stop the server first)",
                    parents=[state]).add_argument("file")
    s.set_defaults(func=store_command)

    t = sub.add_parser("train", help="train a model on a server from a JSON request file")
    t.add_argument("--url", default="http://127.0.0.1:8080", help="server URL (default http://127.0.0.1:8080)")
    t.add_argument("--key", default=os.environ.get("MSC_API_KEY"),
                   help="API key (default: the MSC_API_KEY environment variable)")
    t.add_argument("--file", required=True, help="the POST /training body, as JSON")
    t.add_argument("--async", dest="async_", action="store_true",
                   help="queue the job and show a progress bar until it ends")
    t.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait (default 3600)")
    t.set_defaults(func=train_command)
    from .bench import add_parser as add_bench_parser
    add_bench_parser(sub)
    return parser


def _add_state_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", help="folder for the SQLite store and state (default ./var)")
    parser.add_argument("--config", help="config file, JSON or TOML")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"msmartcompute: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
