"""Triton attention against a paged KV cache, with split-KV for long contexts, and the cache write.

One program per (key split, query block, sequence x head), the grid folded into x. Key j of
sequence b is gathered from block block_table[b, j // block_size] in place, so any block size
works and the cache is never copied. With one split the program writes the output; with more,
each writes its normalized partial output and base-2 log-sum-exp, and a combine kernel weighs
them by exp2(lse_s - max). A row whose splits all saw no key (max -inf) combines to zeros.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import _LOG2E, _interpreting


@triton.jit
def _paged_fwd_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr,  # q [B, SQ, H, D], caches [blocks, BS, HKV, D], [B, max_blocks], [B]
    out_ptr, part_ptr, part_lse_ptr,  # out [B, SQ, H, D]; partials fp32 [SPLITS, B, SQ, H, D] and [SPLITS, B, SQ, H]
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_kr, stride_kh, stride_vb, stride_vr, stride_vh,
    stride_btb, stride_btn,
    B, SQ, H, GROUP, BLOCK_SIZE, M_BLOCKS, SPLITS, SPLIT_KEYS,
    scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
):
    pid = tl.program_id(0)
    split = pid % SPLITS
    pid_m = (pid // SPLITS) % M_BLOCKS
    bh = pid // (SPLITS * M_BLOCKS)
    b, h = bh // H, bh % H
    kv_h = h // GROUP
    seq_len = tl.load(lens_ptr + b)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    cols0 = tl.arange(0, BLOCK_N)
    offset = seq_len - SQ  # query i sees keys j <= i + offset
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + rows[:, None] * stride_qs + h * stride_qh + dims[None, :],
                mask=rows[:, None] < SQ, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo = split * SPLIT_KEYS
    hi = tl.minimum(seq_len, tl.minimum(lo + SPLIT_KEYS, (pid_m + 1) * BLOCK_M + offset))
    for start in range(lo, hi, BLOCK_N):
        cols = start + cols0
        inside = cols < hi
        block = tl.load(bt_ptr + b * stride_btb + (cols // BLOCK_SIZE) * stride_btn, mask=inside, other=0)
        row_in_block = cols % BLOCK_SIZE
        k_rows = block.to(tl.int64) * stride_kb + row_in_block * stride_kr + kv_h * stride_kh
        kt = tl.load(k_ptr + k_rows[None, :] + dims[:, None], mask=inside[None, :], other=0.0)
        s = tl.dot(q, kt) * scale_log2  # [BLOCK_M, BLOCK_N]
        valid = inside[None, :] & (cols[None, :] <= rows[:, None] + offset)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps max -inf: shift by 0 there, not by -inf (NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = block.to(tl.int64) * stride_vb + row_in_block * stride_vr + kv_h * stride_vh
        v = tl.load(v_ptr + v_rows[:, None] + dims[None, :], mask=inside[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    seen = l_i > 0.0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    row = (b.to(tl.int64) * SQ + rows) * H + h  # row of [B, SQ, H]
    if SPLIT:
        part_row = split * B * SQ * H + row
        tl.store(part_ptr + part_row[:, None] * HEAD_DIM + dims[None, :], acc, mask=rows[:, None] < SQ)
        tl.store(part_lse_ptr + part_row, tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf")), mask=rows < SQ)
    else:
        tl.store(out_ptr + row[:, None] * HEAD_DIM + dims[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=rows[:, None] < SQ)


@triton.jit
def _split_combine_kernel(
    part_ptr, part_lse_ptr, out_ptr,  # fp32 [SPLITS, ROWS, D], fp32 [SPLITS, ROWS], [ROWS, D]
    ROWS, SPLITS,
    HEAD_DIM: tl.constexpr, SPLITS_POW2: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, SPLITS_POW2)
    dims = tl.arange(0, HEAD_DIM)
    lse = tl.load(part_lse_ptr + splits * ROWS + row, mask=splits < SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    # Every split empty (a sequence with no key for this row): m is -inf and exp2(lse - m) would
    # be NaN; shifting by 0 makes every weight exp2(-inf) = 0 and the row 0.
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m)  # [SPLITS_POW2]
    total = tl.sum(w, 0)
    parts = tl.load(part_ptr + (splits[:, None] * ROWS + row) * HEAD_DIM + dims[None, :],
                    mask=splits[:, None] < SPLITS, other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _cache_write_kernel(
    src_ptr, cache_ptr, slot_ptr,  # [N, HKV, D], [blocks, BS, HKV, D], int64 [N]
    stride_sn, stride_sh, stride_cb, stride_cr, stride_ch, stride_cd,
    HKV, BLOCK_SIZE,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + n)
    if slot < 0:
        return
    offs = tl.arange(0, BLOCK)
    h, d = offs // HEAD_DIM, offs % HEAD_DIM
    inside = h < HKV
    values = tl.load(src_ptr + n * stride_sn + h * stride_sh + d, mask=inside)
    row = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cr
    tl.store(cache_ptr + row + h * stride_ch + d * stride_cd, values, mask=inside)


def _config(head_dim: int, sq: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): decode (one query row) in a 16-row tile, the least tl.dot takes."""
    if _interpreting():
        return 16, 32, 4
    block_m = 16 if sq <= 16 else 64
    return block_m, 64 if head_dim <= 128 else 32, 4


def num_splits(programs: int, max_keys: int, block_n: int, device: torch.device) -> int:
    """Key splits so that about two programs run per SM, each at least 4 key blocks long.
    max_keys (the block table's capacity) bounds every sequence without reading seq_lens."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter: split anything long enough, so the tests reach the combine
        target = 2 * programs
    return max(1, min(triton.cdiv(target, programs), max_keys // (4 * block_n), 64))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    seq_lens: torch.Tensor, scale: float, splits: int | None = None) -> torch.Tensor:
    """out [B, Sq, H, D]; `splits` overrides the split-KV heuristic (tests)."""
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    B, SQ, H, D = q.shape
    hkv, block_size = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.numel() == 0:
        return out
    block_m, block_n, warps = _config(D, SQ)
    m_blocks = triton.cdiv(SQ, block_m)
    max_keys = block_table.shape[1] * block_size
    if splits is None:
        splits = num_splits(m_blocks * B * H, max_keys, block_n, q.device)
    split_keys = triton.cdiv(triton.cdiv(max(max_keys, 1), splits), block_n) * block_n
    split = splits > 1
    part = torch.empty((splits, B, SQ, H, D) if split else (1,), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((splits, B, SQ, H) if split else (1,), dtype=torch.float32, device=q.device)
    _paged_fwd_kernel[(splits * m_blocks * B * H,)](
        q, k_cache, v_cache, block_table, seq_lens, out, part, part_lse,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_table.stride(0), block_table.stride(1),
        B, SQ, H, H // hkv, block_size, m_blocks, splits, split_keys, scale * _LOG2E,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=split, num_warps=warps)
    if split:
        _split_combine_kernel[(B * SQ * H,)](part, part_lse, out, B * SQ * H, splits, HEAD_DIM=D,
                                             SPLITS_POW2=triton.next_power_of_2(splits))
    return out


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """Writes k/v [N, Hkv, D] into the caches at slot_mapping (negative: skipped), in place."""
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    n, hkv, d = k.shape
    if n == 0:
        return
    for src, cache in ((k, k_cache), (v, v_cache)):
        _cache_write_kernel[(n,)](src, cache, slot_mapping, src.stride(0), src.stride(1), *cache.stride(),
                                  hkv, cache.shape[1], HEAD_DIM=d, BLOCK=triton.next_power_of_2(hkv * d))


def _specs():
    """(kernel, signature, constexprs) lowered ahead of time for sm_80/sm_90 by CI."""
    specs = []
    strides = ("stride_qb", "stride_qs", "stride_qh", "stride_kb", "stride_kr", "stride_kh", "stride_vb",
               "stride_vr", "stride_vh", "stride_btb", "stride_btn")
    sizes = ("B", "SQ", "H", "GROUP", "BLOCK_SIZE", "M_BLOCKS", "SPLITS", "SPLIT_KEYS")
    for dtype in ("fp16", "bf16"):
        signature = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "bt_ptr": "*i32",
                     "lens_ptr": "*i32", "out_ptr": f"*{dtype}", "part_ptr": "*fp32", "part_lse_ptr": "*fp32",
                     **{name: "i32" for name in strides + sizes}, "scale_log2": "fp32"}
        for split in (False, True):
            specs.append((_paged_fwd_kernel, signature,
                          {"HEAD_DIM": 128, "BLOCK_M": 16, "BLOCK_N": 64, "SPLIT": split}))
        specs.append((_split_combine_kernel, {"part_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": f"*{dtype}",
                                              "ROWS": "i32", "SPLITS": "i32"}, {"HEAD_DIM": 128, "SPLITS_POW2": 16}))
        specs.append((_cache_write_kernel, {"src_ptr": f"*{dtype}", "cache_ptr": f"*{dtype}", "slot_ptr": "*i64",
                                            **{name: "i32" for name in ("stride_sn", "stride_sh", "stride_cb",
                                                                        "stride_cr", "stride_ch", "stride_cd",
                                                                        "HKV", "BLOCK_SIZE")}},
                      {"HEAD_DIM": 128, "BLOCK": 1024}))
    return specs


AOT_SPECS = _specs()
