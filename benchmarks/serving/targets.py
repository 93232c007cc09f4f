"""The servers under load, each started as its own process on a free loopback port and stopped after."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson

from .loadgen import Target

REPO = Path(__file__).resolve().parents[2]
BENCH_KEY = "msc_benchkey_" + "s" * 32   # a bootstrap admin key registered through the config file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(repo: Path = REPO) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    return env


def _wait_http(process: subprocess.Popen, url: str, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not answer {url} within {timeout_s:.0f} s")


def session_cpu_s(sid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of session `sid` (Linux):
    a server's own cost per request, which other load on the machine does not inflate."""
    return sum(session_cpu_by_role(sid).values())


def machine_idle() -> tuple[int, int]:
    """(idle, total) clock ticks of every CPU of the machine so far (Linux /proc/stat; idle
    includes iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return ticks[3] + ticks[4], sum(ticks)


def _role(cmdline: bytes, comm: str) -> str:
    """What a server process is, for the CPU split: our engine / fronts / supervisor, TorchServe's
    Java frontend / Python workers, else its command name."""
    for needle, role in ((b"serving.engine_main", "engine"), (b"serving.front", "fronts"),
                         (b"model_service_worker", "python workers"), (b"msmartcompute.cli", "supervisor")):
        if needle in cmdline:
            return role
    return "java frontend" if comm == "java" else comm


def session_cpu_by_role(sid: int) -> dict[str, float]:
    """session_cpu_s split by _role (the fronts of one server summed)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid:       # field 6 (session), counted after the ")" of the name
            role = _role(cmdline, stat[stat.index("(") + 1:stat.rindex(")")])
            out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


class Process:
    """A server process in its own session (so stop() ends it and anything it started)."""

    def __init__(self, argv: list[str], workdir: Path, health_url: str, repo: Path = REPO):
        """repo: the source tree the server runs from (another checkout for a baseline)."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "server.out"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(argv, cwd=repo, env=_env(repo), stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        try:
            _wait_http(self.process, health_url, 90, self.log_path)
        except BaseException:
            self.stop()
            raise

    def pause(self, paused: bool) -> None:
        """Freeze (SIGSTOP) or resume the whole server while another target is measured, so an
        idle server's background work does not take CPU from the one under load."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGCONT)
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


def ours(name: str, spec: dict, state_dir: Path, runtime: dict,
         extra_args: tuple = (), repo: Path = REPO) -> tuple[Process, Target]:
    """`msmartcompute serve` with auth and rate limiting on (one admin key with a high limit),
    logging at WARNING, the model preloaded from the config file."""
    port = free_port()
    config = {
        "server": {"log_level": "WARNING"},
        "security": {"api_keys": [{"key": BENCH_KEY, "user_id": "bench", "role": "admin"}],
                     "rate_limit_enabled": True, "rate_limit_per_minute": 100_000_000,
                     "rate_limit_burst": 10_000_000},
        "inference": runtime,
        "models": [spec],
    }
    state_dir.mkdir(parents=True, exist_ok=True)
    cfg = state_dir / "config.json"
    cfg.write_text(json.dumps(config))
    proc = Process([sys.executable, "-m", "msmartcompute.cli", "serve", "--config", str(cfg), "--port", str(port),
                    "--state-dir", str(state_dir), *extra_args], state_dir, f"http://127.0.0.1:{port}/health",
                   repo)
    model_id = spec["model_id"]
    prefix = b'{"model_id":"' + model_id.encode() + b'","input_data":'
    target = Target(name, "127.0.0.1", port, "/api/v1/inference",
                    encode=lambda x: prefix + orjson.dumps(x, option=orjson.OPT_SERIALIZE_NUMPY) + b"}",
                    decode=lambda b: orjson.loads(b)["output_data"],
                    headers={"Authorization": f"Bearer {BENCH_KEY}"})
    return proc, target


def bare(name: str, model: str, weights: Path, workdir: Path, threads: int = 8) -> tuple[Process, Target]:
    port = free_port()
    proc = Process([sys.executable, "-m", "benchmarks.serving.bare_app", "--model", model, "--weights", str(weights),
                    "--port", str(port), "--threads", str(threads)], workdir, f"http://127.0.0.1:{port}/health")
    target = Target(name, "127.0.0.1", port, "/predict",
                    encode=lambda x: b'{"input_data":' + orjson.dumps(x, option=orjson.OPT_SERIALIZE_NUMPY) + b"}",
                    decode=lambda b: orjson.loads(b)["output_data"])
    return proc, target


def torchserve(name: str, model: str, weights: Path, workdir: Path):
    from .torchserve_target import TorchServe

    port = free_port()
    ts = TorchServe(model, weights, workdir, port, free_port(), free_port())
    target = Target(name, "127.0.0.1", port, f"/predictions/{model}",
                    encode=lambda x: b'{"input_data":' + orjson.dumps(x, option=orjson.OPT_SERIALIZE_NUMPY) + b"}",
                    decode=lambda b: orjson.loads(b)["output_data"])
    return ts, target
