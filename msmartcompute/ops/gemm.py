"""GEMM ops: the Python face of msmartcompute::int8_matmul / int8_linear / mixed_gemm.

Weights use the nn.Linear layout [N, K] everywhere (b_q, w_q and mixed_gemm's b), so
a model's weight goes in as is and every GEMM reads both operands along K.
"""
from __future__ import annotations

import torch

from . import reference
from ._backend import dispatch, extension_loaded, pow2

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = (None, "relu", "gelu", "silu")
MODES = ("w8a8", "w8a16")
# Past this K an int8 dot product can leave int32 (K * 128 * 128 > 2**31 - 1); csrc/gemm.h holds
# the same bound for callers of torch.ops.msmartcompute.* directly.
MAX_INT8_K = 131071


def _check_bias(op: str, bias: torch.Tensor | None, n: int, device: torch.device) -> None:
    if bias is None:
        return
    if bias.shape != (n,) or bias.dtype not in _FLOATS:
        raise ValueError(f"{op}: bias must be a float tensor of shape ({n},), got {bias.dtype} {tuple(bias.shape)}")
    if bias.device != device:
        raise ValueError(f"{op}: bias is on {bias.device} but the inputs are on {device}")


def int8_matmul(a_q: torch.Tensor, b_q: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, *,
                backend: str | None = None) -> torch.Tensor:
    """int8 GEMM with a fused dequantize + bias epilogue.

    Args:
        a_q: int8 [M, K] (e.g. activations from quantize_int8(x)).
        b_q: int8 [N, K] (e.g. an nn.Linear weight from quantize_int8(w)).
        a_scale: float32 [M]; b_scale: float32 [N].
        bias: optional float [N].
        out_dtype: float32 | float16 | bfloat16, or int32 for the raw accumulator (bias must be None).
    Returns:
        [M, N]: acc * a_scale[m] * b_scale[n] + bias[n], where acc = a_q @ b_q^T in int32.
    """
    if a_q.dtype != torch.int8 or b_q.dtype != torch.int8 or a_q.dim() != 2 or b_q.dim() != 2:
        raise ValueError(f"int8_matmul: a_q [M, K] and b_q [N, K] must be 2-D int8, got {a_q.dtype} "
                         f"{tuple(a_q.shape)} and {b_q.dtype} {tuple(b_q.shape)}")
    if a_q.shape[1] != b_q.shape[1]:
        raise ValueError(f"int8_matmul: a_q {tuple(a_q.shape)} and b_q {tuple(b_q.shape)} disagree on K")
    if a_scale.shape != (a_q.shape[0],) or b_scale.shape != (b_q.shape[0],) or \
            a_scale.dtype != torch.float32 or b_scale.dtype != torch.float32:
        raise ValueError(f"int8_matmul: a_scale must be float32 ({a_q.shape[0]},) and b_scale float32 "
                         f"({b_q.shape[0]},), got {tuple(a_scale.shape)} and {tuple(b_scale.shape)}")
    if out_dtype not in _FLOATS + (torch.int32,):
        raise ValueError(f"int8_matmul: out_dtype must be float32, float16, bfloat16 or int32, got {out_dtype}")
    if out_dtype == torch.int32 and bias is not None:
        raise ValueError("int8_matmul: out_dtype=int32 returns the raw accumulator; bias must be None")
    if len({a_q.device, b_q.device, a_scale.device, b_scale.device}) != 1:
        raise ValueError("int8_matmul: a_q, b_q, a_scale and b_scale must be on one device")
    _check_bias("int8_matmul", bias, b_q.shape[0], a_q.device)
    _check_k("int8_matmul", a_q.shape[1])
    M, K, N = a_q.shape[0], a_q.shape[1], b_q.shape[0]
    return dispatch("int8_matmul", backend, a_q.device, (str(out_dtype), bias is not None, pow2(M), pow2(K), pow2(N)), {
        "cuda": lambda: torch.ops.msmartcompute.int8_matmul(a_q, b_q, a_scale, b_scale, bias, out_dtype),
        "cpu": lambda: torch.ops.msmartcompute.int8_matmul(a_q, b_q, a_scale, b_scale, bias, out_dtype),
        "triton": lambda: _triton().int8_matmul(a_q, b_q, a_scale, b_scale, bias, out_dtype),
        "torch": lambda: _int8_matmul_torch(a_q, b_q, a_scale, b_scale, bias, out_dtype),
    })


def int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                mode: str = "w8a8", *, backend: str | None = None) -> torch.Tensor:
    """nn.Linear with int8 weights: x[..., K] @ (w_q * w_scale[:, None])^T + bias, as x.dtype.

    Args:
        x: float32 | float16 | bfloat16 [..., K].
        w_q: int8 [N, K] and w_scale: float32 [N], e.g. quantize_int8(linear.weight).
        bias: optional float [N].
        mode: "w8a8" quantizes x per token (quantize_int8 rounding) and runs the int8 GEMM
            (throughput: prefill, large batches); "w8a16" keeps x in floating point and
            converts weights in registers (small batches / decoding, where the int8 weight
            read is the cost).
    Returns:
        [..., N] of x.dtype.
    """
    if mode not in MODES:
        raise ValueError(f"int8_linear: mode must be 'w8a8' or 'w8a16', got {mode!r}")
    if x.dtype not in _FLOATS or x.dim() < 1:
        raise ValueError(f"int8_linear: x must be a float32, float16 or bfloat16 tensor, got {x.dtype}")
    if w_q.dtype != torch.int8 or w_q.dim() != 2 or w_q.shape[1] != x.shape[-1]:
        raise ValueError(f"int8_linear: w_q must be int8 [N, K={x.shape[-1]}], got {w_q.dtype} {tuple(w_q.shape)}")
    if w_scale.dtype != torch.float32 or w_scale.shape != (w_q.shape[0],):
        raise ValueError(f"int8_linear: w_scale must be float32 ({w_q.shape[0]},), got {w_scale.dtype} "
                         f"{tuple(w_scale.shape)}")
    if len({x.device, w_q.device, w_scale.device}) != 1:
        raise ValueError("int8_linear: x, w_q and w_scale must be on one device")
    _check_bias("int8_linear", bias, w_q.shape[0], x.device)
    if mode == "w8a8":
        _check_k("int8_linear", w_q.shape[1])
    M, K, N = x.numel() // max(x.shape[-1], 1), x.shape[-1], w_q.shape[0]

    def run():
        return dispatch("int8_linear", backend, x.device, (mode, str(x.dtype), bias is not None,
                                                          pow2(M), pow2(K), pow2(N)), {
            "cuda": lambda: torch.ops.msmartcompute.int8_linear(x, w_q, w_scale, bias, mode),
            "cpu": lambda: torch.ops.msmartcompute.int8_linear(x, w_q, w_scale, bias, mode),
            "triton": lambda: _triton().int8_linear(x, w_q, w_scale, bias, mode),
            "torch": lambda: _int8_linear_torch(x, w_q, w_scale, bias, mode),
        })

    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _Int8LinearBackward.apply(x, bias, w_q, w_scale, run)
    return run()


class _Int8LinearBackward(torch.autograd.Function):
    """int8_linear's gradients for x and bias, whatever backend ran the forward: grad @ W
    dequantized, with w8a8's per-token quantization of x taken as the identity (the
    straight-through estimator). The int8 weights and their scales get none."""

    @staticmethod
    def forward(ctx, x, bias, w_q, w_scale, run):
        ctx.save_for_backward(w_q, w_scale)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        with torch.no_grad():
            return run()

    @staticmethod
    def backward(ctx, grad):
        w_q, w_scale = ctx.saved_tensors
        grad2 = grad.reshape(-1, w_q.shape[0]).float()  # [M, N]
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = w_q.float() * w_scale[:, None]  # [N, K]
            grad_x = (grad2 @ w).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad2.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None, None, None


def mixed_gemm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None,
               out_dtype: torch.dtype | None = None, *, backend: str | None = None) -> torch.Tensor:
    """activation(a @ b^T + bias) with float32 accumulation and the epilogue fused.

    Args:
        a: float16 | bfloat16 [M, K] (float32 too on CPU).
        b: [N, K], the nn.Linear weight layout, same dtype as a.
        bias: optional float [N].
        activation: None | "relu" | "gelu" (erf form, as F.gelu) | "silu".
        out_dtype: float32 | float16 | bfloat16; a.dtype when None.
    Returns:
        [M, N] of out_dtype; differentiable on the cuda, cpu and torch backends.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"mixed_gemm: a [M, K] and b [N, K] must be 2-D and agree on K, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in _FLOATS:
        raise ValueError(f"mixed_gemm: a and b must share a float16, bfloat16 or float32 dtype, got "
                         f"{a.dtype} and {b.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"mixed_gemm: activation must be None, 'relu', 'gelu' or 'silu', got {activation!r}")
    if out_dtype is not None and out_dtype not in _FLOATS:
        raise ValueError(f"mixed_gemm: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    if a.device != b.device:
        raise ValueError(f"mixed_gemm: a is on {a.device} but b is on {b.device}")
    _check_bias("mixed_gemm", bias, b.shape[0], a.device)
    half_only = "the tensor-core kernels take float16 or bfloat16, not float32 (use the cpu or torch backend)"
    gpu_kernel = (lambda f: f) if a.dtype != torch.float32 else (lambda f: half_only)
    M, K, N = a.shape[0], a.shape[1], b.shape[0]
    key = (str(a.dtype), str(out_dtype), activation, bias is not None, pow2(M), pow2(K), pow2(N))
    return dispatch("mixed_gemm", backend, a.device, key, {
        "cuda": gpu_kernel(lambda: torch.ops.msmartcompute.mixed_gemm(a, b, bias, activation, out_dtype)),
        "cpu": lambda: torch.ops.msmartcompute.mixed_gemm(a, b, bias, activation, out_dtype),
        "triton": gpu_kernel(lambda: _triton().mixed_gemm(a, b, bias, activation, out_dtype)),
        # torch's own: cuBLAS in the inputs' dtype on a GPU, float32 (MKL) on the CPU
        "torch": lambda: reference.mixed_gemm(a, b, bias, activation, out_dtype,
                                              compute_dtype=a.dtype if a.is_cuda else torch.float32),
    })


def _check_k(op: str, k: int) -> None:
    if k > MAX_INT8_K:
        raise ValueError(f"{op}: K = {k} is past {MAX_INT8_K}, where int32 accumulation of int8 products can "
                         f"overflow; split K and add the partial results in float, or use mode='w8a16'")


def _int8_accumulate_torch(a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
    """a_q[M, K] @ b_q[N, K]^T in int32: torch._int_mm where it takes the shape (CUDA asks for
    M > 16 and K, N multiples of 8), else the exact float64 product."""
    try:
        return torch._int_mm(a_q, b_q.t())
    except RuntimeError:
        return (a_q.double() @ b_q.double().t()).to(torch.int32)


def _int8_matmul_torch(a_q, b_q, a_scale, b_scale, bias, out_dtype):
    """torch's own int8 GEMM with reference.int8_matmul's epilogue, so the same bits."""
    return reference.int8_epilogue(_int8_accumulate_torch(a_q, b_q), a_scale, b_scale, bias, out_dtype)


def _int8_linear_torch(x, w_q, w_scale, bias, mode):
    if mode == "w8a16":
        return reference.int8_linear(x, w_q, w_scale, bias, mode)
    x2 = x.reshape(-1, x.shape[-1])
    x_q, x_scale = reference.quantize_int8(x2)
    out = _int8_matmul_torch(x_q, w_q, x_scale, w_scale, bias, x.dtype)
    return out.reshape(*x.shape[:-1], w_q.shape[0])


def _triton():
    from .triton import gemm

    return gemm


if extension_loaded():
    # Fake (meta) implementations: shapes and dtypes only, for torch.compile / FakeTensor.
    @torch.library.register_fake("msmartcompute::int8_matmul")
    def _int8_matmul_fake(a_q, b_q, a_scale, b_scale, bias=None, out_dtype=None):
        return a_q.new_empty((a_q.shape[0], b_q.shape[0]), dtype=out_dtype or torch.bfloat16)

    @torch.library.register_fake("msmartcompute::int8_linear")
    def _int8_linear_fake(x, w_q, w_scale, bias=None, mode="w8a8"):
        return x.new_empty((*x.shape[:-1], w_q.shape[0]))

    @torch.library.register_fake("msmartcompute::mixed_gemm")
    def _mixed_gemm_fake(a, b, bias=None, activation=None, out_dtype=None):
        return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype or a.dtype)

    # mixed_gemm trains (a linear layer with its activation): the backward recomputes the
    # pre-activation in float32 rather than saving an [M, N] tensor, then runs plain
    # float32 matmuls; grads come back in the inputs' dtypes.
    def _mixed_gemm_setup_context(ctx, inputs, output):
        a, b, bias, activation, _ = inputs
        ctx.activation = activation
        ctx.has_bias = bias is not None
        ctx.save_for_backward(a, b, bias)

    def _mixed_gemm_backward(ctx, grad):
        a, b, bias = ctx.saved_tensors
        grad_z = grad.float()  # [M, N]
        if ctx.activation is not None:
            z = torch.ops.msmartcompute.mixed_gemm(a, b, bias, None, torch.float32).detach().requires_grad_()
            with torch.enable_grad():
                (grad_z,) = torch.autograd.grad(reference.ACTIVATIONS[ctx.activation](z), z, grad_z)
        grad_a = (grad_z @ b.float()).to(a.dtype) if ctx.needs_input_grad[0] else None
        grad_b = (grad_z.t() @ a.float()).to(b.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = grad_z.sum(0).to(bias.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_a, grad_b, grad_bias, None, None

    torch.library.register_autograd("msmartcompute::mixed_gemm", _mixed_gemm_backward,
                                    setup_context=_mixed_gemm_setup_context)

