"""Shared test set-up. TRITON_INTERPRET must be set before any @triton.jit runs
its decorator, so it is decided here, before the kernel modules are imported."""
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A real `msmartcompute serve` process on a free loopback port."""

    def __init__(self, state_dir, extra_args=(), env=None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.state_dir = state_dir
        env = {**os.environ, **(env or {})}
        env.pop("TRITON_INTERPRET", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "msmartcompute.cli", "serve", "--host", "127.0.0.1",
             "--port", str(self.port), "--state-dir", str(state_dir), *extra_args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.process.stdout.read().decode()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not answer /health within 60 s")

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def live_server(tmp_path):
    server = LiveServer(tmp_path / "state")
    yield server
    server.stop()
