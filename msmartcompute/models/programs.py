"""torchscript / exported: a user's own program file, served as is.

torchscript: torch.jit.load of a TorchScript archive. exported: torch.export.load of a
.pt2 ExportedProgram. Float rows in ([rows, width], float32), rows out (the program's
output flattened to [rows, -1]). The program decides its own precision and weights, so
enable_quantization / enable_mixed_precision are refused rather than ignored; an exported
program whose batch dimension is static runs each request on its own."""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import threading
import warnings
import zipfile

import torch

from .base import Output, Prepared, ServedModel, float_rows, is_out_of_memory, to_numpy
from .checkpoint import describe_kind, file_kind
from .spec import flag, tensor_cores


_force_lock = threading.Lock()


@contextlib.contextmanager
def _weights_only_everywhere():
    """torch.export.load unpickles parts of a .pt2 with weights_only=False (pickled weights,
    sample inputs, a fallback in its deserializer): a crafted archive would run code. Torch's
    own switch makes every torch.load in the block weights-only."""
    with _force_lock:
        before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        try:
            yield
        finally:
            if before is None:
                del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
            else:
                os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def _refuse_plain_pickles(path: str) -> None:
    """A .pt2 may hold 'opaque objects', read with a plain pickle.loads: refused unread."""
    try:
        names = zipfile.ZipFile(path).namelist()
    except (zipfile.BadZipFile, OSError):
        return  # not an archive: torch.export.load refuses it with its own message
    bad = [n for n in names if "/opaque_obj_" in n or n.startswith("opaque_obj_")]
    if bad:
        raise ValueError(f"model_path {path!r} was refused: it holds pickled Python objects ({bad[0]}); "
                         "only tensors and graph code are accepted in an exported program")


def error_line(exc: BaseException) -> str:
    """The line of a torch error that says what went wrong. TorchScript puts its two tracebacks
    first and the real error ("RuntimeError: mat1 and mat2 shapes cannot be multiplied ...")
    last; most other errors say it first."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].startswith("The following operation failed in the TorchScript interpreter"):
        return lines[-1]
    return lines[0].split(" This is an internal miniz error.")[0]


class _LastLoggedError(logging.Handler):
    """torch.export.load logs the real cause of a failure as a warning, then raises "check the
    warnings above": this keeps that cause so the error can say it."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.cause: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.cause = record.exc_info[1]


@contextlib.contextmanager
def _export_load_cause():
    handler = _LastLoggedError()
    logger = logging.getLogger("torch.export")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def _check_file(kind: str, path: str) -> None:
    """Refuse a file of another kind before torch reads it, saying what it is."""
    found = file_kind(path)
    if found != kind:
        hint = {"torchscript": " (load it as model_type 'torchscript')",
                "exported": " (load it as model_type 'exported')",
                "json": " (model sizes go in `parameters`, not in model_path)"}.get(found, "")
        raise ValueError(f"model_path {path!r} is {describe_kind(found)}, not "
                         f"{describe_kind(kind)}{hint}")


def _load(kind: str, path: str, device: torch.device):
    try:
        _check_file(kind, path)
    except FileNotFoundError:
        raise ValueError(f"model_path {path!r} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"model_path {path!r} is a directory, not {describe_kind(kind)}") from None
    if kind == "exported":
        _refuse_plain_pickles(path)
    try:
        if kind == "torchscript":
            with warnings.catch_warnings():  # TorchScript is deprecated upstream; still served
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(path, map_location=device), None
        with _weights_only_everywhere(), _export_load_cause() as logged:
            try:
                program = torch.export.load(path)
            except RuntimeError:
                if logged.cause is None:
                    raise
                raise logged.cause from None
        return program.module().to(device), program
    except pickle.UnpicklingError as exc:  # weights_only refused a payload
        raise ValueError(f"model_path {path!r} was refused: it holds pickled Python objects, and "
                         f"programs may only hold tensors ({str(exc).splitlines()[0]})") from None
    except Exception as exc:
        raise ValueError(f"model_path {path!r} could not be loaded as {describe_kind(kind)}: "
                         f"{type(exc).__name__}: {error_line(exc)}") from None


def _input_shape(program) -> list[int | None] | None:
    """The exported program's one user input shape (None for a dynamic dim)."""
    user_inputs = program.graph_signature.user_inputs
    if len(user_inputs) != 1:
        raise ValueError(f"an exported program must take one tensor input, this one takes {len(user_inputs)}")
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name == user_inputs[0]:
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise ValueError("an exported program's input must be a tensor")
            return [d if isinstance(d, int) else None for d in val.shape]
    return None


class ProgramModel(ServedModel):
    def __init__(self, spec: dict, device: torch.device, kind: str):
        self.model_type = kind
        path = spec.get("model_path")
        if not path:
            raise ValueError(f"a {kind} model needs model_path (the program file)")
        for name in ("enable_quantization", "enable_mixed_precision"):
            if flag(spec, name):
                raise ValueError(f"{name} cannot be applied to a {kind} program: it is served as is "
                                 "(convert it before saving)")
        self.device = device
        self.dtype = torch.float32
        self.tensor_cores = flag(spec, "enable_tensor_cores")
        self.module, program = _load(kind, path, device)
        width = (spec.get("parameters") or {}).get("input_size")
        self.static_batch = None
        if program is not None:
            shape = _input_shape(program)
            if shape is not None:
                if len(shape) != 2:
                    raise ValueError(f"an exported program served on rows must take a 2-D input, "
                                     f"this one takes shape {shape}")
                self.static_batch, width = shape[0], shape[1] if shape[1] is not None else width
        self.input_size = width

    def prepare(self, input_data, options: dict) -> Prepared:
        x = float_rows(input_data, self.input_size)  # [rows, width]
        if self.static_batch is not None and x.shape[0] != self.static_batch:
            raise ValueError(f"this exported program takes exactly {self.static_batch} rows, got {x.shape[0]}")
        return Prepared(tensor=x.to(self.device), options=dict(options or {}),
                        batch_key=("rows", x.shape[1]), rows=x.shape[0])

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, width] -> [N, -1]."""
        try:
            with tensor_cores(self.tensor_cores, self.device):
                y = self.module(x)
        except (RuntimeError, AssertionError) as exc:  # the program rejected this input (shape, guard, ...)
            if is_out_of_memory(exc):  # out of memory is not bad input: the runtime maps it
                raise
            raise ValueError(f"the {self.model_type} program failed on input of shape {tuple(x.shape)}: "
                             f"{error_line(exc)}") from None
        if isinstance(y, (tuple, list)) and len(y) == 1:
            y = y[0]
        if not isinstance(y, torch.Tensor) or y.dim() == 0 or y.shape[0] != x.shape[0]:
            raise ValueError(f"the {self.model_type} program must return one tensor with a row per input "
                             f"row ({x.shape[0]}), got {type(y).__name__} "
                             f"{tuple(y.shape) if isinstance(y, torch.Tensor) else ''}")
        return y.reshape(y.shape[0], -1)

    def run(self, batch: list[Prepared]) -> list[Output]:
        if self.static_batch is not None:  # the program's batch size is fixed: one request at a time
            parts = [self._forward(p.tensor) for p in batch]
        else:
            parts = self._forward(torch.cat([p.tensor for p in batch])).split([p.rows for p in batch])
        return [Output(output_data=to_numpy(part), tokens_generated=0) for part in parts]
