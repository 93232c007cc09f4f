"""POST /training, /training/async, GET /training/{id}, POST /models/{id}/optimize over HTTP
(falcon.testing.TestClient over a real Runtime)."""
import time

import numpy as np
import pytest

from api_helpers import ISO_Z, Api, assert_error, assert_ok, make_runtime
from msmartcompute.api.openapi import build_document
from msmartcompute.api.ratelimit import RateLimitConfig
from training_helpers import BLOB_SPEC, blobs


@pytest.fixture
def api(tmp_path):
    runtime = make_runtime(tmp_path / "state")
    api = Api(runtime)
    assert_ok(api.post("/api/v1/models", BLOB_SPEC))
    yield api
    runtime.close()


def test_train_then_quantize_over_http(api):
    x, y = blobs(n=256)
    body = assert_ok(api.post("/api/v1/training", {
        "model_id": "blobs", "training_data": x.tolist(), "labels": np.eye(4)[y].astype(int).tolist(),
        "epochs": 4, "learning_rate": 0.005, "optimizer": "adam", "loss_function": "cross_entropy",
        "hyperparameters": {"batch_size": 64, "gradient_clip_norm": 1.0, "weight_decay": 0.01}}),
        "request_id", "final_loss", "loss_history", "training_time", "epochs_completed", "model_updated")
    assert body["epochs_completed"] == 4 and len(body["loss_history"]) == 4 and body["model_updated"] is True
    assert body["final_loss"] < body["loss_history"][0]
    opt = assert_ok(api.post("/api/v1/models/blobs/optimize", {
        "optimization_type": "quantization", "target_precision": "int8", "calibration_data": x[:128].tolist(),
        "options": {"preserve_accuracy": True, "compression_ratio": 0.5}}),
        "model_id", "optimization_type", "original_size", "optimized_size", "compression_ratio",
        "accuracy_loss", "optimization_time", "accuracy_metric", "model_updated")
    assert opt["compression_ratio"] < 0.3 and opt["accuracy_loss"] <= 0.01 and opt["model_updated"] is True
    out = assert_ok(api.post("/api/v1/inference", {"model_id": "blobs", "input_data": x.tolist()}))
    assert (np.asarray(out["output_data"]).argmax(1) == y).mean() >= 0.95


def test_async_training_over_http(api):
    x, y = blobs(n=64)
    queued = assert_ok(api.post("/api/v1/training/async", {"model_id": "blobs", "training_data": x.tolist(),
                                                            "labels": y.tolist(), "epochs": 30}),
                       "request_id", "status", "estimated_completion")
    assert queued["status"] == "queued" and ISO_Z.match(queued["estimated_completion"])
    deadline = time.monotonic() + 60
    while True:
        body = assert_ok(api.get(f"/api/v1/training/{queued['request_id']}"), "status", "epochs_completed",
                         "final_loss", "loss_history", "training_time", "completion_time")
        if body["status"] == "completed" or time.monotonic() > deadline:
            break
        assert body["status"] in ("queued", "running") and body["final_loss"] is None
        time.sleep(0.02)
    assert body["status"] == "completed" and body["epochs_completed"] == 30 and len(body["loss_history"]) == 30
    assert ISO_Z.match(body["completion_time"]) and body["final_loss"] == body["loss_history"][-1]
    assert_error(api.get("/api/v1/training/req_0_0"), 404, "NOT_FOUND")
    assert_error(api.get(f"/api/v1/inference/{queued['request_id']}"), 404, "NOT_FOUND")  # not an inference


@pytest.mark.parametrize("change,field", [
    ({"epochs": 20_000}, "body.epochs"),
    ({"optimizer": "rmsprop"}, "body.optimizer"),
    ({"labels": [0, 1, 2]}, "labels"),
    ({"labels": [[0, 1], [1]]}, "body.labels"),
    ({"training_data": [[1.0, 2.0], [3.0]]}, "body.training_data"),
    ({"hyperparameters": {"batch_size": "big"}}, "body.hyperparameters.batch_size"),
])
def test_training_errors_name_the_field(api, change, field):
    x, y = blobs(n=16)
    body = {"model_id": "blobs", "training_data": x.tolist(), "labels": y.tolist(), **change}
    for path in ("/api/v1/training", "/api/v1/training/async"):
        error = assert_error(api.post(path, body), 400, "INVALID_INPUT_DATA")
        assert error["details"]["field"] == field, error


def test_divergence_and_unknown_model(api):
    body = {"model_id": "blobs", "training_data": [[1.0] * 16], "labels": [[1e30] * 4], "loss_function": "mse"}
    error = assert_error(api.post("/api/v1/training", body), 400, "INVALID_INPUT_DATA")
    assert error["details"]["field"] == "labels" and "must lie in" in error["message"]  # issue #17: 1e38 passed
    error = assert_error(api.post("/api/v1/training", {**body, "labels": [[0.0] * 4], "learning_rate": 10}), 400,
                         "INVALID_INPUT_DATA")
    assert error["details"]["field"] == "learning_rate"
    error = assert_error(api.post("/api/v1/training", {**body, "labels": [[0.0] * 4], "training_data": [[1e30] * 16],
                                                       "learning_rate": 1.0}), 400, "INVALID_INPUT_DATA")
    assert "diverged" in error["message"]
    assert_error(api.post("/api/v1/training", dict(body, model_id="nope")), 404, "INVALID_MODEL_ID")
    assert_error(api.post("/api/v1/models/nope/optimize", {"optimization_type": "quantization"}), 404,
                 "INVALID_MODEL_ID")
    error = assert_error(api.post("/api/v1/models/blobs/optimize", {"optimization_type": "prune"}), 400,
                         "INVALID_INPUT_DATA")
    assert error["details"]["field"] == "body.optimization_type"


def test_roles_and_ownership(tmp_path):
    runtime = make_runtime(tmp_path / "state")
    try:
        base = Api(runtime)
        admin_key, alice_key, bob_key = (base.keys.create("root", "admin"), base.keys.create("alice", "user"),
                                         base.keys.create("bob", "user"))
        api = Api(runtime, rate_limit=RateLimitConfig(per_minute=10_000, burst_per_second=10_000))
        admin, alice, bob = api.as_(admin_key), api.as_(alice_key), api.as_(bob_key)
        assert_ok(admin.post("/api/v1/models", BLOB_SPEC))
        x, y = blobs(n=16)
        body = {"model_id": "blobs", "training_data": x.tolist(), "labels": y.tolist()}
        # a model is shared: a plain user may not retrain it for everyone (issue #17 item 7)
        for path in ("/api/v1/training", "/api/v1/training/async"):
            assert_error(alice.post(path, body), 403, "FORBIDDEN")
        job = assert_ok(admin.post("/api/v1/training/async", body))
        assert_ok(admin.get(f"/api/v1/training/{job['request_id']}"))
        assert_error(bob.get(f"/api/v1/training/{job['request_id']}"), 404, "NOT_FOUND")
        assert_error(bob.delete(f"/api/v1/training/{job['request_id']}"), 404, "NOT_FOUND")
        assert_error(alice.post("/api/v1/models/blobs/optimize", {"optimization_type": "quantization"}), 403,
                     "FORBIDDEN")
        assert_error(alice.post("/api/v1/training", {"model_id": "blobs", "training_data": x.tolist(),
                                                     "labels": y.tolist(), "save_path": "a.safetensors"}),
                     403, "FORBIDDEN")
        assert_ok(admin.post("/api/v1/models/blobs/optimize", {"optimization_type": "mixed_precision"}))
    finally:
        runtime.close()


def test_openapi_lists_training_and_optimize():
    document = build_document()
    paths = document["paths"]
    assert "post" in paths["/api/v1/training"] and "post" in paths["/api/v1/training/async"]
    assert "get" in paths["/api/v1/training/{request_id}"]
    optimize = paths["/api/v1/models/{model_id}/optimize"]["post"]
    ref = optimize["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert sorted(schema["properties"]["optimization_type"]["enum"]) == ["mixed_precision", "quantization"]
