"""Issue #17 items 5 and 6 against a real Runtime (real SQLite store, real models): a
request's deadline stops its work inside the run (a dense generation between decode steps, a
training between mini-batches), async trainings are cancelled, lock waits are bounded and
synchronous trainings capped, so no thread waits or works forever."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from api_helpers import Api, assert_error, assert_ok, make_runtime
from msmartcompute.runtime.errors import QueueFull, RequestTimeout
from training_helpers import BLOB_SPEC, blobs


def _weights(rt, model_id):
    return {k: v.clone() for k, v in rt.registry.entry(model_id).model.module.state_dict().items()}


def _unchanged(before, after):
    return all(torch.equal(before[k], after[k]) for k in before)


def _long_training(epochs=10_000):
    x, y = blobs(512)
    return {"model_id": "blobs", "training_data": x, "labels": y, "epochs": epochs, "learning_rate": 0.001,
            "hyperparameters": {"batch_size": 8}}


def _wait(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


@pytest.fixture
def rt(tmp_path):
    runtime = make_runtime(tmp_path / "state", sync_training_timeout_s=1.0, model_lock_wait_s=0.5,
                           max_sync_trainings=1, job_workers=1)
    runtime.registry.load(dict(BLOB_SPEC))
    yield runtime
    runtime.close()


def test_a_sync_training_stops_between_mini_batches_at_its_deadline(rt):
    before = _weights(rt, "blobs")
    t0 = time.monotonic()
    with pytest.raises(RequestTimeout):
        rt.training.train(_long_training())  # ~10,000 epochs x 64 mini-batches: hours without the deadline
    assert time.monotonic() - t0 < 3.0
    assert _unchanged(before, _weights(rt, "blobs"))  # stopped work keeps nothing


def test_a_running_training_job_is_cancelled_at_its_next_mini_batch(rt):
    before = _weights(rt, "blobs")
    rid = rt.training.submit(_long_training())["request_id"]
    _wait(lambda: rt.training.get(rid)["status"] == "running")
    queued = rt.training.submit(_long_training())["request_id"]  # one job worker: this one waits
    assert rt.training.cancel(queued)["status"] == "cancelled"  # a queued job ends at once
    assert rt.training.get(queued)["error"]["code"] == "CANCELLED"
    t0 = time.monotonic()
    assert rt.training.cancel(rid)["status"] == "running"
    _wait(lambda: rt.training.get(rid)["status"] == "cancelled", timeout=5)
    assert time.monotonic() - t0 < 2.0
    result = rt.training.get(rid)
    assert result["error"]["code"] == "CANCELLED" and result["model_updated"] is None
    assert _unchanged(before, _weights(rt, "blobs"))
    assert rt.training.cancel(rid)["status"] == "cancelled"  # finished: nothing to do, said so


def test_lock_waits_are_bounded_and_sync_trainings_capped(rt):
    rid = rt.training.submit(_long_training())["request_id"]  # holds the model's lock
    _wait(lambda: rt.training.get(rid)["status"] == "running")
    t0 = time.monotonic()
    with pytest.raises(QueueFull) as waited:
        rt.training.train(_long_training(1))
    assert 0.4 < time.monotonic() - t0 < 2.0 and waited.value.details["waited_s"] == 0.5
    with pytest.raises(QueueFull):
        rt.optimization.optimize("blobs", {"optimization_type": "quantization"})
    rt.training.cancel(rid)
    _wait(lambda: rt.training.get(rid)["status"] == "cancelled")

    # one synchronous training at a time (max_sync_trainings=1): the next is refused at once
    rt.registry.load({**BLOB_SPEC, "model_id": "other"})
    running = threading.Thread(target=lambda: pytest.raises(RequestTimeout, rt.training.train, _long_training()))
    running.start()
    _wait(lambda: rt.training._sync_slots._value == 0)
    t0 = time.monotonic()
    with pytest.raises(QueueFull) as capped:
        rt.training.train({**_long_training(1), "model_id": "other"})
    assert time.monotonic() - t0 < 0.3 and "training/async" in capped.value.message
    running.join()


def test_delete_training_over_http(tmp_path):
    rt = make_runtime(tmp_path / "state", job_workers=1)
    try:
        api = Api(rt)
        admin = api.keys.create("root", "admin")
        alice, bob = api.keys.create("alice", "user"), api.keys.create("bob", "user")
        assert_ok(api.as_(admin).post("/api/v1/models", BLOB_SPEC))
        body = _long_training()
        body = {**body, "training_data": body["training_data"].tolist(), "labels": body["labels"].tolist()}
        rid = assert_ok(api.as_(admin).post("/api/v1/training/async", body))["request_id"]
        assert_error(api.as_(admin).delete("/api/v1/training/req_0_0000000000000000"), 404, "NOT_FOUND")
        assert api.as_(bob).delete(f"/api/v1/training/{rid}").status_code in (403, 404)
        _wait(lambda: assert_ok(api.as_(admin).get(f"/api/v1/training/{rid}"))["status"] == "running")
        out = assert_ok(api.as_(admin).delete(f"/api/v1/training/{rid}"), "status", "message")
        assert out["status"] == "running" and "next mini-batch" in out["message"]
        _wait(lambda: api.as_(admin).get(f"/api/v1/training/{rid}").json["status"] == "cancelled")
        assert api.as_(admin).get(f"/api/v1/training/{rid}").json["error"]["code"] == "CANCELLED"
        assert alice  # a user's own training is theirs to cancel (test_api_training: rights)
    finally:
        rt.close()


def test_a_pretrained_decoder_stops_at_its_deadline_and_frees_the_device(tmp_path):
    """Issue #17 item 5: a generation past `options.timeout` held the device to its end, so
    another model's requests on the device timed out too. It now stops between decode steps."""
    transformers = pytest.importorskip("transformers")
    from hf_fixtures import hf_model, save

    root = tmp_path / "models"
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                      bos_token_id=0, eos_token_id=None)  # no end: it runs to max_tokens
    torch.manual_seed(0)
    save(transformers.LlamaForCausalLM(config).eval(), root / "slow", tokenizer=None)
    save(hf_model("llama", seed=1), root / "quick", tokenizer=None)
    rt = make_runtime(tmp_path / "state", model_roots=[root])
    try:
        for name in ("slow", "quick"):
            rt.registry.load({"model_id": name, "model_type": "transformer", "model_path": name})
        long = {"model_id": "slow", "input_data": np.array([[2, 3, 4, 5]]),
                "options": {"max_tokens": 4000, "temperature": 0, "timeout": 0.5, "ignore_eos": True}}
        failed = {}

        def run_long():
            try:
                rt.inference.infer(long)
            except RequestTimeout as exc:
                failed["at"] = time.monotonic()
                failed["exc"] = exc

        t = threading.Thread(target=run_long)
        t0 = time.monotonic()
        t.start()
        time.sleep(0.2)
        quick = rt.inference.infer({"model_id": "quick", "input_data": np.array([[2, 3]]),
                                    "options": {"max_tokens": 2, "temperature": 0, "timeout": 30}})
        quick_at = time.monotonic()
        t.join()
        assert "exc" in failed
        assert quick["tokens_generated"] >= 1
        # the device was given back at the long one's deadline (0.5 s, then at most one step and the
        # first use of new kernel shapes: ~2 s measured on the 2-core box), not after its 4000 tokens (> 10 s)
        assert failed["at"] - t0 < 6 and quick_at - t0 < 6
    finally:
        rt.close()
