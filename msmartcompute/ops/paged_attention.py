"""Paged KV-cache attention and the cache write: the Python face of
msmartcompute::paged_attention / reshape_and_cache."""
from __future__ import annotations

import torch

from . import reference
from ._backend import dispatch, extension_loaded, pow2
from .attention import attention_impls


def _check_inputs(q, k_cache, v_cache, block_table, seq_lens) -> None:
    shapes = f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
    if q.dim() != 4 or k_cache.dim() != 4:
        raise ValueError(f"paged_attention: expected q [B, Sq, H, D] and caches [num_blocks, block_size, Hkv, D], "
                         f"got {shapes}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"paged_attention: k_cache and v_cache must have one shape, got {shapes}")
    if q.shape[3] != k_cache.shape[3]:
        raise ValueError(f"paged_attention: q and the caches must agree on head dim, got {shapes}")
    if k_cache.shape[2] == 0 or q.shape[2] % k_cache.shape[2] != 0:
        raise ValueError(f"paged_attention: q heads ({q.shape[2]}) must be a multiple of kv heads "
                         f"({k_cache.shape[2]})")
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != q.shape[0]:
        raise ValueError(f"paged_attention: block_table must be int32 [B, max_blocks] with B = {q.shape[0]}, "
                         f"got {block_table.dtype} {tuple(block_table.shape)}")
    if seq_lens.dtype != torch.int32 or seq_lens.shape != (q.shape[0],):
        raise ValueError(f"paged_attention: seq_lens must be int32 [B] with B = {q.shape[0]}, "
                         f"got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"paged_attention: q and the caches must share a dtype, got {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    if not all(t.device == q.device for t in (k_cache, v_cache, block_table, seq_lens)):
        raise ValueError(f"paged_attention: every tensor must be on {q.device}")


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    seq_lens: torch.Tensor, *, scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Attention of new queries against a paged KV cache (decode: Sq = 1; chunked prefill: Sq > 1).

    Args:
        q: [B, Sq, H, D], the queries of each sequence's last Sq positions.
        k_cache, v_cache: [num_blocks, block_size, Hkv, D], H % Hkv == 0; read in place.
        block_table: int32 [B, max_blocks]: sequence b's key j is row j % block_size of block
            block_table[b, j // block_size]. Entries past the sequence's length are not read.
        seq_lens: int32 [B], keys per sequence, the new tokens included (written first with
            reshape_and_cache).
        scale: score scale, default 1 / sqrt(D).
        backend: auto | cuda | triton | cpu | torch (default: $MSC_KERNEL_BACKEND or auto).
    Returns:
        out [B, Sq, H, D] in q's dtype. Causal aligned to the end: query i of sequence b sees keys
        j <= seq_lens[b] - Sq + i; a query that sees no key gets zeros. Not differentiable.
    """
    _check_inputs(q, k_cache, v_cache, block_table, seq_lens)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    B, Sq, H, D = q.shape
    # seq_lens stays on the device (reading it would sync): the table's capacity stands for the keys
    key = (str(q.dtype), k_cache.shape[2] != H, pow2(B), pow2(Sq), pow2(block_table.shape[1] * k_cache.shape[1]),
           k_cache.shape[1], D)
    return dispatch("paged_attention", backend, q.device, key, attention_impls(
        q, "paged_attention",
        lambda: torch.ops.msmartcompute.paged_attention(q, k_cache, v_cache, block_table, seq_lens, scale),
        lambda: _triton().paged_attention(q, k_cache, v_cache, block_table, seq_lens, scale),
        lambda: reference.paged_attention_reference(q, k_cache, v_cache, block_table, seq_lens, scale)))

def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, *, backend: str | None = None) -> None:
    """Writes new keys/values into the paged caches in place.

    Args:
        k, v: [N, Hkv, D], one row per new token.
        k_cache, v_cache: [num_blocks, block_size, Hkv, D] (views are written through).
        slot_mapping: int64 [N]: token n goes to row slot % block_size of block slot // block_size;
            a negative slot skips the token (padding).
        backend: as for paged_attention.
    """
    if k.dim() != 3 or k.shape != v.shape or k_cache.dim() != 4 or k_cache.shape != v_cache.shape \
            or k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"reshape_and_cache: expected k, v [N, Hkv, D] and caches [num_blocks, block_size, Hkv, D], "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}, caches {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    if slot_mapping.dtype != torch.int64 or slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"reshape_and_cache: slot_mapping must be int64 [N] with N = {k.shape[0]}, "
                         f"got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    if not (k.dtype == v.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"reshape_and_cache: k, v and the caches must share a dtype, got {k.dtype}, {v.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}")
    if not all(t.device == k.device for t in (v, k_cache, v_cache, slot_mapping)):
        raise ValueError(f"reshape_and_cache: every tensor must be on {k.device}")
    # Writing the same rows again is harmless, so auto may time the candidates on the real call.
    key = (str(k.dtype), pow2(k.shape[0]), k.shape[1] * k.shape[2])
    dispatch("reshape_and_cache", backend, k.device, key, attention_impls(
        k, "reshape_and_cache",
        lambda: torch.ops.msmartcompute.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping),
        lambda: _triton().reshape_and_cache(k, v, k_cache, v_cache, slot_mapping),
        lambda: reference.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)))


def _triton():
    from .triton import paged_attention

    return paged_attention

if extension_loaded():
    # Fake (meta) implementations: shapes and dtypes only, for torch.compile and FakeTensor tracing.
    @torch.library.register_fake("msmartcompute::paged_attention")
    def _paged_attention_fake(q, k_cache, v_cache, block_table, seq_lens, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake("msmartcompute::reshape_and_cache")
    def _reshape_and_cache_fake(k, v, k_cache, v_cache, slot_mapping):
        return None
