"""Every route and every error code through falcon.testing.TestClient over a real Runtime."""
import time

import numpy as np
import pytest
import torch

from api_helpers import MLP_SPEC, Api, assert_error, assert_ok, make_runtime


@pytest.fixture
def api(tmp_path):
    runtime = make_runtime(tmp_path / "state")
    yield Api(runtime)
    runtime.close()


@pytest.fixture
def loaded(api):
    assert_ok(api.post("/api/v1/models", MLP_SPEC), "model_id", "message", "memory_allocated", "load_time")
    return api


def test_models_lifecycle(api):
    body = assert_ok(api.post("/api/v1/models", MLP_SPEC))
    assert body["model_id"] == "mlp-small"
    expected_bytes = (4 * 8 + 8 + 8 * 3 + 3) * 4  # float32 weights and biases
    assert body["memory_allocated"] == expected_bytes
    assert body["load_time"] >= 0
    models = assert_ok(api.get("/api/v1/models"), "models")["models"]
    assert [m["model_id"] for m in models] == ["mlp-small"]
    assert models[0]["model_type"] == "mlp" and models[0]["status"] == "loaded"
    assert models[0]["memory_usage"] == expected_bytes
    assert assert_ok(api.get("/api/v1/models/mlp-small"))["model_type"] == "mlp"
    assert_error(api.post("/api/v1/models", MLP_SPEC), 409, "MODEL_ALREADY_LOADED")
    assert assert_ok(api.delete("/api/v1/models/mlp-small"))["model_id"] == "mlp-small"
    error = assert_error(api.delete("/api/v1/models/mlp-small"), 404, "INVALID_MODEL_ID")
    assert error["details"]["model_id"] == "mlp-small" and error["details"]["available_models"] == []


def test_inference_matches_a_users_checkpoint(api):
    # A plain nn.Sequential checkpoint, as a user brings it, placed under the model root.
    from safetensors.torch import save_file

    torch.manual_seed(1)
    reference = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    root = api.runtime.state_dir / "models"
    root.mkdir(parents=True, exist_ok=True)
    save_file(reference.state_dict(), str(root / "mlp.safetensors"))
    assert_ok(api.post("/api/v1/models", dict(MLP_SPEC, model_path=str(root / "mlp.safetensors"))))
    rows = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    body = assert_ok(api.post("/api/v1/inference", {"model_id": "mlp-small", "input_data": rows.tolist(),
                                                     "batch_size": 3, "sequence_length": 4}),
                     "request_id", "output_data", "inference_time", "tokens_generated", "memory_used")
    assert body["request_id"].startswith("req_")
    with torch.no_grad():
        expected = reference(torch.from_numpy(rows)).numpy()
    np.testing.assert_allclose(np.asarray(body["output_data"]), expected, rtol=1e-5, atol=1e-6)
    assert body["tokens_generated"] == 0 and body["inference_time"] >= 0


def test_model_path_outside_the_roots_is_refused(api):
    error = assert_error(api.post("/api/v1/models", dict(MLP_SPEC, model_path="/etc/passwd")), 400,
                         "INVALID_INPUT_DATA")
    assert "model_path" in error["message"]


@pytest.mark.parametrize("body,field", [
    ({"model_id": "mlp-small"}, "body.input_data"),
    ({"model_id": "mlp-small", "input_data": [[1, 2, 3, 4], [1, 2]]}, "body.input_data"),
    ({"model_id": "mlp-small", "input_data": [[1, 2, 3, 4]], "batch_size": 2}, "body.batch_size"),
    ({"model_id": "mlp-small", "input_data": [[1, 2, 3, 4]] * 17, "sequence_length": 2 ** 20},
     "body.sequence_length"),
    ({"model_id": "mlp-small", "input_data": [[1, 2, 3, 4]], "options": {"temperature": -1}},
     "body.options.temperature"),
    ({"model_id": 5, "input_data": [[1.0]]}, "body.model_id"),
])
def test_inference_validation_names_the_field(loaded, body, field):
    error = assert_error(loaded.post("/api/v1/inference", body), 400, "INVALID_INPUT_DATA")
    assert error["details"]["field"] == field


def test_sequence_length_pads_and_truncates_rows(loaded):
    def infer(rows, **fields):
        return assert_ok(loaded.post("/api/v1/inference", {"model_id": "mlp-small", "input_data": rows,
                                                           **fields}), "output_data")["output_data"]

    assert infer([[1, 2]], sequence_length=4) == infer([[1, 2, 0, 0]])
    assert infer([[1, 2, 3, 4, 5, 6]], sequence_length=4) == infer([[1, 2, 3, 4]])
    ragged = infer([[0.5], [1, 2, 3, 4, 5]], sequence_length=4, batch_size=2)  # rows may differ in length
    assert ragged == infer([[0.5, 0, 0, 0], [1, 2, 3, 4]])


def test_transformer_takes_integral_floats_as_token_ids(loaded):
    assert_ok(loaded.post("/api/v1/models", {"model_id": "lm", "model_type": "transformer", "parameters": {
        "vocab_size": 50, "hidden_size": 16, "num_layers": 1, "num_heads": 2}}))
    body = {"model_id": "lm", "input_data": [[1.0, 2.0]], "options": {"max_tokens": 3, "temperature": 0}}
    as_floats = assert_ok(loaded.post("/api/v1/inference", body), "output_data")["output_data"]
    as_ints = assert_ok(loaded.post("/api/v1/inference", {**body, "input_data": [[1, 2]]}))["output_data"]
    assert as_floats == as_ints and len(as_floats[0]) == 3
    # the seed's own example rows are float features: the error says what to send instead
    error = assert_error(loaded.post("/api/v1/inference", {"model_id": "lm", "input_data": [[0.1, 0.2, 0.3]]}),
                         400, "INVALID_INPUT_DATA")
    assert "token ids" in error["message"] and "got 0.1 at row 0, column 0" in error["message"]
    assert "mlp" in error["message"]


def test_inference_wrong_width_and_unknown_model(loaded):
    assert_error(loaded.post("/api/v1/inference", {"model_id": "mlp-small", "input_data": [[1.0, 2.0]]}),
                 400, "INVALID_INPUT_DATA")
    error = assert_error(loaded.post("/api/v1/inference", {"model_id": "nope", "input_data": [[1.0]]}),
                         404, "INVALID_MODEL_ID")
    assert error["details"]["available_models"] == ["mlp-small"]


def test_malformed_json_and_wrong_content(loaded):
    r = loaded.client.simulate_post("/api/v1/inference", body="{not json",
                                    headers={"Content-Type": "application/json"})
    assert_error(r, 400, "INVALID_INPUT_DATA")
    r = loaded.client.simulate_post("/api/v1/inference", body="", headers={"Content-Type": "application/json"})
    assert_error(r, 400, "INVALID_INPUT_DATA")
    assert_error(loaded.post("/api/v1/inference", [1, 2]), 400, "INVALID_INPUT_DATA")


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data"])
def test_a_body_that_is_not_json_gets_415_naming_the_header(loaded, content_type):
    body = '{"model_id": "mlp-small", "input_data": [[1, 2, 3, 4]]}'  # curl -d without -H sends a form type
    r = loaded.client.simulate_post("/api/v1/inference", body=body, headers={"Content-Type": content_type})
    error = assert_error(r, 415, "INVALID_INPUT_DATA")
    assert content_type in error["message"] and "Content-Type: application/json" in error["message"]
    assert "required" not in error["message"]
    # with no Content-Type at all the body is read as JSON
    assert loaded.client.simulate_post("/api/v1/inference", body=body).status_code == 200


def test_too_large_body(tmp_path):
    from msmartcompute.api.app import ApiConfig, create_app
    import falcon.testing

    runtime = make_runtime(tmp_path / "s")
    client = falcon.testing.TestClient(create_app(runtime, ApiConfig(max_body_bytes=100)))
    r = client.simulate_post("/api/v1/inference", json={"model_id": "m", "input_data": [[0.5] * 100]})
    assert_error(r, 413, "INVALID_INPUT_DATA")
    runtime.close()


def test_async_inference(loaded):
    rows = [[0.1, 0.2, 0.3, 0.4]]
    queued = assert_ok(loaded.post("/api/v1/inference/async", {"model_id": "mlp-small", "input_data": rows}),
                       "request_id", "status", "estimated_completion")
    assert queued["status"] in ("queued", "running", "completed")
    deadline = time.monotonic() + 30
    while True:
        result = assert_ok(loaded.get(f"/api/v1/inference/{queued['request_id']}"))
        if result["status"] == "completed" or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert result["status"] == "completed"
    sync = assert_ok(loaded.post("/api/v1/inference", {"model_id": "mlp-small", "input_data": rows}))
    np.testing.assert_allclose(result["output_data"], sync["output_data"], rtol=1e-6)
    assert result["completion_time"].endswith("Z") and result["inference_time"] >= 0
    assert_error(loaded.get("/api/v1/inference/req_0_404"), 404, "NOT_FOUND")


def test_batch_inference(loaded):
    body = assert_ok(loaded.post("/api/v1/inference/batch", {"requests": [
        {"model_id": "mlp-small", "input_data": [[0.1, 0.2, 0.3, 0.4]], "options": {"temperature": 0.7}},
        {"model_id": "mlp-small", "input_data": [[0.4, 0.5, 0.6, 0.7], [1, 1, 1, 1]]},
        {"model_id": "missing", "input_data": [[1.0]]},
    ]}), "results", "total_time")
    results = body["results"]
    assert len(results) == 3
    assert np.asarray(results[0]["output_data"]).shape == (1, 3)
    assert np.asarray(results[1]["output_data"]).shape == (2, 3)
    assert results[2]["error"]["code"] == "INVALID_MODEL_ID"
    assert_error(loaded.post("/api/v1/inference/batch", {"requests": []}), 400, "INVALID_INPUT_DATA")


def test_sessions(loaded):
    session = assert_ok(loaded.post("/api/v1/sessions", {"user_id": "user123", "model_id": "mlp-small"}),
                        "session_id", "user_id", "model_id", "created_at", "expires_at")
    assert session["session_id"].startswith("user123_")
    assert assert_ok(loaded.get(f"/api/v1/sessions/{session['session_id']}"))["model_id"] == "mlp-small"
    assert assert_ok(loaded.delete(f"/api/v1/sessions/{session['session_id']}"))["message"]
    assert_error(loaded.get(f"/api/v1/sessions/{session['session_id']}"), 404, "NOT_FOUND")
    assert_error(loaded.post("/api/v1/sessions", {"user_id": "u", "model_id": "nope"}), 404, "INVALID_MODEL_ID")


def test_metrics(loaded):
    loaded.post("/api/v1/inference", {"model_id": "mlp-small", "input_data": [[1, 2, 3, 4]]})
    metrics = assert_ok(loaded.get("/api/v1/metrics"), "metrics")["metrics"]
    for name in ("gpu_utilization", "memory_utilization", "temperature", "power_usage", "throughput", "latency",
                 "active_requests", "queued_requests", "total_requests", "successful_requests",
                 "failed_requests"):
        assert name in metrics
    assert metrics["total_requests"] >= 1
    if not torch.cuda.is_available():
        assert metrics["gpu_utilization"] is None and metrics["temperature"] is None
    history = assert_ok(loaded.get("/api/v1/metrics/history", params={"interval": "1"}), "history")["history"]
    assert isinstance(history, list)
    assert_error(loaded.get("/api/v1/metrics/history", params={"interval": "zero"}), 400, "INVALID_INPUT_DATA")
    assert_error(loaded.get("/api/v1/metrics/history", params={"start_time": "yesterday"}), 400,
                 "INVALID_INPUT_DATA")
    prom = loaded.get("/metrics")
    assert prom.status_code == 200 and "msmartcompute_requests_total" in prom.text


def test_metrics_per_model_and_devices(loaded):
    for _ in range(3):
        assert_ok(loaded.post("/api/v1/inference", {"model_id": "mlp-small", "input_data": [[1, 2, 3, 4]] * 2}))
    metrics = assert_ok(loaded.get("/api/v1/metrics"))["metrics"]
    model = metrics["models"]["mlp-small"]
    assert model["requests_per_second"] > 0 and sum(model["batch_sizes"].values()) >= 1
    assert 0 < model["latency_p50"] <= model["latency_p99"] and model["queue_depth"] == 0
    device = metrics["devices"][0]
    assert device["index"] == 0 and 0 < device["memory_unreserved"] <= device["memory_total"]
    assert_ok(loaded.delete("/api/v1/models/mlp-small"))
    assert "mlp-small" not in assert_ok(loaded.get("/api/v1/metrics"))["metrics"]["models"]


def test_jobs_list_training_progress_and_owners(loaded):
    loaded = Api(loaded.runtime, open_mode=False)
    admin = loaded.keys.create("ops", "admin")
    alice = loaded.keys.create("alice", "user")
    trained = assert_ok(loaded.as_(admin).post("/api/v1/training/async", {
        "model_id": "mlp-small", "training_data": [[0, 1, 0, 1], [1, 0, 1, 0]], "labels": [0, 2], "epochs": 4}))
    inferred = assert_ok(loaded.as_(alice).post("/api/v1/inference/async", {"model_id": "mlp-small",
                                                                            "input_data": [[1, 2, 3, 4]]}))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        jobs = assert_ok(loaded.as_(admin).get("/api/v1/jobs"), "jobs")["jobs"]
        if all(j["status"] == "completed" for j in jobs):
            break
        time.sleep(0.05)
    assert [j["kind"] for j in jobs] == ["inference", "training"]  # newest first
    training = jobs[1]
    assert training["request_id"] == trained["request_id"] and training["model_id"] == "mlp-small"
    assert training["status"] == "completed" and training["epochs_completed"] == 4
    assert len(training["loss_history"]) == 4 and training["current_loss"] == training["loss_history"][-1]
    assert [j["request_id"] for j in assert_ok(loaded.as_(alice).get("/api/v1/jobs"))["jobs"]] == \
        [inferred["request_id"]]  # a user sees only their own
    assert_error(loaded.as_(admin).get("/api/v1/jobs", params={"limit": "0"}), 400, "INVALID_INPUT_DATA")



def test_resources(loaded):
    alloc = assert_ok(loaded.post("/api/v1/resources", {"user_id": "user123", "memory_size": 1 << 20,
                                                         "compute_units": 1, "duration": 3600}),
                      "allocation_id", "user_id", "gpu_id", "memory_size", "compute_units", "start_time",
                      "end_time")
    assert alloc["allocation_id"].startswith("alloc_")
    assert [a["allocation_id"] for a in assert_ok(loaded.get("/api/v1/resources"))["allocations"]] == \
        [alloc["allocation_id"]]
    assert assert_ok(loaded.get(f"/api/v1/resources/{alloc['allocation_id']}"))["memory_size"] == 1 << 20
    assert assert_ok(loaded.delete(f"/api/v1/resources/{alloc['allocation_id']}"))["message"]
    assert_error(loaded.delete(f"/api/v1/resources/{alloc['allocation_id']}"), 404, "NOT_FOUND")
    error = assert_error(loaded.post("/api/v1/resources", {"user_id": "u", "memory_size": 1 << 49,
                                                           "compute_units": 1, "duration": 60}),
                         400, "INVALID_INPUT_DATA")  # more than the device has: never, so not a 503
    assert error["details"]["requested"] == 1 << 49 and error["details"]["capacity"] < 1 << 49


def test_virtual_gpus(loaded):
    vgpu = assert_ok(loaded.post("/api/v1/virtualization/gpus", {
        "virtual_gpu_id": "vgpu_1", "memory_size": 64 << 20, "compute_units": 1,
        "scheduling_policy": "round_robin"}),
        "virtual_gpu_id", "physical_gpu_id", "memory_size", "compute_units", "status", "created_at")
    assert vgpu["status"] == "active" and vgpu["physical_gpu_id"] == 0
    assert [v["virtual_gpu_id"] for v in assert_ok(loaded.get("/api/v1/virtualization/gpus"))["virtual_gpus"]] \
        == ["vgpu_1"]
    spec = dict(MLP_SPEC, model_id="on-vgpu", virtual_gpu_id="vgpu_1")
    assert_ok(loaded.post("/api/v1/models", spec))
    assert assert_ok(loaded.get("/api/v1/models/on-vgpu"))["virtual_gpu_id"] == "vgpu_1"
    too_big = dict(MLP_SPEC, model_id="too-big", virtual_gpu_id="vgpu_1",
                   parameters={"input_size": 4096, "hidden_sizes": [8192], "output_size": 4})
    assert_error(loaded.post("/api/v1/models", too_big), 400, "INVALID_INPUT_DATA")  # over the whole quota
    assert_ok(loaded.delete("/api/v1/models/on-vgpu"))
    assert assert_ok(loaded.delete("/api/v1/virtualization/gpus/vgpu_1"))["message"]
    assert_error(loaded.get("/api/v1/virtualization/gpus/vgpu_1"), 404, "NOT_FOUND")


def test_unknown_routes_and_methods(loaded):
    assert_error(loaded.get("/api/v1/unknown"), 404, "NOT_FOUND")
    assert_error(loaded.call("PUT", "/api/v1/models"), 405, "METHOD_NOT_ALLOWED")
    assert_error(loaded.call("PATCH", "/api/v1/inference"), 405, "METHOD_NOT_ALLOWED")


def test_openapi_lists_every_route(api):
    document = assert_ok_plain(api.get("/api/v1/openapi.json"))
    for path, methods in document["paths"].items():
        concrete = path.replace("{", "x").replace("}", "")
        for method in methods:
            r = api.call(method.upper(), concrete)
            assert r.status_code != 405, f"{method} {path} is documented but not routed"
            assert not (r.status_code == 404 and r.json["error"]["code"] == "NOT_FOUND"
                        and "No route" in r.json["error"]["message"]), f"{method} {path} is not routed"


def assert_ok_plain(response):
    assert response.status_code == 200
    return response.json
