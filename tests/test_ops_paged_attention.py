"""paged_attention and reshape_and_cache on every backend this machine has, against the float64
reference: shuffled block tables, odd block sizes, empty and long sequences, decode (Sq = 1) and
chunked prefill (Sq > 1), grouped-query heads, split-KV (with the all-empty case), and caches
written and read in place."""
import pytest
import torch

from msmartcompute import ops
from msmartcompute.ops import reference
from attention_cases import DEVICES, allowed_error, backends, kernel_cases, max_err


# (seq_lens, Sq, H, Hkv, D, block_size)
SHAPES = [
    ([1], 1, 2, 2, 64, 16),
    ([17, 0, 60], 1, 4, 2, 64, 5),
    ([33, 9, 300], 4, 8, 2, 128, 16),
    ([1000, 3], 1, 4, 1, 40, 32),
    ([70, 21], 21, 2, 2, 32, 16),
]
INTERPRETER_SHAPES = [([1], 1, 2, 2, 32, 16), ([17, 0, 60], 1, 4, 2, 32, 5), ([40, 9], 3, 4, 1, 64, 16)]


def cases(interpreter_shapes=INTERPRETER_SHAPES, shapes=SHAPES):
    return kernel_cases("paged_attention", interpreter_shapes, shapes, lambda shape: shape[4],
                        lambda s: f"lens{s[0]}-sq{s[1]}-{s[2]}x{s[3]}x{s[4]}-bs{s[5]}")


def make_cache(shape, dtype, device, spare_blocks=3):
    """Random caches with each sequence's blocks scattered through them (a shuffled table)."""
    lens, sq, h, hkv, d, bs = shape
    max_blocks = max(-(-n // bs) for n in lens) + 1  # a spare column: entries past a length are not read
    num_blocks = len(lens) * max_blocks + spare_blocks
    k_cache = torch.randn(num_blocks, bs, hkv, d, device=device).to(dtype)
    v_cache = torch.randn(num_blocks, bs, hkv, d, device=device).to(dtype)
    block_table = torch.randperm(num_blocks)[:len(lens) * max_blocks].view(len(lens), max_blocks)
    block_table = block_table.to(torch.int32).to(device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    q = torch.randn(len(lens), sq, h, d, device=device).to(dtype)
    return q, k_cache, v_cache, block_table, seq_lens


def check_against_reference(out, inputs, dtype):
    q, k_cache, v_cache, block_table, seq_lens = inputs
    ref64 = reference.paged_attention_reference(q.double(), k_cache.double(), v_cache.double(), block_table,
                                                seq_lens)
    baseline = reference.paged_attention_reference(*inputs, compute_dtype=dtype)
    assert out.shape == q.shape and out.dtype == q.dtype and not out.isnan().any()
    assert max_err(out, ref64) <= allowed_error(ref64, baseline, dtype, max(seq_lens.tolist() + [1]) * q.shape[-1])


@pytest.mark.parametrize("device,backend,dtype,shape", list(cases()))
def test_forward_matches_reference(device, backend, dtype, shape):
    inputs = make_cache(shape, dtype, device)
    check_against_reference(ops.paged_attention(*inputs, backend=backend), inputs, dtype)


@pytest.mark.skipif("triton" not in ops.available_backends("cpu"), reason="needs triton")
@pytest.mark.parametrize("splits", [1, 3, 4])
def test_triton_split_kv(splits):
    # Splits of 32 keys (the interpreter's BLOCK_N); the second sequence has no key at all, so
    # every split of its rows is empty and the combine must give zeros, not NaN (before the guard:
    # exp2(-inf - -inf)).
    from msmartcompute.ops.triton import paged_attention as triton_paged

    inputs = make_cache(([90, 0, 33], 2, 4, 2, 32, 16), torch.float32, "cpu")
    out = triton_paged.paged_attention(*inputs, inputs[0].shape[-1] ** -0.5, splits=splits)
    check_against_reference(out, inputs, torch.float32)
    assert out[1].abs().max() == 0


def test_cpu_split_kv_matches_unsplit():
    # One sequence and one kv head: the CPU kernel splits the 2000 keys across its threads.
    inputs = make_cache(([2000], 1, 4, 1, 64, 16), torch.float32, "cpu")
    check_against_reference(ops.paged_attention(*inputs, backend="cpu"), inputs, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_sequences_give_zeros(device):
    for backend in backends(device, "paged_attention"):
        inputs = make_cache(([0, 5], 2, 2, 2, 32, 16), torch.float32 if device == "cpu" else torch.float16, device)
        inputs[4][1] = 1  # Sq = 2 queries against one key: the first query sees none
        out = ops.paged_attention(*inputs, backend=backend)
        assert out[0].abs().max() == 0 and out[1, 0].abs().max() == 0 and not out.isnan().any(), backend
        check_against_reference(out, inputs, inputs[0].dtype)


@pytest.mark.parametrize("device,backend", [(d, b) for d in DEVICES for b in backends(d, "reshape_and_cache")])
def test_reshape_and_cache_writes_in_place(device, backend):
    dtype = torch.float32 if device == "cpu" else torch.float16
    # The caches are views (every other block of a bigger buffer): written through, never copied.
    k_store = torch.randn(14, 16, 2, 32, device=device).to(dtype)
    v_store = torch.randn(14, 16, 2, 32, device=device).to(dtype)
    k_cache, v_cache = k_store[::2], v_store[::2]
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    k = torch.randn(5, 2, 32, device=device).to(dtype)
    v = torch.randn(5, 2, 32, device=device).to(dtype)
    slots = torch.tensor([3, -1, 17, 111, 16], device=device)
    ops.reshape_and_cache(k, v, k_cache, v_cache, slots, backend=backend)
    reference.reshape_and_cache(k, v, expected_k, expected_v, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    assert torch.equal(k_store[::2], expected_k) and torch.equal(v_store[1::2], v_store[1::2].clone())


@pytest.mark.parametrize("backend", ops.available_backends("cpu"))
def test_decode_loop_matches_fused_attention(backend):
    # Prefill 7 tokens into a paged cache, then decode 3 steps: each step writes its k/v with
    # reshape_and_cache and attends with paged_attention; it must equal fused attention on the
    # dense history.
    h, hkv, d, bs = 4, 2, 32, 4
    k_cache = torch.zeros(8, bs, hkv, d)
    v_cache = torch.zeros(8, bs, hkv, d)
    block_table = torch.tensor([[5, 2, 7]], dtype=torch.int32)
    keys, values = torch.randn(1, 10, hkv, d), torch.randn(1, 10, hkv, d)
    for end in (7, 8, 9, 10):
        start = 0 if end == 7 else end - 1
        slots = torch.tensor([block_table[0, j // bs].item() * bs + j % bs for j in range(start, end)])
        ops.reshape_and_cache(keys[0, start:end], values[0, start:end], k_cache, v_cache, slots, backend=backend)
        q = torch.randn(1, end - start, h, d)
        out = ops.paged_attention(q, k_cache, v_cache, block_table, torch.tensor([end], dtype=torch.int32),
                                  backend=backend)
        dense = reference.attention_reference(q.transpose(1, 2).double(), keys[:, :end].transpose(1, 2).double(),
                                              values[:, :end].transpose(1, 2).double(), True)
        torch.testing.assert_close(out.double(), dense.transpose(1, 2), rtol=1e-4, atol=1e-5)


def test_clear_errors():
    q, k_cache, v_cache, block_table, seq_lens = make_cache(([5, 9], 1, 4, 2, 32, 4), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"expected q \[B, Sq, H, D\]"):
        ops.paged_attention(q[0], k_cache, v_cache, block_table, seq_lens)
    with pytest.raises(ValueError, match="block_table must be int32"):
        ops.paged_attention(q, k_cache, v_cache, block_table.long(), seq_lens)
    with pytest.raises(ValueError, match="seq_lens must be int32"):
        ops.paged_attention(q, k_cache, v_cache, block_table, seq_lens[:1])
    with pytest.raises(ValueError, match="multiple of kv heads"):
        ops.paged_attention(q[:, :, :3], k_cache, v_cache, block_table, seq_lens)
    with pytest.raises(RuntimeError, match=r"seq_lens\[1\] = 99 is outside"):
        ops.paged_attention(q, k_cache, v_cache, block_table, torch.tensor([5, 99], dtype=torch.int32),
                            backend="cpu")
    bad_table = block_table.clone()
    bad_table[0, 0] = 1000
    with pytest.raises(RuntimeError, match="is not a block of the cache"):
        ops.paged_attention(q, k_cache, v_cache, bad_table, seq_lens, backend="cpu")
    k = torch.randn(2, 2, 32)
    with pytest.raises(ValueError, match="slot_mapping must be int64"):
        ops.reshape_and_cache(k, k, k_cache, v_cache, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="is past the cache's"):
        ops.reshape_and_cache(k, k, k_cache, v_cache, torch.tensor([0, 10 ** 6]), backend="cpu")


def test_opcheck():
    inputs = make_cache(([17, 0, 30], 2, 4, 2, 32, 8), torch.float32, "cpu")
    torch.library.opcheck(torch.ops.msmartcompute.paged_attention.default, (*inputs, 0.2))
    k_cache, v_cache = inputs[1], inputs[2]
    k, v = torch.randn(3, 2, 32), torch.randn(3, 2, 32)
    torch.library.opcheck(torch.ops.msmartcompute.reshape_and_cache.default,
                          (k, v, k_cache, v_cache, torch.tensor([4, -1, 20])))


def test_compiles_with_fullgraph():
    q, k_cache, v_cache, block_table, seq_lens = make_cache(([12, 30], 1, 4, 2, 32, 8), torch.float32, "cpu")
    k, v = torch.randn(2, 2, 32), torch.randn(2, 2, 32)
    slots = torch.stack([block_table[0, 11 // 8] * 8 + 11 % 8, block_table[1, 29 // 8] * 8 + 29 % 8]).long()

    def step(q, k, v, k_cache, v_cache):
        ops.reshape_and_cache(k, v, k_cache, v_cache, slots, backend="cpu")
        return ops.paged_attention(q, k_cache, v_cache, block_table, seq_lens, backend="cpu") * 2

    compiled_caches = (k_cache.clone(), v_cache.clone())
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, *compiled_caches)
    expected = step(q, k, v, k_cache, v_cache)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert torch.equal(compiled_caches[0], k_cache) and torch.equal(compiled_caches[1], v_cache)
