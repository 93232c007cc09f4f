"""varlen_attention on every backend this machine has, against the float64 reference.

Tolerances as in test_ops_attention: at most twice plain torch's error in the same dtype plus
the dtype's rounding. Sequences include empty ones, len_q != len_k (causal rows that see no key
get zeros) and grouped-query heads; q/k/v are also given as strided views of one projection.
"""
import pytest
import torch

from msmartcompute import ops
from msmartcompute.ops import reference
from attention_cases import CAUSAL, allowed_error, kernel_cases, max_err


# (lens_q, lens_k, H, Hkv, D)
SHAPES = [
    ([1], [1], 2, 2, 64),
    ([5, 17, 1, 33], [5, 17, 1, 33], 4, 2, 64),
    ([3, 40, 0, 7], [10, 40, 5, 7], 4, 1, 32),
    ([9, 2, 6], [4, 2, 70], 2, 2, 40),
    ([130, 77], [130, 200], 2, 1, 128),
]
INTERPRETER_SHAPES = [([1], [1], 2, 2, 32), ([5, 17, 0, 3], [5, 20, 4, 3], 4, 2, 32), ([9, 2], [4, 40], 2, 1, 64)]
GRAD_SHAPES = [([1], [1], 2, 2, 64), ([5, 17, 1, 33], [5, 17, 1, 33], 4, 2, 64), ([9, 2, 6], [4, 2, 70], 2, 2, 40)]
GRAD_INTERPRETER_SHAPES = [([5, 17, 3], [5, 20, 3], 4, 2, 32), ([9, 2], [4, 21], 2, 1, 64)]


def cases(interpreter_shapes, shapes):
    return kernel_cases("varlen_attention_fwd", interpreter_shapes, shapes, lambda shape: shape[4],
                        lambda s: f"q{s[0]}-k{s[1]}-{s[2]}x{s[3]}x{s[4]}", CAUSAL)


def cu_seqlens(lens, device):
    return torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)


def make_inputs(shape, dtype, device, requires_grad=False):
    lens_q, lens_k, h, hkv, d = shape
    q = torch.randn(sum(lens_q), h, d, device=device).to(dtype)
    k = torch.randn(sum(lens_k), hkv, d, device=device).to(dtype)
    v = torch.randn(sum(lens_k), hkv, d, device=device).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def run(shape, q, k, v, causal, backend):
    lens_q, lens_k = shape[0], shape[1]
    return ops.varlen_attention(q, k, v, cu_seqlens(lens_q, q.device), cu_seqlens(lens_k, q.device), max(lens_q),
                                max(lens_k), causal=causal, backend=backend)


def references(shape, q, k, v, causal, dtype):
    cu_q, cu_k = cu_seqlens(shape[0], q.device), cu_seqlens(shape[1], q.device)
    ref64 = reference.varlen_attention_reference(q.double(), k.double(), v.double(), cu_q, cu_k, causal)
    baseline = reference.varlen_attention_reference(q, k, v, cu_q, cu_k, causal, compute_dtype=dtype)
    return ref64, baseline


@pytest.mark.parametrize("device,backend,dtype,shape,causal", list(cases(INTERPRETER_SHAPES, SHAPES)))
def test_forward_matches_reference(device, backend, dtype, shape, causal):
    q, k, v = make_inputs(shape, dtype, device)
    out = run(shape, q, k, v, causal, backend)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    ref64, baseline = references(shape, q, k, v, causal, dtype)
    assert max_err(out, ref64) <= allowed_error(ref64, baseline, dtype, max(shape[1]) * shape[4])


@pytest.mark.parametrize("device,backend,dtype,shape,causal", list(cases(GRAD_INTERPRETER_SHAPES, GRAD_SHAPES)))
def test_gradients_match_reference(device, backend, dtype, shape, causal):
    q, k, v = make_inputs(shape, dtype, device, requires_grad=True)
    grad = torch.randn(q.shape, device=device).to(dtype)
    ours = torch.autograd.grad(run(shape, q, k, v, causal, backend), (q, k, v), grad)
    cu_q, cu_k = cu_seqlens(shape[0], device), cu_seqlens(shape[1], device)

    def grads_of(compute_dtype):
        leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
        o = reference.varlen_attention_reference(*leaves, cu_q, cu_k, causal, compute_dtype=compute_dtype)
        return torch.autograd.grad(o, leaves, grad.to(compute_dtype))

    ref64, baseline = grads_of(torch.float64), grads_of(dtype)
    lens_q, lens_k, h, hkv, d = shape
    terms = max(max(lens_q) * h // hkv, max(lens_k)) * d
    for name, g, r, b in zip("qkv", ours, ref64, baseline):
        assert g.shape == r.shape and g.dtype == dtype, name
        assert max_err(g, r) <= allowed_error(r, b, dtype, terms, d ** 0.5), f"grad of {name}"


@pytest.mark.parametrize("backend", ops.available_backends("cpu"))
def test_strided_views_of_one_projection(backend):
    # q, k, v as column slices of one fused qkv projection [T, (H + 2 Hkv) * D]: token stride
    # (H + 2 Hkv) * D, not H * D. The kernels read them in place.
    lens, h, hkv, d = [7, 12, 1], 4, 2, 32
    qkv = torch.randn(sum(lens), (h + 2 * hkv) * d)
    q, k, v = qkv.split([h * d, hkv * d, hkv * d], -1)
    q, k, v = q.view(-1, h, d), k.view(-1, hkv, d), v.view(-1, hkv, d)
    assert not q.is_contiguous() and q.stride(0) == (h + 2 * hkv) * d
    shape = (lens, lens, h, hkv, d)
    out = run(shape, q, k, v, True, backend)
    ref64, baseline = references(shape, q, k, v, True, torch.float32)
    assert max_err(out, ref64) <= allowed_error(ref64, baseline, torch.float32, max(lens) * d)


def test_matches_fused_attention_per_sequence():
    # Each packed sequence alone is ordinary attention: the varlen op equals fused_attention run
    # on the sequences one by one (same CPU tile, so to float rounding).
    shape = ([13, 1, 50], [13, 30, 50], 4, 2, 64)
    q, k, v = make_inputs(shape, torch.float32, "cpu")
    out = run(shape, q, k, v, True, "cpu")
    cu_q, cu_k = cu_seqlens(shape[0], "cpu").tolist(), cu_seqlens(shape[1], "cpu").tolist()
    for b in range(3):
        alone = ops.fused_attention(q[cu_q[b]:cu_q[b + 1]].transpose(0, 1)[None],
                                    k[cu_k[b]:cu_k[b + 1]].transpose(0, 1)[None],
                                    v[cu_k[b]:cu_k[b + 1]].transpose(0, 1)[None], causal=True, backend="cpu")
        torch.testing.assert_close(out[cu_q[b]:cu_q[b + 1]], alone[0].transpose(0, 1), rtol=1e-5, atol=1e-6)


def test_clear_errors():
    q, k, v = make_inputs(([4, 4], [4, 4], 4, 2, 32), torch.float32, "cpu")
    cu = cu_seqlens([4, 4], "cpu")
    with pytest.raises(ValueError, match=r"expected q \[total_q, H, D\]"):
        ops.varlen_attention(q[None], k, v, cu, cu, 4, 4)
    with pytest.raises(ValueError, match=r"q heads \(4\) must be a multiple of kv heads \(3\)"):
        ops.varlen_attention(q, torch.ones(8, 3, 32), torch.ones(8, 3, 32), cu, cu, 4, 4)
    with pytest.raises(ValueError, match="cu_seqlens_q must be int32"):
        ops.varlen_attention(q, k, v, cu.long(), cu, 4, 4)
    with pytest.raises(ValueError, match="same number of sequences"):
        ops.varlen_attention(q, k, v, cu, cu[:2], 4, 4)
    with pytest.raises(ValueError, match="share a dtype"):
        ops.varlen_attention(q, k.double(), v, cu, cu, 4, 4)
    # Offsets are checked where they are read (the C++ op): they must cover the packed rows.
    with pytest.raises(RuntimeError, match="must start at 0 and end at 8"):
        ops.varlen_attention(q, k, v, torch.tensor([0, 4, 7], dtype=torch.int32), cu, 4, 4, backend="cpu")
    with pytest.raises(RuntimeError, match="outside \\[0, max_seqlen = 3\\]"):
        ops.varlen_attention(q, k, v, cu, cu, 3, 4, backend="cpu")


def test_opcheck():
    shape = ([5, 0, 11], [7, 3, 11], 4, 2, 32)
    q, k, v = make_inputs(shape, torch.float32, "cpu")
    cu_q, cu_k = cu_seqlens(shape[0], "cpu"), cu_seqlens(shape[1], "cpu")
    op = torch.ops.msmartcompute
    for causal in (False, True):
        args = (q, k, v, cu_q, cu_k, 11, 11, causal, 0.2)
        torch.library.opcheck(op.varlen_attention_fwd.default, args)
        out, lse = op.varlen_attention_fwd(*args)
        torch.library.opcheck(op.varlen_attention_bwd.default,
                              (torch.randn_like(out), q, k, v, out, lse, cu_q, cu_k, 11, 11, causal, 0.2))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(op.varlen_attention_fwd.default, (*leaves, cu_q, cu_k, 11, 11, True, 0.2))


def test_compiles_with_fullgraph():
    shape = ([5, 9], [5, 12], 4, 2, 32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def attend(q, k, v, cu_q, cu_k):
        return ops.varlen_attention(q, k, v, cu_q, cu_k, 9, 12, causal=True, backend="cpu") * 2

    q, k, v = make_inputs(shape, torch.float32, "cpu", requires_grad=True)
    cu_q, cu_k = cu_seqlens(shape[0], "cpu"), cu_seqlens(shape[1], "cpu")
    out = attend(q, k, v, cu_q, cu_k)
    expected = ops.varlen_attention(q, k, v, cu_q, cu_k, 9, 12, causal=True, backend="cpu") * 2
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for g, e in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(expected.sum(), (q, k, v))):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
