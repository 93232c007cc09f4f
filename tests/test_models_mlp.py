"""mlp model family: building, batching, checkpoints, validation, int8 and bf16."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from msmartcompute.models import build_model
from msmartcompute.models.layers import QuantizedLinear

CPU = torch.device("cpu")


def spec(**kw):
    base = {"model_id": "m", "model_type": "mlp",
            "parameters": {"input_size": 7, "hidden_sizes": [13, 5], "output_size": 3, "activation": "gelu"}}
    base.update(kw)
    return base


def sequential(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 13), nn.GELU(), nn.Linear(13, 5), nn.GELU(), nn.Linear(5, 3))


def run_one(model, rows, options=None):
    return model.run([model.prepare(rows, options or {})])[0]


def test_builds_and_batched_equals_single():
    model = build_model(spec(), CPU)
    assert model.model_type == "mlp" and model.dtype == torch.float32
    reqs = [np.random.default_rng(i).standard_normal((n, 7)).astype(np.float32) for i, n in enumerate([1, 4, 2])]
    prepared = [model.prepare(r, {}) for r in reqs]
    assert len({p.batch_key for p in prepared}) == 1
    batched = model.run(prepared)
    for r, out in zip(reqs, batched):
        alone = run_one(model, r)
        assert out.output_data.shape == (r.shape[0], 3) and out.tokens_generated == 0
        np.testing.assert_allclose(out.output_data, alone.output_data, rtol=1e-5, atol=1e-6)


def test_same_seed_same_weights_other_seed_differs():
    x = [[0.5] * 7]
    a = run_one(build_model(spec(seed=3), CPU), x).output_data
    b = run_one(build_model(spec(seed=3), CPU), x).output_data
    c = run_one(build_model(spec(seed=4), CPU), x).output_data
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_loads_plain_sequential_state_dict(tmp_path, fmt):
    seq = sequential()
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file(seq.state_dict(), str(path))
    else:
        torch.save(seq.state_dict(), path)
    model = build_model(spec(model_path=str(path)), CPU)
    x = torch.randn(6, 7)
    with torch.no_grad():
        want = seq(x).numpy()
    np.testing.assert_array_equal(run_one(model, x.numpy()).output_data, want)


@pytest.mark.parametrize("change,named", [
    (lambda sd: sd.pop("2.bias"), "'2.bias'"),
    (lambda sd: sd.__setitem__("9.weight", torch.zeros(1)), "'9.weight'"),
    (lambda sd: sd.__setitem__("4.weight", torch.zeros(3, 6)), "'4.weight'"),
])
def test_mismatched_checkpoint_names_the_tensor(tmp_path, change, named):
    sd = dict(sequential().state_dict())
    change(sd)
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=named):
        build_model(spec(model_path=str(path)), CPU)


class _Evil:
    target = None

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused(tmp_path, writer):
    import pickle

    marker = tmp_path / "pwned"
    _Evil.target = str(marker)
    path = tmp_path / "evil.bin"
    payload = {"0.weight": _Evil()}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    assert not marker.exists()
    with pytest.raises(ValueError, match="refused"):
        build_model(spec(model_path=str(path)), CPU)
    assert not marker.exists()


def test_a_json_model_path_is_called_json_not_a_pickle(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"input_size": 7}')
    with pytest.raises(ValueError, match="is a JSON file, not weights") as refused:
        build_model(spec(model_path=str(path)), CPU)
    assert "pickle" not in str(refused.value) and "refused" not in str(refused.value)


@pytest.mark.parametrize("data,message", [
    ([[1.0] * 6], "7 values"),
    ([[1.0] * 7, [1.0] * 6], "rectangular"),
    ([[1.0] * 6 + [float("nan")]], "NaN"),
    ([[1.0] * 6 + [float("inf")]], "NaN or infinite"),
    ([["a"] * 7], "numbers"),
    ([1.0] * 7, "2-D"),
    ([], "2-D|at least one row"),
])
def test_prepare_refuses_bad_input(data, message):
    model = build_model(spec(), CPU)
    with pytest.raises(ValueError, match=message):
        model.prepare(data, {})


@pytest.mark.parametrize("params,message", [
    ({"input_size": 0, "output_size": 2}, "input_size"),
    ({"input_size": 2}, "output_size"),
    ({"input_size": 2, "output_size": 2, "hidden_sizes": [3, "x"]}, "hidden_sizes"),
    ({"input_size": 2, "output_size": 2, "activation": "swish"}, "activation"),
])
def test_bad_parameters_raise(params, message):
    with pytest.raises(ValueError, match=message):
        build_model({"model_type": "mlp", "parameters": params}, CPU)


def test_unknown_model_type():
    with pytest.raises(ValueError, match="unknown model_type"):
        build_model({"model_type": "rnn"}, CPU)


def test_tensor_bytes_is_measured():
    model = build_model(spec(), CPU)
    n = sum(p.numel() for p in model.module.parameters())
    assert model.tensor_bytes() == 4 * n
    q = build_model(spec(enable_quantization=True), CPU)
    weights = 7 * 13 + 13 * 5 + 5 * 3
    outs = 13 + 5 + 3
    assert q.tensor_bytes() == weights + 4 * outs + 4 * outs  # int8 weights, fp32 scales and biases


def _int8_error_bound(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |quantized - fp32| output, propagated layer by layer.

    Per layer y = W h: |Wq hq - W h| <= |Wq| |hq - h| + |Wq - W| |h|, with |Wq - W| <= scale / 2
    per output channel (round to nearest), and GELU's slope bounded by 1.13 in magnitude.
    fp32 rounding of both paths adds a few ulps of the magnitudes involved."""
    eps = torch.finfo(torch.float32).eps
    h, err = x.abs(), torch.zeros_like(x)
    for layer in seq:
        if isinstance(layer, nn.Linear):
            w = layer.weight.detach()
            scale = w.abs().amax(dim=1) / 127
            wq = QuantizedLinear.from_linear(layer).dequantized_weight(torch.float32).abs()
            mag = h @ wq.T
            err = err @ wq.T + h.sum(dim=1, keepdim=True) * scale / 2 + 8 * eps * mag
            h = (h @ w.abs().T) + layer.bias.detach().abs()
        else:
            err = 1.13 * err
    return err


def test_quantized_output_within_int8_bound(tmp_path):
    seq = sequential()
    path = tmp_path / "w.safetensors"
    save_file(seq.state_dict(), str(path))
    model = build_model(spec(model_path=str(path), enable_quantization=True), CPU)
    assert sum(isinstance(m, QuantizedLinear) for m in model.module.modules()) == 3
    x = torch.randn(16, 7)
    got = torch.from_numpy(run_one(model, x.numpy()).output_data)
    with torch.no_grad():
        want = seq(x)
    bound = _int8_error_bound(seq, x)
    assert ((got - want).abs() <= bound).all()
    assert (got - want).abs().max() > 0  # it really ran int8 weights


def test_mixed_precision_runs_in_bf16(tmp_path):
    seq = sequential()
    path = tmp_path / "w.pt"
    torch.save(seq.state_dict(), path)
    model = build_model(spec(model_path=str(path), enable_mixed_precision=True), CPU)
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.module.parameters())
    x = torch.randn(5, 7)
    with torch.no_grad():
        want = seq.to(torch.bfloat16)(x.to(torch.bfloat16)).float().numpy()
    out = run_one(model, x.numpy()).output_data
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, want)
