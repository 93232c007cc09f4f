"""The CLI: keys, the open-mode guard, config files with preloaded models, the access log,
one-line messages for common mistakes."""
import json
import os
import socket
import subprocess
import sys
import urllib.request

import pytest
from live_server import LiveServer, free_port

import msmartcompute


def run_cli(*args, timeout=60, env=None, module="msmartcompute.cli"):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_keys_create_list_revoke(tmp_path):
    created = run_cli("keys", "--state-dir", str(tmp_path), "create", "--user", "dana", "--role", "admin")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("msc_") and "shown only once" in created.stderr
    listed = run_cli("keys", "--state-dir", str(tmp_path), "list")
    key_id = key.split("_")[1]
    assert key_id in listed.stdout and "dana" in listed.stdout and key.split("_", 2)[2] not in listed.stdout
    assert run_cli("keys", "--state-dir", str(tmp_path), "create", "--user", "x", "--role", "root").returncode == 2
    revoked = run_cli("keys", "--state-dir", str(tmp_path), "revoke", key_id)
    assert revoked.returncode == 0 and revoked.stdout.strip() == f"revoked admin key {key_id} of user dana"
    again = run_cli("keys", "--state-dir", str(tmp_path), "revoke", key_id)
    assert again.returncode == 1 and again.stderr == f"msmartcompute: error: no key with id {key_id}\n"


def test_keys_revoke_accepts_the_whole_key_and_options_after_the_subcommand(tmp_path):
    key = run_cli("--state-dir", str(tmp_path), "keys", "create", "--user", "eve@lab").stdout.strip()
    listed = run_cli("keys", "list", "--state-dir", str(tmp_path))
    assert key.split("_")[1] in listed.stdout and "eve@lab" in listed.stdout
    revoked = run_cli("keys", "revoke", key, "--state-dir", str(tmp_path))
    assert revoked.returncode == 0 and "of user eve@lab" in revoked.stdout
    assert run_cli("keys", "list", "--state-dir", str(tmp_path)).stdout == ""


def test_keys_list_creates_no_state_dir_and_create_checks_the_user_id(tmp_path):
    state = tmp_path / "not-yet"
    listed = run_cli("keys", "list", "--state-dir", str(state))
    assert listed.returncode == 0 and listed.stdout == "" and "no store" in listed.stderr
    assert not state.exists()
    bad = run_cli("keys", "create", "--user", "has space", "--state-dir", str(state))
    assert bad.returncode == 2 and "--user must be" in bad.stderr and "'has space'" in bad.stderr
    assert not state.exists()


def test_version_and_python_dash_m():
    for module in ("msmartcompute", "msmartcompute.cli"):
        result = run_cli("--version", module=module)
        assert result.returncode == 0 and result.stdout.strip() == f"msmartcompute {msmartcompute.__version__}"
    assert "serve" in run_cli("--help", module="msmartcompute").stdout


def _one_line_error(result, *fragments):
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("msmartcompute: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("case", ["missing", "syntax", "value", "section"])
def test_bad_config_is_one_line(tmp_path, case):
    config = tmp_path / "server.json"
    text = {"syntax": '{"server": ', "value": '{"server": {"port": "eighty"}}', "section": '{"server": 8080}'}
    if case in text:
        config.write_text(text[case])
    expected = {"missing": "No such file", "syntax": "Expecting value", "value": "port must be an integer",
                "section": "expected tables"}[case]
    _one_line_error(run_cli("serve", "--config", str(config), "--state-dir", str(tmp_path)), expected)
    _one_line_error(run_cli("--config", str(config), "keys", "list"), expected)


def test_bad_environment_and_admin_key_are_one_line(tmp_path):
    _one_line_error(run_cli("serve", "--state-dir", str(tmp_path), env={"MSC_PORT": "x"}), "MSC_PORT")
    _one_line_error(run_cli("serve", "--state-dir", str(tmp_path), "--port", str(free_port()),
                            env={"MSC_ADMIN_KEY": "secret"}), "MSC_ADMIN_KEY", "msc_<id>_<secret")


def test_port_in_use_is_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--state-dir", str(tmp_path), "--port", str(port))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == f"msmartcompute: error: cannot listen on 127.0.0.1:{port}: " \
                                             "Address already in use"


def test_train_with_no_server_is_one_line(tmp_path):
    request = tmp_path / "request.json"
    request.write_text("{}")
    _one_line_error(run_cli("train", "--url", f"http://127.0.0.1:{free_port()}", "--file", str(request)),
                    "cannot reach", "is `msmartcompute serve` running")


def test_train_reads_the_key_from_msc_api_key(tmp_path):
    key = "msc_trainer_" + "t" * 32
    server = LiveServer(tmp_path / "state", env={"MSC_ADMIN_KEY": key})
    try:
        request = tmp_path / "request.json"
        request.write_text(json.dumps({"model_id": "absent", "training_data": [[0.0]], "labels": [0]}))
        args = ("train", "--url", server.base_url, "--file", str(request))
        _one_line_error(run_cli(*args), "UNAUTHORIZED", "set MSC_API_KEY")
        _one_line_error(run_cli(*args, env={"MSC_API_KEY": key}), "INVALID_MODEL_ID")  # authenticated
    finally:
        server.stop()


def test_refuses_open_server_off_loopback(tmp_path):
    result = run_cli("serve", "--host", "0.0.0.0", "--port", str(free_port()), "--state-dir", str(tmp_path))
    assert result.returncode == 2
    assert "refusing to serve on 0.0.0.0 with no API keys" in result.stderr


def test_config_file_preloads_models_and_logs_requests(tmp_path):
    key = "msc_cfgadmin_" + "k" * 32
    config = tmp_path / "server.json"
    config.write_text(json.dumps({
        "security": {"api_keys": [{"key": key, "user_id": "ops", "role": "admin"}]},
        "inference": {"max_queue_delay_ms": 2},
        "models": [{"model_id": "preloaded", "model_type": "mlp",
                    "parameters": {"input_size": 2, "hidden_sizes": [2], "output_size": 1}}],
    }))
    server = LiveServer(tmp_path / "state", extra_args=["--config", str(config)])
    try:
        request = urllib.request.Request(server.base_url + "/api/v1/models",
                                         headers={"Authorization": f"Bearer {key}", "X-Request-ID": "trace-42"})
        with urllib.request.urlopen(request, timeout=10) as r:
            assert [m["model_id"] for m in json.load(r)["models"]] == ["preloaded"]
            assert r.headers["X-Request-ID"] == "trace-42"
    finally:
        server.stop()
    log = server.process.stdout.read().decode()
    assert "GET /api/v1/models 200" in log and "trace-42" in log
    assert key.split("_", 2)[2] not in log  # keys never reach the log


def test_train_command_with_progress_bar(tmp_path, live_server):
    from msmartcompute.client import MSmartComputeClient

    MSmartComputeClient(live_server.base_url + "/api/v1").load_model(
        {"model_id": "cli-mlp", "model_type": "mlp", "parameters": {"input_size": 2, "hidden_sizes": [4],
                                                                   "output_size": 2}})
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"model_id": "cli-mlp", "training_data": [[0, 1], [1, 0]], "labels": [0, 1],
                                   "epochs": 5}))
    done = run_cli("train", "--url", live_server.base_url, "--file", str(request), "--async")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "completed" and len(result["loss_history"]) == 5
    assert "[" + "#" * 30 + "] 5/5 epochs" in done.stderr and "queued req_" in done.stderr
    sync = run_cli("train", "--url", live_server.base_url, "--file", str(request))
    assert sync.returncode == 0 and json.loads(sync.stdout)["epochs_completed"] == 5
    request.write_text(json.dumps({"model_id": "cli-mlp", "training_data": [[0, 1]], "labels": [0, 1]}))
    bad = run_cli("train", "--url", live_server.base_url, "--file", str(request))
    assert bad.returncode == 1 and "INVALID_INPUT_DATA" in bad.stderr and "labels" in bad.stderr
