"""The CLI: keys, the open-mode guard, config files with preloaded models, the access log."""
import json
import subprocess
import sys
import urllib.request

from live_server import LiveServer, free_port


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "msmartcompute.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_keys_create_list_revoke(tmp_path):
    created = run_cli("keys", "--state-dir", str(tmp_path), "create", "--user", "dana", "--role", "admin")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("msc_") and "shown only once" in created.stderr
    listed = run_cli("keys", "--state-dir", str(tmp_path), "list")
    key_id = key.split("_")[1]
    assert key_id in listed.stdout and "dana" in listed.stdout and key.split("_", 2)[2] not in listed.stdout
    assert run_cli("keys", "--state-dir", str(tmp_path), "create", "--user", "x", "--role", "root").returncode == 2
    assert run_cli("keys", "--state-dir", str(tmp_path), "revoke", key_id).returncode == 0
    assert run_cli("keys", "--state-dir", str(tmp_path), "revoke", key_id).returncode == 1


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
