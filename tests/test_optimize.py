"""Model optimization through the Runtime: int8 and half precision, measured; persisted."""
import numpy as np
import pytest
import torch

from api_helpers import make_runtime
from msmartcompute.models.base import module_bytes
from msmartcompute.runtime.caller import Caller
from msmartcompute.runtime.errors import Forbidden, InvalidInputData
from training_helpers import BLOB_SPEC, SEQUENCE, TINY_LM_SPEC, blobs, outputs, rt  # noqa: F401 (rt is a fixture)



@pytest.fixture
def trained(rt):
    """The blob classifier, trained here (so it counts as a classifier)."""
    rt.registry.load(BLOB_SPEC)
    x, y = blobs()
    rt.training.train({"model_id": "blobs", "training_data": x, "labels": y, "epochs": 4, "learning_rate": 0.005,
              "hyperparameters": {"batch_size": 64}})
    return rt, x, y


def test_int8_quantization_of_a_trained_mlp(trained):
    rt, x, y = trained
    before = outputs(rt, "blobs", x)
    assert (before.argmax(1) == y).mean() >= 0.95
    served = rt.registry.entry("blobs").model.module
    r = rt.optimization.optimize("blobs", {"optimization_type": "quantization", "target_precision": "int8",
                                    "calibration_data": x[:256], "options": {"preserve_accuracy": True,
                                                                               "max_accuracy_loss": 0.02}})
    assert r["model_updated"] is True and r["reason"] is None and r["target_precision"] == "int8"
    assert r["original_size"] == module_bytes(served)
    assert r["optimized_size"] == module_bytes(rt.registry.entry("blobs").model.module)
    assert r["compression_ratio"] == r["optimized_size"] / r["original_size"] < 0.3
    assert r["accuracy_metric"] == "top1_disagreement" and 0 <= r["accuracy_loss"] < 0.02
    assert r["optimization_time"] > 0
    assert rt.registry.get("blobs")["memory_usage"] == r["optimized_size"]
    after = outputs(rt, "blobs", x)  # inference still works, through the int8 layers
    disagreement = (after[:256].argmax(1) != before[:256].argmax(1)).mean()
    assert disagreement == pytest.approx(r["accuracy_loss"], abs=1e-6)  # the reported figure is this one
    assert (after.argmax(1) == y).mean() >= 0.95
    with pytest.raises(InvalidInputData, match="already int8"):
        rt.optimization.optimize("blobs", {"optimization_type": "quantization"})


def test_half_precision_and_its_relative_error(rt):
    rt.registry.load(dict(BLOB_SPEC, model_id="reg"))
    x, _ = blobs(n=64)
    before = outputs(rt, "reg", x)
    r = rt.optimization.optimize("reg", {"optimization_type": "mixed_precision", "calibration_data": x})
    assert r["target_precision"] == "bf16" and r["compression_ratio"] == 0.5  # every tensor fp32 -> bf16
    assert r["accuracy_metric"] == "relative_error"  # not trained as a classifier
    after = outputs(rt, "reg", x)
    expected = np.linalg.norm(after - before) / np.linalg.norm(before)
    assert r["accuracy_loss"] == pytest.approx(expected, rel=1e-4) and 0 < r["accuracy_loss"] < 0.05
    assert rt.registry.entry("reg").model.dtype == torch.bfloat16


def test_preserve_accuracy_refuses_and_leaves_the_model(rt):
    rt.registry.load(BLOB_SPEC)
    x, _ = blobs(n=64)
    before, memory = outputs(rt, "blobs", x), rt.registry.get("blobs")["memory_usage"]
    r = rt.optimization.optimize("blobs", {"optimization_type": "quantization", "calibration_data": x,
                                    "options": {"preserve_accuracy": True, "max_accuracy_loss": 0.0,
                                                "accuracy_metric": "relative_error"}})
    assert r["model_updated"] is False and "max_accuracy_loss" in r["reason"] and r["accuracy_loss"] > 0
    assert rt.registry.get("blobs")["memory_usage"] == memory
    assert np.array_equal(outputs(rt, "blobs", x), before)


def test_without_calibration_data_the_loss_is_not_measured(rt):
    rt.registry.load(BLOB_SPEC)
    r = rt.optimization.optimize("blobs", {"optimization_type": "quantization", "target_precision": "int8",
                                    "options": {"weight_only": True}})
    assert r["accuracy_loss"] is None and r["accuracy_metric"] is None and "calibration_data" in r["accuracy_note"]
    assert r["mode"] == "w8a16" and r["model_updated"] is True


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("request_,field", [
    ({"optimization_type": "pruning"}, "optimization_type"),
    ({"optimization_type": "mixed_precision", "target_precision": "int8"}, "target_precision"),
    ({"optimization_type": "quantization", "target_precision": "int4"}, "target_precision"),
    ({"optimization_type": "quantization", "options": {"preserve_accuracy": True}}, "calibration_data"),
    ({"optimization_type": "quantization", "calibration_data": [[1.0, 2.0]]}, "calibration_data"),
    ({"optimization_type": "quantization", "options": {"max_accuracy_loss": 2}}, "options.max_accuracy_loss"),
])
def test_bad_optimization_requests_name_the_field(rt, request_, field):
    rt.registry.load(BLOB_SPEC)
    with pytest.raises(InvalidInputData) as err:
        rt.optimization.optimize("blobs", request_)
    assert err.value.details["field"] == field, err.value.message


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_who_and_what_can_be_optimized(rt):
    rt.registry.load(BLOB_SPEC)
    with pytest.raises(Forbidden):
        rt.optimization.optimize("blobs", {"optimization_type": "quantization"}, Caller("alice", "user"))
    path = rt.state_dir / "models" / "prog.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 2)), str(path))
    rt.registry.load({"model_id": "prog", "model_type": "torchscript", "model_path": str(path)})
    with pytest.raises(InvalidInputData, match="cannot be optimized") as err:
        rt.optimization.optimize("prog", {"optimization_type": "quantization"})
    assert err.value.details["field"] == "model_id"


def test_quantized_transformer_generates_and_reports_next_token_disagreement(rt):
    rt.registry.load(TINY_LM_SPEC)
    rt.training.train({"model_id": "tiny-lm", "training_data": [SEQUENCE], "epochs": 50, "learning_rate": 0.01})
    r = rt.optimization.optimize("tiny-lm", {"optimization_type": "quantization", "calibration_data": [SEQUENCE]})
    assert r["accuracy_metric"] == "next_token_disagreement" and 0 <= r["accuracy_loss"] <= 1
    assert r["compression_ratio"] < 0.5  # embedding and norms stay float
    out = rt.inference.infer({"model_id": "tiny-lm", "input_data": [SEQUENCE[:2]],
                    "options": {"temperature": 0, "max_tokens": 4}})["output_data"]
    if r["accuracy_loss"] == 0:
        assert out.tolist() == [SEQUENCE[2:6]]
    with pytest.raises(InvalidInputData, match="int8-quantized"):
        rt.training.train({"model_id": "tiny-lm", "training_data": [SEQUENCE]})


def test_optimizations_are_replayed_after_a_restart(tmp_path):
    rt = make_runtime(tmp_path / "state")
    rt.registry.load(BLOB_SPEC)
    x, _ = blobs(n=32)
    rt.optimization.optimize("blobs", {"optimization_type": "mixed_precision", "target_precision": "bf16"})
    rt.optimization.optimize("blobs", {"optimization_type": "quantization", "options": {"weight_only": True}})
    served, memory = outputs(rt, "blobs", x), rt.registry.get("blobs")["memory_usage"]
    rt.close()
    rt = make_runtime(tmp_path / "state")
    try:
        assert rt.registry.get("blobs")["memory_usage"] == memory
        np.testing.assert_array_equal(outputs(rt, "blobs", x), served)
    finally:
        rt.close()
