"""What the attention suites (fused, varlen, paged) share: the devices and dtypes they run, the
tolerance rule, and the generator of their (device, backend, dtype, shape, ...) cases."""
import pytest
import torch

from msmartcompute import ops

DEVICES = ["cpu", "cuda"]  # the cuda cases are collected everywhere and skipped without a GPU (conftest)
DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.float16, torch.bfloat16]}
# The Triton interpreter is slow and gets bf16 wrong: small shapes, float32/float16 there.
INTERPRETER_DTYPES = [torch.float32, torch.float16]
CAUSAL = [((False,), ""), ((True,), "-causal")]  # variants: extra parameters, id suffix


def interpreted(device, backend):
    return backend == "triton" and device == "cpu"


def backends(device, schema):
    """The backends that run op `schema` on `device` here: cuda only once its CUDA kernel is registered."""
    return [b for b in ops.available_backends(device)
            if b != "cuda" or torch._C._dispatch_has_kernel_for_dispatch_key(f"msmartcompute::{schema}", "CUDA")]


def kernel_cases(schema, interpreter_shapes, shapes, head_dim, shape_id, variants=(((), ""),)):
    """pytest params (device, backend, dtype, shape, *variant) for every backend of `schema` on
    every device: small shapes and float32/float16 under the Triton interpreter; shapes whose
    head_dim(shape) the GPU kernels lack are left out for triton and cuda."""
    for device in DEVICES:
        for backend in backends(device, schema):
            dtypes = INTERPRETER_DTYPES if interpreted(device, backend) else DTYPES[device]
            chosen = interpreter_shapes if interpreted(device, backend) else shapes
            for dtype in dtypes:
                for shape in chosen:
                    if backend in ("triton", "cuda") and head_dim(shape) not in ops.attention.GPU_HEAD_DIMS:
                        continue
                    for values, suffix in variants:
                        yield pytest.param(device, backend, dtype, shape, *values,
                                           id=f"{device}-{backend}-{str(dtype)[6:]}-{shape_id(shape)}{suffix}")


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def allowed_error(ref64, baseline, dtype, terms, magnitude=1.0):
    """2 x plain torch's same-dtype error + a floor: the dtype's rounding at the reference's
    magnitude, and the typical error of float32 sums over `terms` products (every backend
    accumulates in float32; for a float32 output of one row, torch's own error, a max over
    few values, can fall below that). Inputs are standard normal, so the summed terms are of
    order `magnitude` even where the result cancels to 0 (the gradient of q when Sk = 1, where
    dP - delta subtracts two dot products of D-vectors, each of order sqrt(D))."""
    rounded = ref64.to(dtype)
    rounding = ((rounded + 0.3 - 0.3) - rounded).abs().max().item()
    accumulation = terms ** 0.5 * torch.finfo(torch.float32).eps * max(magnitude, ref64.abs().max().item())
    return 2 * max_err(baseline, ref64) + 2 * rounding + accumulation
