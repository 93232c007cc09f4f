"""int8 optimization and next-token fine-tuning of GPT-2 and Llama-family checkpoints through
the runtime (the same calls POST /models/{id}/optimize and POST /training make)."""
from __future__ import annotations

import pytest
import torch

from hf_fixtures import hf_model, save
from msmartcompute import ops
from msmartcompute.runtime.engine import Runtime, RuntimeConfig

pytest.importorskip("transformers")

FAMILIES = ["gpt2", "llama", "qwen2"]


@pytest.fixture
def runtime(tmp_path):
    root = tmp_path / "models"
    for family in FAMILIES:
        save(hf_model(family, seed=9), root / family)
    save(hf_model("bert"), root / "bert", tokenizer="wordpiece")
    rt = Runtime(RuntimeConfig(state_dir=tmp_path / "state", model_roots=[root]))
    rt.start()
    yield rt
    rt.close()


def load(rt, family, **extra):
    model_type = "encoder" if family == "bert" else "transformer"
    rt.registry.load({"model_id": family, "model_type": model_type, "model_path": family, **extra})
    return rt.registry.entry(family).model


def calibration(n=8, s=24, seed=0):
    return torch.randint(2, 300, (n, s), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("weight_only", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_int8_optimize_reports_and_bounds_accuracy_loss(runtime, family, weight_only):
    model = load(runtime, family)
    x = torch.tensor(calibration())
    before = model.logits(x)
    r = runtime.optimization.optimize(family, {"optimization_type": "quantization", "target_precision": "int8",
                                        "calibration_data": x.tolist(), "options": {"weight_only": weight_only}})
    want_mode = "w8a16" if weight_only or not hasattr(ops, "int8_linear") else "w8a8"
    assert r["mode"] == want_mode and r["model_updated"] is True
    assert r["accuracy_metric"] == "next_token_disagreement"
    after = model.logits(x)
    measured = float((before.argmax(-1) != after.argmax(-1)).float().mean())
    rel = float((after - before).norm() / before.norm())
    print(f"{family} {want_mode}: next-token disagreement {r['accuracy_loss']:.4f}, logits rel err {rel:.4f}, "
          f"size {r['original_size']} -> {r['optimized_size']} bytes")
    assert r["accuracy_loss"] == pytest.approx(measured)
    assert r["accuracy_loss"] <= 0.1 and rel <= 0.05
    assert r["optimized_size"] < r["original_size"]  # the embedding (tied head) stays float
    out = runtime.inference.infer({"model_id": family, "input_data": [[5, 6, 7]], "options": {"max_tokens": 4,
                                                                                     "temperature": 0}})
    assert len(out["output_data"][0]) <= 4


def test_enable_quantization_at_load(runtime):
    model = load(runtime, "llama", enable_quantization=True)
    from msmartcompute.models.layers import QuantizedLinear

    assert any(isinstance(m, QuantizedLinear) for m in model.module.modules())
    assert len(runtime.inference.infer({"model_id": "llama", "input_text": "hello",
                              "options": {"max_tokens": 3, "temperature": 0}})["output_text"]) == 1


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_next_token_fine_tuning_lowers_the_loss_and_saves(runtime, family, tmp_path):
    model = load(runtime, family)
    data = [[3, 4, 5, 6, 7, 8, 9, 10]] * 4
    r = runtime.training.train({"model_id": family, "training_data": data, "epochs": 20, "learning_rate": 1e-2,
                       "save_path": f"trained/{family}.safetensors"})
    assert r["model_updated"] and r["loss_history"][-1] < 0.5 * r["loss_history"][0]
    trained = model.logits(torch.tensor(data[:1]))
    # the saved weights (Hugging Face names) load again beside the folder's config and tokenizer
    spec = dict(runtime.registry.entry(family).spec)
    assert spec["weights_path"].endswith(f"trained/{family}.safetensors")
    runtime.registry.unload(family)
    runtime.registry.load(spec)
    again = runtime.registry.entry(family).model
    assert torch.allclose(again.logits(torch.tensor(data[:1])), trained, atol=1e-5)
    assert again.tokenizer is not None


def test_encoder_quantizes_and_trains(runtime):
    load(runtime, "bert")
    x = calibration(4, 10)
    r = runtime.optimization.optimize("bert", {"optimization_type": "quantization", "calibration_data": x})
    assert r["accuracy_metric"] == "relative_error" and r["accuracy_loss"] <= 0.05
    runtime.registry.unload("bert")
    load(runtime, "bert")
    r = runtime.training.train({"model_id": "bert", "training_data": x, "labels": [0, 1, 2, 3], "epochs": 30,
                       "learning_rate": 1e-2})
    assert r["loss_history"][-1] < r["loss_history"][0]
