"""Start and stop TorchServe serving a benchmark MLP (batch_size 8, max_batch_delay 5 ms,
token auth off, logging WARN), for the load benchmark. Needs `torchserve` and
`torch-model-archiver` on PATH next to the interpreter, and Java 17."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent

LOG4J = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders><Console name="STDOUT" target="SYSTEM_OUT"><PatternLayout pattern="%d %p %m%n"/></Console></Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="warn" additivity="false"><AppenderRef ref="STDOUT"/></Logger>
    <Logger name="MODEL_LOG" level="warn" additivity="false"><AppenderRef ref="STDOUT"/></Logger>
    <Logger name="TS_METRICS" level="warn" additivity="false"><AppenderRef ref="STDOUT"/></Logger>
    <Logger name="MODEL_METRICS" level="warn" additivity="false"><AppenderRef ref="STDOUT"/></Logger>
    <Root level="warn"><AppenderRef ref="STDOUT"/></Root>
  </Loggers>
</Configuration>
"""


def available() -> str | None:
    """None when TorchServe can run here, else why not."""
    if not (BIN / "torchserve").exists() or not (BIN / "torch-model-archiver").exists():
        return "torchserve / torch-model-archiver are not installed in this environment"
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        return "no java on PATH (TorchServe's frontend needs Java 17)"
    return None


class TorchServe:
    def __init__(self, name: str, weights: Path, workdir: Path, port: int, management_port: int,
                 metrics_port: int, batch_size: int = 8, max_batch_delay_ms: int = 5, workers: int | None = None):
        self.name, self.port = name, port
        self.workdir = Path(workdir)
        store = self.workdir / "model-store"
        store.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(BIN / "torch-model-archiver"), "--model-name", name, "--version", "1.0",
                        "--handler", str(HERE / "torchserve_handler.py"),
                        "--extra-files", f"{HERE / 'model.py'},{weights}",
                        "--export-path", str(store), "--force"], check=True)
        (self.workdir / "log4j2.xml").write_text(LOG4J)
        model = {"defaultVersion": True, "marName": f"{name}.mar", "batchSize": batch_size,
                 "maxBatchDelay": max_batch_delay_ms, "responseTimeout": 120}
        if workers:
            model.update(minWorkers=workers, maxWorkers=workers)
        props = {
            "inference_address": f"http://127.0.0.1:{port}",
            "management_address": f"http://127.0.0.1:{management_port}",
            "metrics_address": f"http://127.0.0.1:{metrics_port}",
            "model_store": str(store),
            "load_models": f"{name}.mar",
            "models": json.dumps({name: {"1.0": model}}),
            "disable_token_authorization": "true",
            "enable_envvars_config": "false",
            "disable_system_metrics": "true",
            "install_py_dep_per_model": "false",
        }
        (self.workdir / "config.properties").write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               "LOG_LOCATION": str(self.workdir / "logs"), "METRICS_LOCATION": str(self.workdir / "logs")}
        env.pop("TRITON_INTERPRET", None)
        self.log_path = self.workdir / "torchserve.out"  # as targets.Process: run.py shows it when a load fails
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [str(BIN / "torchserve"), "--start", "--foreground", "--ncs", "--disable-token-auth",
             "--model-store", str(store), "--ts-config", str(self.workdir / "config.properties"),
             "--log-config", str(self.workdir / "log4j2.xml")],
            cwd=self.workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(180)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.port}/ping"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"torchserve exited early: see {self.log_path}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if json.loads(r.read()).get("status") == "Healthy":
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"torchserve not healthy within {timeout_s:.0f} s: see {self.log_path}")

    def pause(self, paused: bool) -> None:
        """SIGSTOP / SIGCONT the frontend and its workers (see targets.Process.pause)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGCONT)
            os.killpg(self.process.pid, signal.SIGTERM)  # its own session: the java frontend and its workers
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()
