"""The kernel API researchers import: ``from msmartcompute import ops``.

Every op takes ``backend=`` (``auto | cuda | triton | cpu | torch``; default from
the ``MSC_KERNEL_BACKEND`` environment variable, else ``auto``):

- ``cuda``: the hand-written kernels in ``kernels/`` (CUDA tensors),
- ``triton``: the Triton kernels in ``ops/triton/`` (CUDA tensors, or CPU tensors
  under ``TRITON_INTERPRET=1``),
- ``cpu``: the C++ implementations in ``csrc/cpu/`` (CPU tensors),
- ``torch``: torch's own implementation (the reference math, ``torch._int_mm``,
  cuBLAS/MKL GEMMs, ``F.scaled_dot_product_attention``),
- ``auto``: the one measured fastest on this device for this op, dtype and shape
  bucket, among those above that run there (not the Triton interpreter); measured on
  the first such call, then cached (``MSC_KERNEL_CACHE=path.json`` keeps the choices
  across processes). ``backend_choices()`` lists them; each is logged on the
  ``msmartcompute.ops`` logger.
"""
from ._backend import BACKENDS, available_backends, backend_choices, extension_info
from .quant import dequantize_int8, quantize_int8
from .gemm import int8_linear, int8_matmul, mixed_gemm
from .attention import fused_attention
from .varlen_attention import varlen_attention
from .paged_attention import paged_attention, reshape_and_cache

__all__ = [
    "BACKENDS",
    "available_backends",
    "backend_choices",
    "extension_info",
    "quantize_int8",
    "dequantize_int8",
    "int8_matmul",
    "int8_linear",
    "mixed_gemm",
    "fused_attention",
    "varlen_attention",
    "paged_attention",
    "reshape_and_cache",
]
