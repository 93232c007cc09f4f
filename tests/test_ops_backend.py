"""backend="auto": measured once per (op, device, key), cached, overridable, visible."""
import json
import logging
import time

import pytest
import torch

from msmartcompute import ops
from msmartcompute.ops import _backend


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.delenv("MSC_KERNEL_BACKEND", raising=False)
    monkeypatch.delenv("MSC_KERNEL_CACHE", raising=False)
    _backend.clear_backend_choices()
    yield
    _backend.clear_backend_choices()


def choices(op):
    return [c for c in ops.backend_choices() if c["op"] == op]


def test_auto_measures_each_candidate_once_per_bucket():
    x = torch.randn(16, 4096)
    q, scale = ops.quantize_int8(x)
    [entry] = choices("quantize_int8")
    assert set(entry["times_us"]) == set(_backend.auto_candidates(torch.device("cpu")))
    assert entry["backend"] == min(entry["times_us"], key=entry["times_us"].get)
    # same bucket (rows 9..16, cols 2049..4096): the cached choice, nothing measured again
    ops.quantize_int8(torch.randn(11, 4000))
    assert len(choices("quantize_int8")) == 1
    ops.quantize_int8(torch.randn(300, 4096))  # another bucket
    assert len(choices("quantize_int8")) == 2


def test_auto_returns_the_fastest_candidate_and_its_result():
    def slow():
        time.sleep(0.003)
        return "slow"

    impls = {"cpu": slow, "torch": lambda: "fast", "cuda": "no CUDA here"}
    assert _backend.dispatch("toy_op", None, torch.device("cpu"), ("k",), impls) == "fast"
    [entry] = choices("toy_op")
    assert entry["backend"] == "torch" and entry["times_us"]["cpu"] > entry["times_us"]["torch"]
    assert entry["samples"] == _backend._Choices.CLEAR_AFTER  # a clear winner (3 ms vs ~0) ends it early
    assert _backend.dispatch("toy_op", None, torch.device("cpu"), ("k",), impls) == "fast"


def test_close_candidates_are_measured_in_full_and_interleaved():
    calls = []

    def work(name):
        calls.append(name)
        time.sleep(0.001)
        return name

    out = _backend.dispatch("toy_op", None, torch.device("cpu"), ("k",),
                            {"cpu": lambda: work("cpu"), "torch": lambda: work("torch")})
    [entry] = choices("toy_op")
    assert out == entry["backend"] and entry["samples"] >= _backend._Choices.MIN_REPS
    assert set(entry["spread"]) == {"cpu", "torch"}
    timed = calls[2 * _backend._Choices.WARMUP:]  # after the warm-up: one call each per round
    assert all(set(timed[i:i + 2]) == {"cpu", "torch"} for i in range(0, len(timed) - 1, 2))


def test_a_failing_candidate_is_skipped_and_recorded():
    def broken():
        raise RuntimeError("kernel refused the shape")

    out = _backend.dispatch("toy_op", None, torch.device("cpu"), ("k",), {"cpu": broken, "torch": lambda: 7})
    assert out == 7
    [entry] = choices("toy_op")
    assert "kernel refused the shape" in entry["errors"]["cpu"]


def test_named_backend_is_not_measured(monkeypatch):
    x = torch.randn(16, 256)
    ops.quantize_int8(x, backend="torch")
    monkeypatch.setenv("MSC_KERNEL_BACKEND", "cpu")
    ops.quantize_int8(x)
    assert choices("quantize_int8") == []
    with pytest.raises(ValueError, match="cannot run these inputs: no CUDA"):
        _backend.dispatch("toy_op", "cpu", torch.device("cpu"), (), {"cpu": "no CUDA", "torch": lambda: 1})


def test_choice_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="msmartcompute.ops"):
        ops.dequantize_int8(*ops.quantize_int8(torch.randn(8, 64)))
    assert any("auto backend: dequantize_int8 on cpu" in r.getMessage() for r in caplog.records)


def test_choices_persist_on_disk(tmp_path, monkeypatch):
    path = tmp_path / "choices.json"
    monkeypatch.setenv("MSC_KERNEL_CACHE", str(path))
    ops.quantize_int8(torch.randn(4, 128))
    saved = json.loads(path.read_text())
    assert [e["op"] for e in saved] == ["quantize_int8"]
    _backend.clear_backend_choices()  # a new process, as far as the table knows
    ops.quantize_int8(torch.randn(4, 128))
    assert choices("quantize_int8") == saved  # loaded, not measured again


def test_every_op_goes_through_auto():
    x = torch.randn(8, 64)
    q, s = ops.quantize_int8(x)
    ops.dequantize_int8(q, s)
    ops.int8_matmul(q, q, s, s)
    ops.int8_linear(x, q, s)
    ops.mixed_gemm(x, x)
    ops.fused_attention(torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16))
    assert {c["op"] for c in ops.backend_choices()} == {"quantize_int8", "dequantize_int8", "int8_matmul",
                                                        "int8_linear", "mixed_gemm", "fused_attention"}
