"""Async jobs: rows in the store's `jobs` table, run by one pool of threads per kind.

The runner is generic: `register(kind, handler, rerun_on_restart)` plugs a kind in
(inference here; training adds its own). A handler takes the job's request dict and its
Deadline token (runtime/deadline.py) and returns a JSON-able result dict, or raises an
MSCError (stored as the job's error). `cancel(job_id)` ends a queued job at once and cancels
a running one's token, which the handler polls between steps; its Cancelled then ends the job
`cancelled`.

Each kind has its own workers (`workers_by_kind`, else `workers`), so long trainings never
hold the threads that async inference needs.

Bounds (JobLimits): one owner has at most `max_active_per_owner` jobs queued or running (more
is QUEUE_FULL). A finished job is deleted by `purge()` (the runtime's reaper) `read_ttl_s`
after it finished once its owner read it (`mark_read()`), or `unread_ttl_s` after it finished
if never read; its id is then NOT_FOUND. The store gives the freed pages back (Store.compact).

A job goes queued -> running -> completed | failed | cancelled. The result is written in the same UPDATE
that marks the job completed, so a completed job always has its result. On start(), queued
jobs run again; jobs left `running` by a stopped server are queued again when their kind
says rerun_on_restart (inference), else marked failed with the reason (training).
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Callable

from . import clock
from .deadline import Deadline
from .errors import Cancelled, InternalError, MSCError, QueueFull
from .store import Store

log = logging.getLogger("msmartcompute.runtime.jobs")


@dataclass
class Kind:
    handler: Callable[[dict, Deadline], dict]
    rerun_on_restart: bool


FINISHED = ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class JobLimits:
    max_active_per_owner: int = 64         # queued + running jobs of one user, every kind together
    read_ttl_s: float = 3600.0             # a finished job whose result was read is kept this long
    unread_ttl_s: float = 7 * 24 * 3600.0  # ... one never read, this long


def error_dict(exc: BaseException) -> dict:
    if not isinstance(exc, MSCError):
        exc = InternalError(f"{type(exc).__name__}: {exc}")
    return {"code": exc.code, "message": exc.message, "details": exc.details}


class JobRunner:
    def __init__(self, store: Store, workers: int = 4, workers_by_kind: dict[str, int] | None = None,
                 limits: JobLimits = JobLimits()):
        self.store = store
        self.workers = workers
        self.workers_by_kind = dict(workers_by_kind or {})
        self.limits = limits
        self.kinds: dict[str, Kind] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._threads: list[threading.Thread] = []
        self._tokens: dict[str, Deadline] = {}  # running jobs' tokens
        self._tokens_lock = threading.Lock()

    def register(self, kind: str, handler: Callable[[dict, Deadline], dict], rerun_on_restart: bool) -> None:
        """Plug a kind in; registered after start(), its pool starts at once."""
        self.kinds[kind] = Kind(handler, rerun_on_restart)
        if self._threads:
            self._start_pool(kind)

    # ---- rows ---------------------------------------------------------------------------------
    def workers_for(self, kind: str) -> int:
        return self.workers_by_kind.get(kind, self.workers)

    def submit(self, job_id: str, kind: str, owner: str | None, request: dict) -> dict:
        limit = self.limits.max_active_per_owner
        # the count and the insert in one statement: concurrent submissions cannot both pass
        inserted = self.store.connect().execute(
            "INSERT INTO jobs(id, kind, owner, status, request, created_at) SELECT ?, ?, ?, 'queued', ?, ? "
            "WHERE (SELECT COUNT(*) FROM jobs WHERE owner IS ? AND status IN ('queued', 'running')) < ?",
            (job_id, kind, owner, json.dumps(request), clock.now(), owner, limit)).rowcount
        if not inserted:
            raise QueueFull(f"{owner or 'this client'} already has {limit} async jobs queued or running; "
                            "retry when some have finished", {"max_active_jobs": limit, "user_id": owner})
        with self._cond:
            self._cond.notify_all()  # a pool per kind: the right one claims it
        return self.get(job_id)

    def mark_read(self, job: dict) -> None:
        """Its owner read `job`: once finished, its read_ttl_s runs (see purge)."""
        if job["status"] in FINISHED and job.get("read_at") is None:
            self.store.connect().execute("UPDATE jobs SET read_at = ? WHERE id = ?", (clock.now(), job["id"]))

    def purge(self, now: float | None = None) -> int:
        """Delete finished jobs past their TTL (see the module docstring); returns how many."""
        now = clock.now() if now is None else now
        deleted = self.store.connect().execute(
            "DELETE FROM jobs WHERE status IN ('completed', 'failed', 'cancelled') AND (completed_at < ? OR "
            "(read_at IS NOT NULL AND completed_at < ?))",
            (now - self.limits.unread_ttl_s, now - self.limits.read_ttl_s)).rowcount
        if deleted:
            self.store.compact()
        return deleted

    def get(self, job_id: str) -> dict | None:
        row = self.store.connect().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _row(row)

    def cancel(self, job_id: str) -> str | None:
        """A queued job ends `cancelled` at once; a running one is asked to stop at its next step
        (it stays `running` until it has). Returns the status after the call (None: no such
        job); a finished job is left as it is."""
        error = json.dumps({"code": Cancelled.code, "message": "cancelled on request", "details": {}})
        conn = self.store.connect()
        if conn.execute("UPDATE jobs SET status = 'cancelled', error = ?, completed_at = ? "
                        "WHERE id = ? AND status = 'queued'", (error, clock.now(), job_id)).rowcount:
            return "cancelled"
        job = self.get(job_id)
        if job is not None and job["status"] == "running":
            with self._tokens_lock:  # its worker may not have made its token yet: it takes this one
                self._tokens.setdefault(job_id, Deadline()).cancel(Cancelled("cancelled on request"))
        return None if job is None else job["status"]

    def recent(self, limit: int = 50, owner: str | None = None) -> list[dict]:
        """The latest jobs, newest first, without their request payloads (model_id kept)."""
        where, args = ("WHERE owner = ?", (owner,)) if owner is not None else ("", ())
        rows = self.store.connect().execute(
            "SELECT id, kind, owner, status, created_at, started_at, completed_at, error, progress, "
            "CASE WHEN kind = 'training' THEN result END AS result, "  # inference results can be big
            f"json_extract(request, '$.model_id') AS model_id FROM jobs {where} "
            "ORDER BY created_at DESC, rowid DESC LIMIT ?", (*args, int(limit))).fetchall()
        return [_row(row) for row in rows]

    def set_progress(self, job_id: str, progress: dict) -> None:
        """A running job's progress, readable by get() while it runs (training: epochs, loss)."""
        self.store.connect().execute("UPDATE jobs SET progress = ? WHERE id = ?", (json.dumps(progress), job_id))

    def queued_ahead(self, job_id: str) -> int:
        """Queued or running jobs of its kind (its pool) created before this one."""
        return self.store.connect().execute(
            "SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running') AND "
            "kind = (SELECT kind FROM jobs WHERE id = ?1) AND rowid < (SELECT rowid FROM jobs WHERE id = ?1)",
            (job_id,)).fetchone()[0]

    def count(self, status: str) -> int:
        return self.store.connect().execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,)).fetchone()[0]

    def mean_duration(self, kind: str, last: int = 50) -> float | None:
        """Mean seconds from start to completion of the latest completed jobs of a kind."""
        row = self.store.connect().execute(
            "SELECT AVG(completed_at - started_at) FROM (SELECT completed_at, started_at FROM jobs "
            "WHERE kind = ? AND status = 'completed' ORDER BY completed_at DESC LIMIT ?)", (kind, last)).fetchone()
        return row[0]

    # ---- lifecycle ----------------------------------------------------------------------------
    def recover(self) -> None:
        """Jobs a stopped server left running: queue again or fail, by kind."""
        conn = self.store.connect()
        for row in conn.execute("SELECT id, kind FROM jobs WHERE status = 'running'").fetchall():
            kind = self.kinds.get(row["kind"])
            if kind is not None and kind.rerun_on_restart:
                conn.execute("UPDATE jobs SET status = 'queued', started_at = NULL WHERE id = ?", (row["id"],))
            else:
                err = {"code": "INTERNAL_ERROR", "details": {},
                       "message": f"the server stopped while this {row['kind']} job was running; "
                                  f"{row['kind']} jobs are not resumed"}
                conn.execute("UPDATE jobs SET status = 'failed', error = ?, completed_at = ? WHERE id = ?",
                             (json.dumps(err), clock.now(), row["id"]))

    def start(self) -> None:
        self.recover()
        with self._cond:
            self._stop = False
        for kind in list(self.kinds):
            self._start_pool(kind)

    def _start_pool(self, kind: str) -> None:
        for i in range(self.workers_for(kind)):
            t = threading.Thread(target=self._loop, args=(kind,), name=f"msc-jobs-{kind}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stopping(self) -> None:
        """Mark the runner as closing: a rerun_on_restart job cut short now is queued again, not failed."""
        self._stop = True

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=10)
        self._threads.clear()

    # ---- workers ------------------------------------------------------------------------------
    def _claim(self, kind: str) -> dict | None:
        # the worker reads the clock before a concurrent submit may insert the row it then claims:
        # MAX keeps started_at from preceding created_at
        row = self.store.connect().execute(
            "UPDATE jobs SET status = 'running', started_at = MAX(?, created_at) WHERE id = (SELECT id FROM jobs "
            "WHERE status = 'queued' AND kind = ? ORDER BY rowid LIMIT 1) RETURNING *",
            (clock.now(), kind)).fetchone()
        return None if row is None else _row(row)

    def _loop(self, kind: str) -> None:
        try:
            while True:
                with self._cond:
                    if self._stop:
                        return
                job = self._claim(kind)
                if job is None:
                    with self._cond:
                        if not self._stop:
                            self._cond.wait(0.5)
                    continue
                self._execute(job)
        finally:
            self.store.close()  # this thread's connection

    def _execute(self, job: dict) -> None:
        with self._tokens_lock:
            token = self._tokens.setdefault(job["id"], Deadline())
        try:
            self._run(job, token)
        finally:
            with self._tokens_lock:
                self._tokens.pop(job["id"], None)

    def _run(self, job: dict, token: Deadline) -> None:
        conn = self.store.connect()
        try:
            result = self.kinds[job["kind"]].handler(job["request"], token)
        except Cancelled as exc:
            conn.execute("UPDATE jobs SET status = 'cancelled', error = ?, completed_at = ? WHERE id = ?",
                         (json.dumps(error_dict(exc)), clock.now(), job["id"]))
            return
        except BaseException as exc:  # the job fails, the worker lives on
            if self._stop and self.kinds[job["kind"]].rerun_on_restart:  # cut short by close(): run again
                conn.execute("UPDATE jobs SET status = 'queued', started_at = NULL WHERE id = ?", (job["id"],))
                return
            if not isinstance(exc, MSCError):
                log.exception("job %s failed", job["id"])
            conn.execute("UPDATE jobs SET status = 'failed', error = ?, completed_at = ? WHERE id = ?",
                         (json.dumps(error_dict(exc)), clock.now(), job["id"]))
            return
        conn.execute("UPDATE jobs SET status = 'completed', result = ?, completed_at = ? WHERE id = ?",
                     (json.dumps(result), clock.now(), job["id"]))


def _row(row) -> dict:
    job = dict(row)
    for key in ("request", "result", "error", "progress"):
        if job.get(key) is not None:
            job[key] = json.loads(job[key])
    return job
