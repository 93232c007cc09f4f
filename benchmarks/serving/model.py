"""The benchmarked MLPs: one definition shared by every target so they all run the same weights.

The module is a plain nn.Sequential (keys 0.weight, 0.bias, 2.weight, ...), the layout our
`mlp` model type loads, so the same safetensors file feeds our server, the bare app and TorchServe.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# name -> (input_size, hidden_sizes, output_size)
MODELS = {
    "mlp_small": (256, [512, 512], 10),     # the serving-overhead case: forward is ~0.1 ms
    "mlp_heavy": (256, [2048, 2048], 10),   # one row ~0.8 ms on this CPU: below the HTTP cost
    "mlp_xl": (256, [4096, 4096, 4096], 10),  # one row ~9 ms, 32 rows ~31 ms: batching matters
}


def build(name: str) -> nn.Sequential:
    n_in, hidden, n_out = MODELS[name]
    sizes = [n_in, *hidden, n_out]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def write_weights(name: str, folder: Path, seed: int = 0) -> Path:
    """Seeded weights saved as safetensors; returns the file."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    module = build(name)
    path = Path(folder) / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


def load(name: str, path: Path) -> nn.Sequential:
    from safetensors.torch import load_file

    module = build(name)
    module.load_state_dict(load_file(str(path)))
    return module.eval()


def load_spec(name: str, path: Path, max_batch_size: int | None = None) -> dict:
    """Our POST /models body for the same network (max_batch_size None: the server's default)."""
    n_in, hidden, n_out = MODELS[name]
    spec = {"model_id": name, "model_type": "mlp", "model_path": str(path),
            "parameters": {"input_size": n_in, "hidden_sizes": hidden, "output_size": n_out}}
    if max_batch_size is not None:
        spec["max_batch_size"] = max_batch_size
    return spec
