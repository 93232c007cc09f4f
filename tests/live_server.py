"""A real `msmartcompute serve` process on a free loopback port, for end-to-end tests."""
import os
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A real `msmartcompute serve` process (the supervisor of an engine process and front
    processes) on a free loopback port."""

    def __init__(self, state_dir, extra_args=(), env=None, log_file=None):
        """log_file: a path for the server's output; by default it goes to a pipe that is
        read after stop() (a chatty server can fill that pipe and block while running)."""
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.state_dir = state_dir
        env = {**os.environ, **(env or {})}
        env.pop("TRITON_INTERPRET", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "msmartcompute.cli", "serve", "--host", "127.0.0.1",
             "--port", str(self.port), "--state-dir", str(state_dir), *extra_args],
            stdout=open(log_file, "wb") if log_file else subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)  # its own process group: the supervisor, its engine and its fronts
        self.engine_pid_file = os.path.join(str(state_dir), "engine.pid")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = open(log_file).read() if log_file else self.process.stdout.read().decode()
                raise RuntimeError(f"server exited early:\n{output}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not answer /health within 60 s")

    def engine_pid(self) -> int:
        with open(self.engine_pid_file) as f:
            return int(f.read())

    def children(self) -> list[int]:
        """The supervisor's child processes (engine and fronts)."""
        path = f"/proc/{self.process.pid}/task/{self.process.pid}/children"
        with open(path) as f:
            return [int(p) for p in f.read().split()]

    def kill_group(self):
        """SIGKILL to the whole process group, as a crash of the machine's session would."""
        os.killpg(self.process.pid, 9)
        self.process.wait(timeout=10)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
