"""CPU varlen and paged attention.

- Decode step against cache length: one paged_attention step (and a fused_attention step on a
  strided slice of a dense cache) at growing lengths inside one large cache. The time must grow
  with the keys read, not with the cache's capacity or history: extra_info gives us per 1k keys.
- A mixed-length batch: varlen_attention on the packed tokens against what a padded batch costs
  torch SDPA (every row padded to the longest, a boolean causal + padding mask).
"""
import pytest
import torch
import torch.nn.functional as F

from msmartcompute import ops

B, H, HKV, D, BLOCK_SIZE, CAPACITY = 4, 32, 8, 128, 16, 8192
CACHE_LENGTHS = [256, 1024, 4096]


@pytest.fixture(scope="module")
def paged_cache():
    blocks = CAPACITY // BLOCK_SIZE
    k_cache = torch.randn(B * blocks, BLOCK_SIZE, HKV, D)
    v_cache = torch.randn(B * blocks, BLOCK_SIZE, HKV, D)
    # Each row's blocks scattered through the cache, as an allocator that has run a while leaves them.
    block_table = torch.randperm(B * blocks).view(B, blocks).to(torch.int32)
    return k_cache, v_cache, block_table


@pytest.mark.parametrize("length", CACHE_LENGTHS)
def test_paged_decode_step(benchmark, paged_cache, length):
    k_cache, v_cache, block_table = paged_cache
    q = torch.randn(B, 1, H, D)
    seq_lens = torch.full((B,), length, dtype=torch.int32)
    out = benchmark(ops.paged_attention, q, k_cache, v_cache, block_table, seq_lens, backend="cpu")
    assert out.shape == q.shape
    if benchmark.stats:
        benchmark.extra_info["us per 1k keys"] = benchmark.stats.stats.median * 1e6 / (length / 1000)


@pytest.mark.parametrize("length", CACHE_LENGTHS)
def test_strided_cache_decode_step(benchmark, length):
    cache_k, cache_v = torch.randn(B, HKV, CAPACITY, D), torch.randn(B, HKV, CAPACITY, D)
    q = torch.randn(B, H, 1, D)
    k, v = cache_k[:, :, :length], cache_v[:, :, :length]  # views: the step reads them in place
    out = benchmark(ops.fused_attention, q, k, v, causal=True, backend="cpu")
    assert out.shape == q.shape
    if benchmark.stats:
        benchmark.extra_info["us per 1k keys"] = benchmark.stats.stats.median * 1e6 / (length / 1000)


MIXED_LENGTHS = [512, 37, 200, 5, 300, 90, 1, 128]
VARLEN_HEADS, VARLEN_KV_HEADS, VARLEN_D = 8, 2, 64


def padded_sdpa(q, k, v, valid):
    """What a padded batch costs: [B, H, S, D] with every row at the longest length and a
    causal-and-padding mask (a padding query sees itself, so its softmax is defined)."""
    s = q.shape[2]
    mask = torch.ones(s, s, dtype=torch.bool).tril() & valid[:, None, None, :] | torch.eye(s, dtype=torch.bool)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("impl", ["varlen", "padded_sdpa"])
def test_mixed_length_batch(benchmark, impl):
    total, longest = sum(MIXED_LENGTHS), max(MIXED_LENGTHS)
    if impl == "varlen":
        q = torch.randn(total, VARLEN_HEADS, VARLEN_D)
        k, v = torch.randn(total, VARLEN_KV_HEADS, VARLEN_D), torch.randn(total, VARLEN_KV_HEADS, VARLEN_D)
        cu = torch.tensor([0] + MIXED_LENGTHS).cumsum(0).to(torch.int32)
        out = benchmark(ops.varlen_attention, q, k, v, cu, cu, longest, longest, causal=True, backend="cpu")
    else:
        rows = len(MIXED_LENGTHS)
        q = torch.randn(rows, VARLEN_HEADS, longest, VARLEN_D)
        k = torch.randn(rows, VARLEN_KV_HEADS, longest, VARLEN_D)
        v = torch.randn(rows, VARLEN_KV_HEADS, longest, VARLEN_D)
        valid = torch.arange(longest)[None, :] < torch.tensor(MIXED_LENGTHS)[:, None]
        out = benchmark(padded_sdpa, q, k, v, valid)
    assert not out.isnan().any()
    if benchmark.stats:
        benchmark.extra_info["real tokens"] = total
        benchmark.extra_info["padded tokens"] = len(MIXED_LENGTHS) * longest
