"""End to end over real HTTP: a waitress server process, the seed's curl and SDK examples, both SDKs."""
import json
import os
import shutil
import socket
import subprocess

import numpy as np
import pytest

from live_server import LiveServer, free_port
from msmartcompute.client import (ConnectionFailedError, InvalidInputDataError, InvalidModelIdError, JobFailedError,
                                  MSmartComputeClient, MSmartComputeError, UnauthorizedError)

ADMIN_KEY = "msc_e2eadmin_" + "s3cret" * 6


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = LiveServer(tmp_path_factory.mktemp("e2e"), env={"MSC_ADMIN_KEY": ADMIN_KEY})
    yield live
    live.stop()


def curl(*args):
    out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", *args], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    body, status = out.rsplit("\n", 1)
    return int(status), json.loads(body)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_seed_curl_examples(server):
    status, body = curl(f"{server.base_url}/health")
    assert status == 200 and body["status"] == "healthy"
    # The seed's load example names a file that does not exist: a clear 400, nothing loaded.
    status, body = curl("-X", "POST", f"{server.base_url}/api/v1/models", "-H", "Content-Type: application/json",
                        "-H", f"Authorization: Bearer {ADMIN_KEY}", "-d", json.dumps({
                            "model_id": "test-model", "model_type": "transformer",
                            "model_path": "/path/to/model.bin", "max_batch_size": 32}))
    assert status == 400 and body["error"]["code"] == "INVALID_INPUT_DATA"
    assert "model_path" in body["error"]["message"]
    client = MSmartComputeClient(server.base_url + "/api/v1", ADMIN_KEY)
    client.load_model({"model_id": "test-model", "model_type": "mlp",
                       "parameters": {"input_size": 3, "hidden_sizes": [4], "output_size": 2}})
    status, body = curl("-X", "POST", f"{server.base_url}/api/v1/inference", "-H", "Content-Type: application/json",
                        "-H", f"Authorization: Bearer {ADMIN_KEY}", "-d", json.dumps({
                            "model_id": "test-model", "input_data": [[0.1, 0.2, 0.3]], "batch_size": 1,
                            "sequence_length": 3}))
    assert status == 200 and body["success"] and np.asarray(body["output_data"]).shape == (1, 2)
    client.unload_model("test-model")


def test_seed_python_example_runs_unchanged(server):
    import requests

    class MSmartComputeClient:  # the seed's example, verbatim
        def __init__(self, base_url, api_key):
            self.base_url = base_url
            self.headers = {"Authorization": f"Bearer {api_key}"}

        def load_model(self, model_config):
            response = requests.post(f"{self.base_url}/models", json=model_config, headers=self.headers)
            return response.json()

        def inference(self, model_id, input_data, options=None):
            request_data = {"model_id": model_id, "input_data": input_data, "options": options or {}}
            response = requests.post(f"{self.base_url}/inference", json=request_data, headers=self.headers)
            return response.json()

    client = MSmartComputeClient(server.base_url + "/api/v1", ADMIN_KEY)
    loaded = client.load_model({"model_id": "gpt-3.5-turbo", "model_type": "mlp",
                                "parameters": {"input_size": 3, "hidden_sizes": [4], "output_size": 3}})
    assert loaded["success"] and loaded["model_id"] == "gpt-3.5-turbo"
    result = client.inference("gpt-3.5-turbo", [[0.1, 0.2, 0.3]])
    assert result["success"] and len(result["output_data"][0]) == 3
    requests.delete(f"{server.base_url}/api/v1/models/gpt-3.5-turbo", headers=client.headers)


def test_python_sdk(server):
    client = MSmartComputeClient(server.base_url + "/api/v1", ADMIN_KEY)
    assert client.health()["status"] == "healthy"
    client.load_model({"model_id": "py-mlp", "model_type": "mlp",
                       "parameters": {"input_size": 2, "hidden_sizes": [3], "output_size": 2}})
    assert client.get_model("py-mlp")["model_type"] == "mlp"
    sync = client.inference("py-mlp", [[1.0, 2.0]])
    job = client.inference_async("py-mlp", [[1.0, 2.0]])
    assert client.wait(job["request_id"], timeout=30)["output_data"] == sync["output_data"]
    assert len(client.batch_inference([{"model_id": "py-mlp", "input_data": [[0.0, 1.0]]}])["results"]) == 1
    session = client.create_session("admin", "py-mlp")
    assert client.get_session(session["session_id"])["user_id"] == "admin"
    client.end_session(session["session_id"])
    assert client.metrics()["total_requests"] > 0
    assert isinstance(client.metrics_history(interval=1), list)
    alloc = client.allocate_resources("admin", 4096, 1, 60)
    assert client.get_allocation(alloc["allocation_id"])["memory_size"] == 4096
    assert alloc["allocation_id"] in [a["allocation_id"] for a in client.list_allocations()]
    client.deallocate_resources(alloc["allocation_id"])
    client.create_virtual_gpu("py-vgpu", 1 << 20, 1)
    assert client.get_virtual_gpu("py-vgpu")["status"] == "active"
    assert "py-vgpu" in [v["virtual_gpu_id"] for v in client.list_virtual_gpus()]
    client.destroy_virtual_gpu("py-vgpu")
    with pytest.raises(InvalidModelIdError) as err:
        client.inference("nope", [[1.0]])
    assert err.value.details["model_id"] == "nope"
    with pytest.raises(InvalidInputDataError):
        client.inference("py-mlp", [[1.0, 2.0, 3.0]])
    with pytest.raises(UnauthorizedError):
        MSmartComputeClient(server.base_url + "/api/v1", "msc_x_wrongwrongwrongwrong").list_models()
    client.unload_model("py-mlp")


def test_python_sdk_keep_alive_numpy_shapes_and_connection_errors(server):
    client = MSmartComputeClient(server.base_url + "/api/v1", ADMIN_KEY)
    client.load_model({"model_id": "ka-mlp", "model_type": "mlp",
                       "parameters": {"input_size": 3, "hidden_sizes": [4], "output_size": 2}})
    local_address = client._local.conn.sock.getsockname()
    rows = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], dtype=np.float32)
    from_numpy = client.inference("ka-mlp", rows, options={"timeout": np.float64(30)})
    from_lists = client.inference("ka-mlp", rows.tolist())
    assert from_numpy["output_data"] == from_lists["output_data"]
    assert client._local.conn.sock.getsockname() == local_address  # one connection for all the calls
    # the fields without the envelope, from every kind of call
    for answer in (from_numpy, client.health(), client.get_model("ka-mlp"), client.unload_model("ka-mlp")):
        assert not {"success", "error", "timestamp"} & set(answer)
    client._local.conn.sock.shutdown(socket.SHUT_RDWR)  # a dropped idle connection: reconnects once
    assert client.health()["status"] == "healthy"
    with pytest.raises(ConnectionFailedError) as failed:
        MSmartComputeClient(f"http://127.0.0.1:{free_port()}/api/v1", timeout=5).health()
    assert isinstance(failed.value, MSmartComputeError) and "cannot reach" in failed.value.message


def test_python_sdk_training_and_optimize(server):
    client = MSmartComputeClient(server.base_url + "/api/v1", ADMIN_KEY)
    client.load_model({"model_id": "py-train", "model_type": "mlp",
                       "parameters": {"input_size": 2, "hidden_sizes": [16], "output_size": 2}})
    x = [[-1.0, -1.0], [-1.2, -0.8], [1.0, 1.0], [0.9, 1.1]] * 4
    y = [0, 0, 1, 1] * 4
    sync = client.train("py-train", x, y, epochs=40, learning_rate=0.05, hyperparameters={"batch_size": 8})
    assert sync["epochs_completed"] == 40 and sync["final_loss"] < sync["loss_history"][0]
    job = client.train_async("py-train", x, y, epochs=10)
    seen = []
    done = client.wait(job["request_id"], timeout=60, kind="training", on_progress=seen.append)
    assert done["status"] == "completed" and done["epochs_completed"] == 10 and seen[-1] == done
    assert client.get_training(job["request_id"])["loss_history"] == done["loss_history"]
    long = client.train_async("py-train", x, y, epochs=10_000, hyperparameters={"batch_size": 1})
    assert client.cancel_training(long["request_id"])["status"] in ("cancelled", "running")  # through the engine
    with pytest.raises(JobFailedError, match="cancelled"):
        client.wait(long["request_id"], timeout=60, kind="training")
    with pytest.raises(InvalidInputDataError) as err:
        client.train("py-train", x, y[:3])
    assert err.value.details["field"] == "labels"
    opt = client.optimize_model("py-train", "quantization", "int8", calibration_data=x)
    assert opt["model_updated"] and opt["accuracy_metric"] == "top1_disagreement"
    assert np.argmax(client.inference("py-train", x)["output_data"], axis=1).tolist() == y
    client.unload_model("py-train")


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node")
def test_js_sdk(server):
    env = {**os.environ, "MSC_BASE_URL": server.base_url, "MSC_API_KEY": ADMIN_KEY}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(["node", "--test", "sdk/js/"], cwd=root, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout and "# pass 4" in result.stdout
