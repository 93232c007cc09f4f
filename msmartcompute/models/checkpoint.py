"""Weights from disk: safetensors, or a torch checkpoint read with weights_only=True
(never an arbitrary unpickle), checked tensor by tensor against the module."""
from __future__ import annotations

import pickle
import zipfile

import torch


def file_kind(path: str) -> str:
    """What a model_path file is, from its first bytes and, for a zip, its member names:
    safetensors | torchscript | exported | checkpoint | zip | pickle | json | text | binary.
    Raises OSError (FileNotFoundError, IsADirectoryError) as open() does."""
    with open(path, "rb") as f:
        head = f.read(512)
    if _is_safetensors(path):
        return "safetensors"
    if head.startswith(b"PK"):
        try:
            names = zipfile.ZipFile(path).namelist()
        except zipfile.BadZipFile:
            return "binary"
        # torch.jit.save: <root>/code/ + constants.pkl; torch.export.save: <root>/archive_format;
        # torch.save: <root>/data.pkl alone
        leaves = {n.split("/", 1)[-1] for n in names}
        if "archive_format" in leaves:
            return "exported"
        if "constants.pkl" in leaves and any(leaf.startswith("code/") for leaf in leaves):
            return "torchscript"
        return "checkpoint" if "data.pkl" in leaves else "zip"
    if head[:1] == b"\x80":  # pickle protocol 2+ (torch.save's legacy format too)
        return "pickle"
    text = head.lstrip()
    if text[:1] in (b"{", b"["):
        return "json"
    if b"\x00" in head:
        return "binary"
    try:
        head.decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "binary"


_KIND_WORDS = {
    "safetensors": "a safetensors weights file", "torchscript": "a TorchScript program (torch.jit.save)",
    "exported": "an exported program (torch.export.save, .pt2)", "checkpoint": "a torch checkpoint (torch.save)",
    "zip": "a zip archive that torch did not write", "pickle": "a Python pickle", "json": "a JSON file",
    "text": "a text file", "binary": "a binary file of an unknown format",
}


def describe_kind(kind: str) -> str:
    return _KIND_WORDS[kind]


def _is_safetensors(path: str) -> bool:
    # Layout: 8-byte little-endian header length, then a JSON header starting with "{".
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The name -> tensor mapping stored at `path`, on the CPU. Raises ValueError."""
    try:
        kind = file_kind(path)
        if kind == "safetensors":
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        if kind not in ("checkpoint", "pickle"):
            hint = {"json": " (sizes go in `parameters`, not in model_path)",
                    "torchscript": " (or load it as model_type 'torchscript')",
                    "exported": " (or load it as model_type 'exported')"}.get(kind, "")
            raise ValueError(f"model_path {path!r} is {describe_kind(kind)}, not weights: give a .safetensors "
                             f"file or a torch.save checkpoint of the state dict{hint}")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"model_path {path!r} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"model_path {path!r} is a directory, not a weights file") from None
    except ValueError:
        raise
    except pickle.UnpicklingError as exc:
        # weights_only refused a global: the file would run code or build arbitrary objects.
        raise ValueError(f"model_path {path!r} is not a weights-only checkpoint and was refused "
                         f"(it holds more than tensors): {_unpickler_reason(exc)}") from None
    except Exception as exc:  # a corrupt or foreign file: say so, keep the cause
        raise ValueError(f"model_path {path!r} could not be read as safetensors or a torch "
                         f"checkpoint: {type(exc).__name__}: {exc}") from None
    # Accept a bare state dict, or the common {"state_dict": ...} / {"model": ...} wrapper.
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model"):
        obj = next(iter(obj.values()))
    if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"model_path {path!r} does not hold a state dict (a mapping of names to tensors)")
    return obj


def _unpickler_reason(exc: Exception) -> str:
    """The line of torch's weights_only message that names what was refused."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.endswith("WeightsUnpickler error:") and i + 1 < len(lines):
            return lines[i + 1]
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()
    return lines[0] if lines else type(exc).__name__


def check_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise ValueError naming the first mismatched tensor (missing, unexpected or shape)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise ValueError(f"checkpoint does not match the model parameters: missing tensor {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise ValueError(f"checkpoint does not match the model parameters: unexpected tensor "
                         f"{unexpected[0]!r}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for name, want in expected.items():
        got = state[name]
        if got.shape != want.shape:
            raise ValueError(f"checkpoint does not match the model parameters: tensor {name!r} has shape "
                             f"{tuple(got.shape)}, the model needs {tuple(want.shape)}")
        if want.is_floating_point() and not got.is_floating_point():
            raise ValueError(f"checkpoint tensor {name!r} is {got.dtype}, the model needs floating point")


def load_checkpoint(module: torch.nn.Module, path: str) -> None:
    state = read_state_dict(path)
    check_state_dict(module, state)
    module.load_state_dict(state, strict=True)
