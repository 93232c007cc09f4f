"""What every served model is: the ServedModel face the runtime calls, and the
shared rules for turning one request's input_data into a checked tensor."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Prepared:
    tensor: torch.Tensor            # this request's rows, on the model's device
    options: dict                   # normalised options (temperature, top_p, max_tokens, seed, ...)
    batch_key: tuple                # requests with equal batch_key may share one run() call
    rows: int                       # number of rows this request contributes
    sampling: object = None         # decoders: the request's models.sampling.SamplingParams
    lengths: "list[int] | None" = None  # decoders: each row's prompt length when rows are left-padded

    def prompts(self) -> list[list[int]]:
        """A decoder request's prompt rows without their left padding."""
        rows = self.tensor.tolist()
        return rows if self.lengths is None else [r[len(r) - n:] for r, n in zip(rows, self.lengths)]


@dataclass
class Output:
    output_data: "np.ndarray | list[list]"  # the rows to return for this request
    tokens_generated: int           # real count (0 for non-generative models)
    finish_reasons: "list[str] | None" = None  # per generated row: "stop" (end of sequence) or "length"
    texts: "list[str] | None" = None  # decoders with a tokenizer: each row's text, cut before a stop string


class ServedModel:
    """A loaded model. Subclasses set the attributes and implement prepare/run; a family that
    can be trained or optimized also says how (the runtime never branches on model_type)."""

    model_type: str
    module: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    trainable = False           # POST /training may fit it
    optimizable = False         # POST /models/{id}/optimize may convert it
    language_model = False      # outputs are next-token logits [N, S, V]: trained and measured per token

    def data_rows(self, data) -> torch.Tensor:
        """Training or calibration rows as a CPU tensor the module takes; raises ValueError."""
        raise ValueError(f"a {self.model_type} model takes no training or calibration data")

    def outputs(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The differentiable forward of `module` (this model's or a converted copy) on data_rows,
        float32: what training losses and accuracy checks compare."""
        return module(x).float()

    @property
    def output_width(self) -> int:
        """Values per output row: the width labels must have."""
        raise NotImplementedError

    def tensor_bytes(self) -> int:
        """Measured bytes of every parameter and buffer (int8 weights count 1 byte each)."""
        return module_bytes(self.module)

    tokenizer = None                # models.tokenizer.Tokenizer, for checkpoints that ship one

    def encode_text(self, texts, add_special_tokens: bool = True) -> list[list[int]]:
        """input_text (a list of strings, one row each) -> token id rows (any lengths).
        add_special_tokens=False for a prompt a chat template has already framed."""
        if self.tokenizer is None:
            raise ValueError(f"this {self.model_type} model has no tokenizer: send token ids in input_data "
                             "(a checkpoint folder with tokenizer.json, or GPT-2's vocab.json + merges.txt, "
                             "brings one)")
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("input_text must be a string or a non-empty list of strings")
        rows = self.tokenizer.encode_batch(texts, add_special_tokens)
        empty = next((i for i, r in enumerate(rows) if not r), None)
        if empty is not None:
            raise ValueError(f"input_text[{empty}] encodes to no tokens")
        return rows

    def decode_text(self, output_data) -> list[str] | None:
        """Generated id rows -> text, one string per row; None when outputs are not tokens."""
        return None

    def weights_to_save(self, module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], str]:
        """Trained weights to write (name -> tensor) and the spec key the saved file goes under,
        so that loading the spec again builds the trained model."""
        return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, "model_path"

    def prepare(self, input_data, options: dict) -> Prepared:
        raise NotImplementedError

    def run(self, batch: list[Prepared]) -> list[Output]:
        raise NotImplementedError


def is_out_of_memory(exc: BaseException) -> bool:
    """Out of memory, on any device: CUDA's OutOfMemoryError, Python's MemoryError, or the plain
    RuntimeError torch raises when a host allocation fails."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def module_bytes(module: torch.nn.Module) -> int:
    seen: set[int] = set()  # a tied tensor counts once
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# ---- input rules shared by the model families ------------------------------------------------
# input_data must be a non-empty 2-D rectangular array of numbers (a list of rows). Float input
# may not hold NaN or Inf (refused: a non-finite value would silently poison a shared batch).
# Token ids must be integers (integral floats such as 3.0 are accepted) in [0, vocab_size).

def _as_array(input_data) -> np.ndarray:
    try:
        arr = np.asarray(input_data)
    except ValueError as exc:  # numpy: "inhomogeneous shape"
        raise ValueError(f"input_data must be rectangular: every row the same length ({exc})") from None
    if arr.dtype == object:
        raise ValueError("input_data must be rectangular rows of numbers")
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"input_data must hold numbers, got {arr.dtype.name} values")
    if arr.ndim != 2:
        raise ValueError(f"input_data must be a list of rows (2-D), got {arr.ndim}-D "
                         f"shape {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"input_data must have at least one row and one column, got shape {arr.shape}")
    return arr


def float_rows(input_data, width: int | None = None) -> torch.Tensor:
    """[rows, width] float32 CPU tensor from one request's input_data."""
    arr = _as_array(input_data)
    if width is not None and arr.shape[1] != width:
        raise ValueError(f"input_data rows must have {width} values (the model's input_size), "
                         f"got {arr.shape[1]}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    # numpy, not torch: on a serving thread a torch op here cost ~10% of a request (GIL hand-off)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.argwhere(~finite)[0].tolist()
        raise ValueError(f"input_data holds a NaN or infinite value (row {bad[0]}, column {bad[1]}); "
                         "only finite numbers are accepted")
    return torch.from_numpy(arr)


def token_rows(input_data, vocab_size: int, max_length: int) -> torch.Tensor:
    """[rows, seq] int64 CPU tensor of token ids from one request's input_data."""
    arr = _as_array(input_data)
    if arr.dtype.kind == "f":  # integral floats (1.0) are token ids too
        integral = np.isfinite(arr) & (arr == np.round(arr))
        if not integral.all():
            row, col = np.argwhere(~integral)[0].tolist()
            raise ValueError(f"this model reads input_data as token ids: integers in [0, {vocab_size}) "
                             f"(its vocab_size); got {arr[row, col]:g} at row {row}, column {col}. "
                             "Rows of float features go to an mlp model")
        arr = arr.astype(np.int64)
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))
    low, high = int(t.min()), int(t.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is out of range: ids must lie in [0, {vocab_size}) "
                         "(the model's vocab_size)")
    if t.shape[1] > max_length:
        raise ValueError(f"sequence length {t.shape[1]} exceeds the model's limit of {max_length}")
    return t


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A result tensor as the rows to return: float32 for floats, int64 for ids."""
    t = t.detach().cpu()
    return (t.float() if t.is_floating_point() else t.long()).numpy()
