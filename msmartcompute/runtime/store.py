"""The embedded SQLite store: one file in the state dir, WAL, versioned schema.

Everything persistent goes through this one small interface. Each thread gets
its own connection (sqlite3 connections are not shared across threads); WAL lets
readers proceed while one writer commits.

Opening checks the file (`PRAGMA quick_check`) and refuses a damaged one with StoreDamaged
rather than starting on an empty or half-readable store: a store that lost its keys would
otherwise serve open. The file and its -wal/-shm are readable by the owner only (0600).
`backup()` / `restore()` copy with SQLite's online backup API (a consistent copy while
the server writes).
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

# Each entry migrates the schema from version i to i + 1. Append only.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE kv (
        namespace TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (namespace, key)
    );
    """,
    # runtime: persisted counters (ids), async jobs, metrics snapshots
    """
    CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        owner TEXT,
        status TEXT NOT NULL,
        request TEXT NOT NULL,
        result TEXT,
        error TEXT,
        created_at REAL NOT NULL,
        started_at REAL,
        completed_at REAL
    );
    CREATE INDEX jobs_status ON jobs(status, created_at);
    CREATE TABLE metrics_history (
        ts REAL NOT NULL,
        gpu_utilization REAL,
        memory_utilization REAL,
        temperature REAL,
        power_usage REAL,
        throughput REAL,
        latency REAL,
        active_requests REAL,
        queued_requests REAL
    );
    CREATE INDEX metrics_history_ts ON metrics_history(ts);
    """,
    # training: a running job's progress (epochs done, latest loss), JSON
    """
    ALTER TABLE jobs ADD COLUMN progress TEXT;
    """,
    # job retention (runtime/jobs.py): when a finished job's result was first read; the indexes
    # behind the per-user cap and the TTL sweep
    """
    ALTER TABLE jobs ADD COLUMN read_at REAL;
    CREATE INDEX jobs_owner_status ON jobs(owner, status);
    CREATE INDEX jobs_status_completed ON jobs(status, completed_at);
    """,
]


STORE_FILENAME = "msmartcompute.sqlite3"  # inside the state dir


class StoreDamaged(RuntimeError):
    """The store file is not a readable SQLite database; nothing was changed."""


def _restore_hint(path: Path) -> str:
    return (f"restore a backup with `msmartcompute store restore BACKUP --state-dir {path.parent}` "
            f"(or move {path.name} away to start from an empty store)")


def check_file(path: Path) -> None:
    """Raise StoreDamaged unless `path` is a whole SQLite database that passes quick_check.
    A WAL store's main file holds at least its header page once created, so 0 bytes is damage."""
    if path.exists() and path.stat().st_size == 0:
        raise StoreDamaged(f"store {path} is empty (0 bytes) although it exists: it was truncated; "
                           + _restore_hint(path))
    try:
        conn = sqlite3.connect(path, timeout=30)
        try:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise StoreDamaged(f"store {path} cannot be read ({exc}); " + _restore_hint(path)) from None
    if problems != ["ok"]:
        shown = "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
        raise StoreDamaged(f"store {path} is damaged: {shown}; " + _restore_hint(path))


def _owner_only(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        try:
            os.chmod(f"{path}{suffix}", 0o600)
        except FileNotFoundError:
            pass


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            check_file(self.path)
        else:  # created owner-only before SQLite writes anything into it
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._local = threading.local()
        self._migrate()
        _owner_only(self.path)

    def connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @property
    def schema_version(self) -> int:
        return self.connect().execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self) -> None:
        conn = self.connect()
        if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
            # a new store: freed pages can go back to the file system (compact(), after a purge);
            # WAL mode already wrote the header, so the setting takes with a VACUUM (of nothing)
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.execute("VACUUM")
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise RuntimeError(f"{self.path} has schema version {version}, newer than this "
                                   f"msmartcompute ({len(MIGRATIONS)}); upgrade msmartcompute")
            for i in range(version, len(MIGRATIONS)):
                # statement by statement: executescript() would commit mid-migration
                for statement in filter(str.strip, MIGRATIONS[i].split(";")):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {i + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def compact(self) -> None:
        """Give freed pages back to the file system (stores created with auto_vacuum; an older
        store keeps them and reuses them: it stops growing instead of shrinking)."""
        self.connect().executescript("PRAGMA incremental_vacuum")  # execute() would free one page only

    def put(self, namespace: str, key: str, value) -> None:
        self.connect().execute(
            "INSERT INTO kv(namespace, key, value, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(namespace, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            (namespace, key, json.dumps(value), time.time()),
        )

    def get(self, namespace: str, key: str, default=None):
        row = self.connect().execute("SELECT value FROM kv WHERE namespace = ? AND key = ?",
                                     (namespace, key)).fetchone()
        return default if row is None else json.loads(row["value"])

    def delete(self, namespace: str, key: str) -> bool:
        cur = self.connect().execute("DELETE FROM kv WHERE namespace = ? AND key = ?", (namespace, key))
        return cur.rowcount > 0

    def items(self, namespace: str) -> list[tuple[str, object]]:
        rows = self.connect().execute("SELECT key, value FROM kv WHERE namespace = ? ORDER BY key",
                                      (namespace,)).fetchall()
        return [(r["key"], json.loads(r["value"])) for r in rows]

    def next_counter(self, name: str) -> int:
        """The next value (1, 2, ...) of a persisted counter; atomic across threads and processes."""
        return self.connect().execute(
            "INSERT INTO counters(name, value) VALUES (?, 1) "
            "ON CONFLICT(name) DO UPDATE SET value = value + 1 RETURNING value", (name,)).fetchone()[0]

    def backup(self, dest: str | Path) -> None:
        """A consistent copy of the live store into `dest` (a new file, 0600), while others write."""
        dest = Path(dest)
        if dest.exists():
            raise FileExistsError(f"{dest} exists; a backup never overwrites a file")
        os.close(os.open(dest, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600))
        target = sqlite3.connect(dest)
        try:
            self.connect().backup(target)
        finally:
            target.close()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def restore(backup: str | Path, path: str | Path) -> Path | None:
    """Replace the store at `path` with a copy of `backup` (checked first). The store must not
    be open anywhere (the caller holds the state-dir lock). The replaced file, if any, is kept
    beside it as `<name>.replaced-<unix>`; returns that path."""
    backup, path = Path(backup), Path(path)
    check_file(backup)
    kept = path.with_name(f"{path.name}.replaced-{int(time.time())}")
    if not path.exists():
        kept = None
    for suffix in ("", "-wal", "-shm"):  # the journal moves with its file: never replayed onto the copy
        if Path(f"{path}{suffix}").exists():
            if kept is None:
                Path(f"{path}{suffix}").unlink()
            else:
                Path(f"{path}{suffix}").rename(f"{kept}{suffix}")
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600))
    source, target = sqlite3.connect(backup), sqlite3.connect(path)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()
    check_file(path)
    return kept
