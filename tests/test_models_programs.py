"""torchscript / exported families: a user's program file served as is."""
import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from msmartcompute.models import build_model

CPU = torch.device("cpu")
# Users still ship TorchScript; writing the fixtures uses the deprecated jit API.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(5, 4)
        self.register_buffer("shift", torch.arange(4.0))

    def forward(self, x):
        return torch.tanh(self.fc(x)) + self.shift


def save_program(kind, path, dynamic=True):
    net = Net().eval()
    if kind == "torchscript":
        torch.jit.save(torch.jit.script(net), str(path))
    else:
        example = (torch.randn(3, 5),)
        shapes = {"x": {0: torch.export.Dim("batch", max=1024)}} if dynamic else None
        torch.export.save(torch.export.export(net, example, dynamic_shapes=shapes), str(path))
    return net


@pytest.mark.parametrize("kind", ["torchscript", "exported"])
def test_program_loads_runs_and_batches(tmp_path, kind):
    path = tmp_path / ("net.pt" if kind == "torchscript" else "net.pt2")
    net = save_program(kind, path)
    model = build_model({"model_type": kind, "model_path": str(path)}, CPU)
    assert model.model_type == kind and model.dtype == torch.float32
    assert model.tensor_bytes() == 4 * (5 * 4 + 4 + 4)
    requests = [np.random.default_rng(i).standard_normal((n, 5)).astype(np.float32) for i, n in enumerate([2, 1, 3])]
    outs = model.run([model.prepare(r, {}) for r in requests])
    for r, out in zip(requests, outs):
        with torch.no_grad():
            want = net(torch.from_numpy(r)).numpy()
        np.testing.assert_allclose(out.output_data, want, rtol=1e-6, atol=1e-6)
        # alone or in a batch: the same rows, up to the float32 rounding of a different GEMM shape
        alone = model.run([model.prepare(r, {})])[0].output_data
        np.testing.assert_allclose(out.output_data, alone, rtol=1e-6, atol=1e-7)
        assert out.tokens_generated == 0


def test_exported_static_batch_runs_requests_one_by_one(tmp_path):
    path = tmp_path / "static.pt2"
    net = save_program("exported", path, dynamic=False)
    model = build_model({"model_type": "exported", "model_path": str(path)}, CPU)
    with pytest.raises(ValueError, match="exactly 3 rows"):
        model.prepare(np.zeros((2, 5)), {})
    with pytest.raises(ValueError, match="5 values"):
        model.prepare(np.zeros((3, 4)), {})
    xs = [np.random.default_rng(i).standard_normal((3, 5)) for i in range(2)]
    for x, out in zip(xs, model.run([model.prepare(x, {}) for x in xs])):
        with torch.no_grad():
            want = net(torch.from_numpy(x).float()).numpy()
        np.testing.assert_allclose(out.output_data, want, rtol=1e-6, atol=1e-6)


def test_torchscript_bad_width_is_a_value_error(tmp_path):
    path = tmp_path / "net.pt"
    save_program("torchscript", path)
    model = build_model({"model_type": "torchscript", "model_path": str(path)}, CPU)
    with pytest.raises(ValueError, match="program failed") as failed:
        model.run([model.prepare(np.zeros((2, 3)), {})])
    # the interpreter's own error, not its "The following operation failed" preamble
    assert "mat1 and mat2 shapes cannot be multiplied (2x3 and 5x4)" in str(failed.value)
    assert "TorchScript interpreter" not in str(failed.value)
    sized = build_model({"model_type": "torchscript", "model_path": str(path), "parameters": {"input_size": 5}}, CPU)
    with pytest.raises(ValueError, match="5 values"):
        sized.prepare(np.zeros((2, 3)), {})


@pytest.mark.parametrize("extra,message", [
    ({}, "needs model_path"),
    ({"model_path": "/nonexistent/net.pt"}, "does not exist"),
    ({"model_path": __file__}, "is a text file, not a TorchScript program"),
    ({"model_path": "x", "enable_quantization": True}, "enable_quantization"),
    ({"model_path": "x", "enable_mixed_precision": True}, "enable_mixed_precision"),
])
def test_program_refusals(extra, message):
    with pytest.raises(ValueError, match=message):
        build_model({"model_type": "torchscript", **extra}, CPU)


@pytest.mark.parametrize("saved,loaded_as,message", [
    ("torchscript", "exported", "is a TorchScript program .*load it as model_type 'torchscript'"),
    ("exported", "torchscript", "is an exported program .*load it as model_type 'exported'"),
    ("json", "torchscript", "is a JSON file, not a TorchScript program"),
    ("json", "exported", "is a JSON file, not an exported program"),
])
def test_a_file_of_another_kind_is_named(tmp_path, saved, loaded_as, message):
    path = tmp_path / "model.file"
    if saved == "json":
        path.write_text(json.dumps({"vocab_size": 100, "hidden_size": 16}))
    else:
        save_program(saved, path)
    with pytest.raises(ValueError, match=message) as refused:
        build_model({"model_type": loaded_as, "model_path": str(path)}, CPU)
    assert "pickle" not in str(refused.value)


def test_a_broken_exported_archive_says_why(tmp_path):
    good, bad = tmp_path / "good.pt2", tmp_path / "bad.pt2"
    save_program("exported", good)
    _rewrite_archive(good, bad, lambda name, data: b"{not json" if name.endswith("models/model.json") else data)
    with pytest.raises(ValueError, match="could not be loaded") as failed:
        build_model({"model_type": "exported", "model_path": str(bad)}, CPU)
    assert "JSONDecodeError: Expecting property name" in str(failed.value)
    assert "warnings above" not in str(failed.value)


class _Evil:
    target = None

    def __reduce__(self):
        return (open, (self.target, "w"))


def _rewrite_archive(src, dst, edit):
    """Copy the .pt2 zip at src to dst, passing every (name, bytes) through edit."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename, zin.read(info.filename)))


@pytest.mark.parametrize("attack", ["pickled_weight", "sample_inputs", "opaque_constant"])
def test_exported_archive_with_pickled_objects_is_refused(tmp_path, attack):
    """Each crafted archive creates the marker file under a plain torch.export.load (checked
    by hand on torch 2.14.1); served, it is refused and nothing runs."""
    good = tmp_path / "net.pt2"
    save_program("exported", good)
    marker = tmp_path / "pwned"
    _Evil.target = str(marker)
    buf = io.BytesIO()
    torch.save({"x": _Evil()}, buf)
    evil = buf.getvalue()

    def edit(name, data):
        if attack == "pickled_weight":
            if name.endswith("model_weights_config.json"):
                config = json.loads(data)
                config["config"]["fc.weight"]["use_pickle"] = True
                return json.dumps(config).encode()
            if name.endswith("data/weights/weight_0"):  # fc.weight's payload
                return evil
        if attack == "sample_inputs" and name.endswith("sample_inputs/model.pt"):
            return evil
        if attack == "opaque_constant":
            if name.endswith("_constants_config.json"):
                return json.dumps({"config": {"thing": {"path_name": "opaque_obj_0", "is_param": False,
                                                           "use_pickle": True, "tensor_meta": None}}}).encode()
        return data

    bad = tmp_path / "bad.pt2"
    _rewrite_archive(good, bad, edit)
    if attack == "opaque_constant":  # the payload pickle.loads would read
        with zipfile.ZipFile(bad, "a") as z:
            z.writestr(z.namelist()[0].split("/")[0] + "/data/constants/opaque_obj_0", pickle.dumps(_Evil()))
    with pytest.raises(ValueError, match="refused"):
        build_model({"model_type": "exported", "model_path": str(bad)}, CPU)
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
