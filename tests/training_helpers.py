"""Shared data for the training / optimization tests: a learnable synthetic task."""
import numpy as np
import pytest

from api_helpers import make_runtime

BLOB_SPEC = {
    "model_id": "blobs",
    "model_type": "mlp",
    "parameters": {"input_size": 16, "hidden_sizes": [128, 128], "output_size": 4, "activation": "relu"},
}
TINY_LM_SPEC = {
    "model_id": "tiny-lm",
    "model_type": "transformer",
    "max_sequence_length": 32,
    "parameters": {"vocab_size": 32, "hidden_size": 32, "num_layers": 2, "num_heads": 4},
}
SEQUENCE = [1, 5, 9, 3, 7, 2, 8, 4, 6, 10, 11, 12]


def blobs(n=512, classes=4, dims=16, seed=0):
    """Gaussian blobs: x [n, dims] float32, class indices y [n]."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 1.0, (classes, dims))
    y = rng.integers(0, classes, n)
    x = (centers[y] + rng.normal(0.0, 0.5, (n, dims))).astype(np.float32)
    return x, y


def cross_entropy(logits, y):
    """Mean cross-entropy of class indices y under logits [n, c] (numpy, float64)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


@pytest.fixture
def rt(tmp_path):
    """A started Runtime on a fresh state dir (tests/test_training.py, tests/test_optimize.py)."""
    runtime = make_runtime(tmp_path / "state")
    yield runtime
    runtime.close()


def outputs(rt, model_id, x):
    return np.asarray(rt.inference.infer({"model_id": model_id, "input_data": x})["output_data"])
