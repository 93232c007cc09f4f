"""The supervisor: `msmartcompute serve [--workers N]`.

It binds the listening socket once (every front inherits it, so the kernel spreads
connections over them), starts the engine process, waits until it is ready, starts N fronts,
then watches them every 0.2 s:
- a front that dies is replaced (the others keep serving meanwhile), and so is a front whose
  loop has not turned for `front_stall_timeout_s` (heartbeat.py: it is killed first);
- an engine that dies is started again; until it is back, fronts answer 503 ENGINE_UNAVAILABLE
  in the envelope; it restores the registry, vGPUs, allocations and jobs from the store, as
  any restart does;
- SIGTERM / SIGINT: the supervisor closes its copy of the listening socket, the fronts drain
  (stop accepting, finish what is in flight) and exit, then the engine stops; exit status 0.
Every child dies with the supervisor (PR_SET_PDEATHSIG), so SIGKILL takes the whole group.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .heartbeat import Heartbeat

log = logging.getLogger("msmartcompute")

POLL_S = 0.2
RESTART_BACKOFF_S = 1.0       # between restarts of a child that keeps dying
STOP_TIMEOUT_S = 45.0         # per group, after SIGTERM (fronts drain for at most 30 s)


def default_workers() -> int:
    return max(2, os.cpu_count() or 2)


class Supervisor:
    def __init__(self, config, child_argv: list[str], workers: int, open_mode: bool):
        self.config = config
        self.workers = workers
        self.listener = socket.create_server((config.host, config.port), backlog=2048)
        self.run_dir = Path(tempfile.mkdtemp(prefix="msc-"))  # short: a Unix socket path is limited to ~107 bytes
        self.pid_file = Path(config.state_dir) / "engine.pid"
        self.listener.set_inheritable(True)
        self.child_argv = [*child_argv, "--engine-address", str(self.run_dir / "engine.sock"),
                           "--pid-file", str(self.pid_file), "--parent", str(os.getpid())]
        if open_mode:
            self.child_argv.append("--open-mode")
        # prometheus_client multiprocess mode: every child writes its instruments' values here
        self.metrics_dir = self.run_dir / "metrics"
        self.metrics_dir.mkdir()
        self.env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
                    # a fatal signal (a crash in torch's, numpy's or greenlet's C code) prints the
                    # child's Python stacks to its stderr, the server's log, from its first line on:
                    # "front 0 exited (status -11)" alone does not say where
                    "PYTHONFAULTHANDLER": "1"}
        self.engine: subprocess.Popen | None = None
        self.fronts: list[subprocess.Popen | None] = [None] * workers
        self.beats: list[Heartbeat | None] = [None] * workers
        self.stopping = threading.Event()

    def _spawn(self, module: str, *extra: str, pass_fds=()) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", f"msmartcompute.serving.{module}", *self.child_argv, *extra],
                                pass_fds=pass_fds, env=self.env)

    def _gone(self, child: subprocess.Popen) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(child.pid, str(self.metrics_dir))  # its live gauges stop counting

    def _start_engine(self) -> None:
        self.pid_file.unlink(missing_ok=True)
        self.engine = self._spawn("engine_main")
        log.info("engine process started (pid %d)", self.engine.pid)

    def _start_front(self, i: int) -> None:
        fd = self.listener.fileno()
        beat = self.run_dir / f"front-{i}.beat"
        if self.beats[i] is not None:
            self.beats[i].close()
        self.beats[i] = Heartbeat(beat, reset=True)
        self.fronts[i] = self._spawn("front", "--listen-fd", str(fd), "--heartbeat", str(beat), pass_fds=(fd,))
        log.info("front %d started (pid %d)", i, self.fronts[i].pid)

    def _kill_stalled_fronts(self) -> None:
        limit = self.config.front_stall_timeout_s
        for i, front in enumerate(self.fronts):
            if front.poll() is None and self.beats[i].age() > limit:
                log.error("front %d (pid %d) has not turned its loop for %.0f s (a request wedged in it): "
                          "killing it", i, front.pid, self.beats[i].age())
                front.kill()
                front.wait()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.stopping.set())
        try:
            self._start_engine()
            while not self.pid_file.exists() and not self.stopping.is_set():  # restoring state first
                if self.engine.poll() is not None:
                    log.error("the engine process exited with status %s while starting", self.engine.returncode)
                    return 1
                time.sleep(POLL_S / 4)
            for i in range(self.workers):
                self._start_front(i)
            log.info("serving on http://%s:%d with %d front processes and one engine (state dir %s)",
                     self.config.host, self.config.port, self.workers, Path(self.config.state_dir).resolve())
            last_restart = 0.0
            while not self.stopping.wait(POLL_S):
                if time.monotonic() - last_restart < RESTART_BACKOFF_S:
                    continue
                if self.engine.poll() is not None:
                    log.error("the engine process exited (status %s): restarting it; fronts answer 503 meanwhile",
                              self.engine.returncode)
                    self._gone(self.engine)
                    self._start_engine()
                    last_restart = time.monotonic()
                self._kill_stalled_fronts()
                for i, front in enumerate(self.fronts):
                    if front.poll() is not None:
                        log.error("front %d exited (status %s): replacing it", i, front.returncode)
                        self._gone(front)
                        self._start_front(i)
                        last_restart = time.monotonic()
            log.info("stopping: no new connections; draining in-flight requests")
            self.listener.close()
            self._stop([f for f in self.fronts if f is not None])
            self._stop([self.engine])
        finally:
            for child in [self.engine, *self.fronts]:
                if child is not None and child.poll() is None:
                    child.kill()
                    child.wait()
            self.listener.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)
        log.info("stopped")
        return 0

    @staticmethod
    def _stop(children: list[subprocess.Popen]) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not stop in time: killing it", child.pid)
                child.kill()
                child.wait()
