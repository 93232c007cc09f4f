"""Hugging Face-format checkpoints: the folder (config.json, weights, tokenizer files) and
its tensors, read one at a time straight into the model's own parameters.

Weights: `model.safetensors`, a sharded `model.safetensors.index.json`, `pytorch_model.bin`
(or its sharded index), or any single `.safetensors` / `.bin` file. Safetensors files are
read with positioned reads (`os.preadv`) into the destination tensor itself, so the only
host memory beside the model is one tensor's staging buffer when the dtype or device
differs: no mmap pages, no second copy of the checkpoint. `.bin` files are torch zip
archives read with `torch.load(mmap=True, weights_only=True)`, never an arbitrary unpickle.

A model says where each checkpoint tensor goes with `weight_targets()`: checkpoint name ->
Target (a view of one of its parameters, and whether the stored matrix is transposed, as
GPT-2's Conv1D weights are). `load_weights` fills every target or names what is missing,
unexpected or mis-shaped."""
from __future__ import annotations

import json
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .spec import SpecError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as exc:
        raise SpecError("model_path", f"{path.name} in the checkpoint folder could not be read: {exc}") from None
    if not isinstance(value, dict):
        raise SpecError("model_path", f"{path.name} in the checkpoint folder must hold a JSON object")
    return value


def is_folder(path: str | None) -> bool:
    return bool(path) and os.path.isdir(path)


def read_config(folder: str) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise SpecError("model_path", f"model_path {folder!r} is a folder without config.json "
                                      "(a Hugging Face-format checkpoint folder needs one)")
    return read_json(path)


def weight_files(path: str) -> list[Path]:
    """The weight files of a checkpoint folder (shards in index order), or [path] for a file."""
    p = Path(path)
    if p.is_file():
        return [p]
    for name in WEIGHT_FILES:
        candidate = p / name
        if not candidate.is_file():
            continue
        if name.endswith(".index.json"):
            weight_map = read_json(candidate).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise SpecError("model_path", f"{name} has no weight_map")
            shards = list(dict.fromkeys(weight_map.values()))
            for shard in shards:
                if not isinstance(shard, str) or "/" in shard or not (p / shard).is_file():
                    raise SpecError("model_path", f"{name} names shard {shard!r}, which is not in the folder")
            return [p / s for s in shards]
        return [candidate]
    raise SpecError("model_path", f"checkpoint folder {path!r} holds none of {', '.join(WEIGHT_FILES)}")


# ---- reading tensors ---------------------------------------------------------------------------

@dataclass
class StoredTensor:
    """One tensor of a checkpoint, not yet read."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    _read: object  # callable(out: torch.Tensor) filling a contiguous CPU tensor of shape/dtype

    def read_into(self, out: torch.Tensor) -> None:
        self._read(out)


def _safetensors_tensors(path: Path) -> Iterator[StoredTensor]:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise SpecError("model_path", f"{path.name} is not a safetensors file (too short)")
        header_len = struct.unpack("<Q", head)[0]
        if header_len > min(size - 8, 100 << 20):
            raise SpecError("model_path", f"{path.name} is not a safetensors file (bad header length)")
        try:
            header = json.loads(os.pread(fd, header_len, 8))
        except ValueError as exc:
            raise SpecError("model_path", f"{path.name} has a corrupt safetensors header: {exc}") from None
        base = 8 + header_len
        header.pop("__metadata__", None)
        for name, info in header.items():
            dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise SpecError("model_path", f"{path.name}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            start, end = info["data_offsets"]
            shape = tuple(info["shape"])
            nbytes = end - start
            if nbytes != torch.Size(shape).numel() * dtype.itemsize or base + end > size:
                raise SpecError("model_path", f"{path.name}: tensor {name!r} has inconsistent offsets")

            def read(out: torch.Tensor, offset=base + start, nbytes=nbytes, name=name) -> None:
                view = memoryview(out.view(torch.uint8).numpy()).cast("B") if nbytes else memoryview(b"")
                done = 0
                while done < nbytes:
                    n = os.preadv(fd, [view[done:]], offset + done)
                    if n <= 0:
                        raise SpecError("model_path", f"{path.name}: tensor {name!r} is truncated")
                    done += n

            yield StoredTensor(name, shape, dtype, read)
    finally:
        os.close(fd)


def _torch_tensors(path: Path) -> Iterator[StoredTensor]:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # an old (non-zip) torch file cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise SpecError("model_path", f"{path.name} is not a weights-only checkpoint and was refused "
                                      f"(it holds more than tensors): {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # a corrupt or foreign file
        raise SpecError("model_path", f"{path.name} could not be read as safetensors or a torch checkpoint: "
                                      f"{type(exc).__name__}: {exc}") from None
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model"):
        obj = next(iter(obj.values()))
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise SpecError("model_path", f"{path.name} does not hold a state dict (a mapping of names to tensors)")
    for name in list(obj):
        t = obj.pop(name)
        yield StoredTensor(name, tuple(t.shape), t.dtype, lambda out, t=t: out.copy_(t))


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def stored_tensors(path: str) -> Iterator[StoredTensor]:
    """Every tensor of the checkpoint at `path` (folder or file), lazily, shard by shard."""
    for file in weight_files(path):
        try:
            safetensors = _is_safetensors(file)
        except OSError as exc:
            raise SpecError("model_path", f"{file} could not be read: {exc}") from None
        yield from (_safetensors_tensors(file) if safetensors else _torch_tensors(file))


def tensor_names(path: str) -> list[str]:
    """The tensor names of a checkpoint (reads headers only for safetensors)."""
    return [t.name for t in stored_tensors(path)]


# ---- filling a model ---------------------------------------------------------------------------

@dataclass
class Target:
    tensor: torch.Tensor        # where the values go: a parameter, or a row block of one
    transposed: bool = False    # stored as [in, out] (GPT-2 Conv1D): transpose on the way in


def load_weights(body: dict[str, Target], head: dict[str, Target], path: str,
                 prefixes: tuple[str, ...] = (), ignored: tuple[str, ...] = ()) -> None:
    """Fill every target from the checkpoint at `path`. `body` names are the base model's
    (the checkpoint may carry them under one of `prefixes`, as "model." in LlamaForCausalLM);
    `head` names (lm_head) are taken as is. Names ending in one of `ignored` (buffers older
    exporters saved, heads the served model does not use) are skipped.
    Raises SpecError naming the first missing, unexpected or mis-shaped tensor."""
    names = tensor_names(path)
    prefix = next((p for p in prefixes if any(n.startswith(p) for n in names)), "")
    targets = {prefix + k: v for k, v in body.items()} | head
    filled: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for stored in stored_tensors(path):
            target = targets.get(stored.name)
            if target is None:
                if not stored.name.endswith(ignored):
                    unexpected.append(stored.name)
                continue
            dest = target.tensor
            want = tuple(dest.shape[::-1] if target.transposed else dest.shape)
            if stored.shape != want:
                raise SpecError("model_path", f"checkpoint tensor {stored.name!r} has shape {stored.shape}, "
                                              f"the model (from its config) needs {want}")
            if not stored.dtype.is_floating_point and dest.is_floating_point():
                raise SpecError("model_path", f"checkpoint tensor {stored.name!r} is {stored.dtype}, "
                                              "the model needs floating point")
            direct = (not target.transposed and dest.device.type == "cpu" and dest.dtype == stored.dtype
                      and dest.is_contiguous())
            if direct:
                stored.read_into(dest)
            else:  # one tensor's staging buffer, then convert / transpose / move
                staging = torch.empty(stored.shape, dtype=stored.dtype)
                stored.read_into(staging)
                dest.copy_(staging.t() if target.transposed else staging)
                del staging
            filled.add(stored.name)
    if unexpected:
        raise SpecError("model_path", f"checkpoint does not match the architecture: unexpected tensor "
                                      f"{unexpected[0]!r}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    missing = [name for name in targets if name not in filled]
    if missing:
        raise SpecError("model_path", f"checkpoint does not match the architecture: missing tensor {missing[0]!r}"
                                      + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
