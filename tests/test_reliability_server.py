"""The server process against a careless operator: one server per state dir, a damaged
store refused at start, backup and restore."""
import stat
import subprocess
import sys

from live_server import LiveServer, free_port
from msmartcompute.runtime.store import STORE_FILENAME
from reliability_helpers import http, quiet_env

MLP = {"model_id": "m", "model_type": "mlp", "parameters": {"input_size": 2, "hidden_sizes": [2], "output_size": 1}}


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "msmartcompute.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_a_second_server_on_a_live_state_dir_refuses_before_reading_anything(tmp_path):
    state = tmp_path / "state"
    server = LiveServer(state, env=quiet_env())
    try:
        assert http(server.base_url, "POST", "/api/v1/models", MLP)[0] == 200
        second = run_cli("serve", "--port", str(free_port()), "--state-dir", str(state))
        assert second.returncode == 2
        assert f"in use by pid {server.process.pid}" in second.stderr
        assert "serving on" not in second.stderr and "loaded" not in second.stderr
        assert http(server.base_url, "GET", "/api/v1/models")[1]["models"][0]["model_id"] == "m"
        assert stat.S_IMODE((state / "lock").stat().st_mode) == 0o600
    finally:
        server.stop()


def test_a_damaged_store_stops_serve_and_a_backup_brings_it_back(tmp_path):
    state = tmp_path / "state"
    key = run_cli("keys", "--state-dir", str(state), "create", "--user", "ops", "--role", "admin").stdout.strip()
    backup = tmp_path / "backup.sqlite3"
    done = run_cli("store", "--state-dir", str(state), "backup", str(backup))
    assert done.returncode == 0, done.stderr
    (state / STORE_FILENAME).write_bytes(b"")  # truncated to 0 bytes
    refused = run_cli("serve", "--port", str(free_port()), "--state-dir", str(state))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "is empty (0 bytes)" in refused.stderr and "msmartcompute store restore" in refused.stderr
    assert run_cli("keys", "--state-dir", str(state), "list").returncode == 2  # nothing starts on it

    restored = run_cli("store", "--state-dir", str(state), "restore", str(backup))
    assert restored.returncode == 0, restored.stderr
    server = LiveServer(state, env=quiet_env())
    try:
        assert http(server.base_url, "GET", "/api/v1/models")[0] == 401  # the keys are back: closed
        assert http(server.base_url, "GET", "/api/v1/models", key=key)[0] == 200
        busy = run_cli("store", "--state-dir", str(state), "restore", str(backup))
        assert busy.returncode == 2 and "in use by pid" in busy.stderr  # never under a live server
    finally:
        server.stop()


def test_the_first_key_created_by_the_cli_closes_a_running_open_server(tmp_path):
    state = tmp_path / "state"
    server = LiveServer(state, env=quiet_env())
    try:
        assert http(server.base_url, "GET", "/api/v1/models")[0] == 200  # open on loopback
        key = run_cli("keys", "--state-dir", str(state), "create", "--user", "u", "--role", "user").stdout.strip()
        assert http(server.base_url, "GET", "/api/v1/models")[0] == 401
        assert http(server.base_url, "POST", "/api/v1/models", MLP, key=key)[0] == 403
    finally:
        server.stop()
