"""The kernel API researchers import: ``from msmartcompute import ops``.

Every op takes ``backend=`` (``auto | cuda | triton | cpu | torch``; default from
the ``MSC_KERNEL_BACKEND`` environment variable, else ``auto``):

- ``cuda``: the hand-written kernels in ``kernels/`` (CUDA tensors),
- ``triton``: the Triton kernels in ``ops/triton/`` (CUDA tensors, or CPU tensors
  under ``TRITON_INTERPRET=1``),
- ``cpu``: the C++ implementations in ``csrc/cpu/`` (CPU tensors),
- ``torch``: the plain-torch reference math in ``ops/reference.py``,
- ``auto``: ``cuda`` then ``triton`` for CUDA tensors, ``cpu`` for CPU tensors,
  ``torch`` when the extension is not built.
"""
from ._backend import BACKENDS, available_backends, extension_info
from .quant import dequantize_int8, quantize_int8
from .gemm import int8_linear, int8_matmul, mixed_gemm
from .attention import fused_attention
from .varlen_attention import varlen_attention
from .paged_attention import paged_attention, reshape_and_cache

__all__ = [
    "BACKENDS",
    "available_backends",
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
