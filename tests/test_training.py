"""Training through the Runtime: learning, progress, atomic swap, validation, divergence, restart."""
import time

import numpy as np
import pytest
import torch

from api_helpers import make_runtime
from msmartcompute.runtime.errors import Forbidden, InvalidInputData
from msmartcompute.runtime.caller import Caller
from training_helpers import BLOB_SPEC, SEQUENCE, TINY_LM_SPEC, blobs, cross_entropy, outputs, rt  # noqa: F401 (rt is a fixture)



def wait_job(rt, rid, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = rt.training.get(rid)
        if job["status"] in ("completed", "failed"):
            return job
        time.sleep(0.02)
    raise AssertionError(f"{rid} did not finish in {timeout}s")


def test_mlp_learns_gaussian_blobs(rt):
    rt.registry.load(BLOB_SPEC)
    x, y = blobs()
    initial = cross_entropy(outputs(rt, "blobs", x), y)  # measured on the untrained model
    r = rt.training.train({"model_id": "blobs", "training_data": x, "labels": y, "epochs": 8, "learning_rate": 0.005,
                  "optimizer": "adam", "loss_function": "cross_entropy",
                  "hyperparameters": {"batch_size": 64, "gradient_clip_norm": 1.0, "weight_decay": 0.01}})
    assert r["request_id"].startswith("req_") and r["epochs_completed"] == 8 and r["model_updated"] is True
    assert len(r["loss_history"]) == 8 and r["final_loss"] == r["loss_history"][-1] and r["training_time"] > 0
    after = outputs(rt, "blobs", x)
    final = cross_entropy(after, y)
    assert final <= 0.2 * initial, (initial, final)
    assert (after.argmax(1) == y).mean() >= 0.95


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_every_optimizer_reduces_the_loss_with_one_hot_labels(rt, optimizer):
    rt.registry.load(BLOB_SPEC)
    x, y = blobs(n=128)
    one_hot = np.eye(4)[y].tolist()
    r = rt.training.train({"model_id": "blobs", "training_data": x, "labels": one_hot, "epochs": 6,
                  "learning_rate": 0.05 if optimizer == "sgd" else 0.005, "optimizer": optimizer,
                  "hyperparameters": {"batch_size": 32}})
    assert r["loss_history"][-1] < 0.5 * r["loss_history"][0]


def test_mse_regression(rt):
    rt.registry.load(dict(BLOB_SPEC, parameters={"input_size": 3, "hidden_sizes": [32], "output_size": 1}))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 3)).astype(np.float32)
    target = (x @ np.array([1.0, -2.0, 0.5]))[:, None]
    before = float(((outputs(rt, "blobs", x) - target) ** 2).mean())
    r = rt.training.train({"model_id": "blobs", "training_data": x, "labels": target, "epochs": 20, "learning_rate": 0.01,
                  "loss_function": "mse"})
    after = float(((outputs(rt, "blobs", x) - target) ** 2).mean())
    assert after < 0.1 * before and abs(r["final_loss"] - after) < 0.1 * before


def test_same_seed_same_run(tmp_path):
    x, y = blobs(n=96)
    runs = []
    for i in range(2):
        runtime = make_runtime(tmp_path / f"s{i}")
        runtime.registry.load(BLOB_SPEC)
        runs.append(runtime.training.train({"model_id": "blobs", "training_data": x, "labels": y, "epochs": 3,
                                   "seed": 7, "hyperparameters": {"batch_size": 16}})["loss_history"])
        runtime.close()
    assert runs[0] == runs[1]


def test_transformer_memorises_a_sequence(rt):
    rt.registry.load(TINY_LM_SPEC)
    prompt = [SEQUENCE[:2]]
    greedy = {"temperature": 0, "max_tokens": len(SEQUENCE) - 2}
    r = rt.training.train({"model_id": "tiny-lm", "training_data": [SEQUENCE], "epochs": 50, "learning_rate": 0.01,
                  "optimizer": "adamw"})  # no labels: next-token prediction on the sequence
    assert r["final_loss"] < 0.1 * r["loss_history"][0]
    out = rt.inference.infer({"model_id": "tiny-lm", "input_data": prompt, "options": greedy})["output_data"]
    assert out.tolist() == [SEQUENCE[2:]]


def test_encoder_trains_its_pooled_vectors(rt):
    rt.registry.load(dict(TINY_LM_SPEC, model_id="enc", model_type="encoder"))
    tokens = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    targets = np.eye(32)[:4] * 3  # pooled vector of row i -> 3 * e_i
    before = float(((outputs(rt, "enc", tokens) - targets) ** 2).mean())
    r = rt.training.train({"model_id": "enc", "training_data": tokens, "labels": targets, "loss_function": "mse",
                  "epochs": 30, "learning_rate": 0.01})
    after = float(((outputs(rt, "enc", tokens) - targets) ** 2).mean())
    assert after < 0.2 * before and r["model_updated"]


def test_async_training_reports_progress_and_inference_sees_old_or_new_weights(rt):
    rt.registry.load(BLOB_SPEC)
    x, y = blobs(n=64)
    probe = x[:8]
    old = outputs(rt, "blobs", probe)
    epochs = 1500
    queued = rt.training.submit({"model_id": "blobs", "training_data": x, "labels": y, "epochs": epochs,
                                 "learning_rate": 0.001, "hyperparameters": {"batch_size": 64}})
    assert queued["status"] == "queued" and queued["estimated_completion"].endswith("Z")
    rid, seen, progress = queued["request_id"], [], []
    while True:
        job = rt.training.get(rid)
        if job["status"] == "running" and job["epochs_completed"] > 0:
            progress.append((job["epochs_completed"], job["current_loss"], len(job["loss_history"])))
        if job["status"] in ("completed", "failed"):
            break
        seen.append(outputs(rt, "blobs", probe))  # inference keeps working during training
    assert job["status"] == "completed", job
    new = outputs(rt, "blobs", probe)
    assert not np.array_equal(old, new)
    assert all(np.array_equal(o, old) or np.array_equal(o, new) for o in seen)  # never half-updated
    assert any(np.array_equal(o, old) for o in seen)
    assert any(done < epochs for done, _, _ in progress)  # seen mid-run
    assert all(0 < done <= epochs and loss is not None and n == done for done, loss, n in progress)
    assert job["epochs_completed"] == epochs and len(job["loss_history"]) == epochs
    assert job["final_loss"] == job["loss_history"][-1] and job["completion_time"].endswith("Z")
    assert job["model_updated"] is True and job["training_time"] > 0


@pytest.mark.parametrize("change,field", [
    ({"labels": list(range(4)) * 10}, "labels"),                       # 40 labels for 64 rows
    ({"optimizer": "rmsprop"}, "optimizer"),
    ({"loss_function": "hinge"}, "loss_function"),
    ({"epochs": 0}, "epochs"),
    ({"epochs": 20_000}, "epochs"),
    ({"labels": [9] * 64}, "labels"),                                  # class 9 of 4
    ({"labels": np.zeros((64, 3))}, "labels"),                         # 3 columns, 4 classes
    ({"labels": None}, "labels"),
    ({"training_data": np.zeros((64, 5), np.float32)}, "training_data"),
    ({"hyperparameters": {"batch_size": 0}}, "hyperparameters.batch_size"),
    ({"learning_rate": -1}, "learning_rate"),
    ({"save_path": "/etc/trained.safetensors"}, "save_path"),
])
def test_bad_training_requests_name_the_field(rt, change, field):
    rt.registry.load(BLOB_SPEC)
    x, y = blobs(n=64)
    request = {"model_id": "blobs", "training_data": x, "labels": y, **change}
    for call in (rt.training.train, rt.training.submit):
        with pytest.raises(InvalidInputData) as err:
            call(request)
        assert err.value.details["field"] == field, err.value.message


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.save: still what users bring
def test_models_that_cannot_train(rt):
    path = rt.state_dir / "models" / "prog.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 2)), str(path))
    rt.registry.load({"model_id": "prog", "model_type": "torchscript", "model_path": str(path)})
    rt.registry.load(dict(BLOB_SPEC, model_id="q", enable_quantization=True))
    x, y = blobs(n=16)
    with pytest.raises(InvalidInputData, match="torchscript model cannot be trained") as err:
        rt.training.train({"model_id": "prog", "training_data": x[:, :4], "labels": y})
    assert err.value.details["field"] == "model_id"
    with pytest.raises(InvalidInputData, match="int8-quantized") as err:
        rt.training.train({"model_id": "q", "training_data": x, "labels": y})
    assert err.value.details["field"] == "model_id"
    rt.registry.load(TINY_LM_SPEC)
    with pytest.raises(InvalidInputData) as err:
        rt.training.train({"model_id": "tiny-lm", "training_data": [SEQUENCE], "loss_function": "mse"})
    assert err.value.details["field"] == "loss_function"
    with pytest.raises(InvalidInputData) as err:
        rt.training.train({"model_id": "tiny-lm", "training_data": [SEQUENCE], "labels": [SEQUENCE[:5]]})
    assert err.value.details["field"] == "labels"


def test_divergence_fails_clearly_and_leaves_the_model(rt):
    rt.registry.load(dict(BLOB_SPEC, parameters={"input_size": 3, "hidden_sizes": [8], "output_size": 1}))
    x = np.ones((8, 3), np.float32)
    before = outputs(rt, "blobs", x)
    request = {"model_id": "blobs", "training_data": np.full((8, 3), 1e30, np.float32), "labels": np.zeros((8, 1)),
               "loss_function": "mse", "epochs": 3}  # outputs ~1e30, squared: inf in float32 at once
    with pytest.raises(InvalidInputData, match="diverged") as err:
        rt.training.train(request)
    assert err.value.details["field"] == "learning_rate" and err.value.details["epoch"] == 1
    job = wait_job(rt, rt.training.submit(request)["request_id"])
    assert job["status"] == "failed" and job["error"]["code"] == "INVALID_INPUT_DATA"
    assert "diverged" in job["error"]["message"] and job["model_updated"] is None
    assert np.array_equal(outputs(rt, "blobs", x), before)


def test_save_path_survives_a_restart(tmp_path):
    rt = make_runtime(tmp_path / "state")
    rt.registry.load(BLOB_SPEC)
    x, y = blobs(n=64)
    with pytest.raises(Forbidden):
        rt.training.train({"model_id": "blobs", "training_data": x, "labels": y, "save_path": "t/b.safetensors"},
                 Caller("alice", "user"))
    rt.training.train({"model_id": "blobs", "training_data": x, "labels": y, "epochs": 2, "save_path": "t/b.safetensors"})
    trained = outputs(rt, "blobs", x)
    assert (tmp_path / "state" / "models" / "t" / "b.safetensors").is_file()
    rt.close()
    rt = make_runtime(tmp_path / "state")
    try:
        np.testing.assert_array_equal(outputs(rt, "blobs", x), trained)
    finally:
        rt.close()


def test_trained_weights_survive_a_restart_without_save_path(tmp_path):
    """Issue #17 item 7: a completed training was silently reverted at the next restart."""
    rt = make_runtime(tmp_path / "state")
    rt.registry.load(BLOB_SPEC)
    x, y = blobs(n=64)
    before = outputs(rt, "blobs", x)
    out = rt.training.train({"model_id": "blobs", "training_data": x, "labels": y, "epochs": 2})
    assert out["model_updated"] and out["weights_persisted"]
    trained = outputs(rt, "blobs", x)
    assert not np.array_equal(trained, before)
    rt.close()
    rt = make_runtime(tmp_path / "state")
    try:
        np.testing.assert_array_equal(outputs(rt, "blobs", x), trained)
        job = wait_job(rt, rt.training.submit({"model_id": "blobs", "training_data": x, "labels": y})["request_id"])
        assert job["status"] == "completed" and job["weights_persisted"] is True
    finally:
        rt.close()


def test_training_cut_by_a_stop_is_failed_not_resumed(tmp_path):
    rt = make_runtime(tmp_path / "state")
    rt.registry.load(BLOB_SPEC)
    x, y = blobs(n=64)
    rid = rt.training.submit({"model_id": "blobs", "training_data": x, "labels": y, "epochs": 10_000})["request_id"]
    while rt.training.get(rid)["epochs_completed"] == 0:
        time.sleep(0.01)
    t0 = time.monotonic()
    rt.close()
    assert time.monotonic() - t0 < 10  # the loop polls the stop flag
    # A crash leaves a row `running`: the next start must fail it, not run it again.
    rt = make_runtime(tmp_path / "state")
    try:
        job = rt.training.get(rid)
        assert job["status"] == "failed" and "not resumed" in job["error"]["message"]
        rt.store.connect().execute("UPDATE jobs SET status = 'running', error = NULL WHERE id = ?", (rid,))
    finally:
        rt.close()
    rt = make_runtime(tmp_path / "state")
    try:
        job = rt.training.get(rid)
        assert job["status"] == "failed" and "not resumed" in job["error"]["message"]
    finally:
        rt.close()
