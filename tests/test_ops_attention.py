"""fused_attention on every backend this machine has, against the float64 reference.

Tolerances follow flash-attention's tests: a backend's error against the float64
reference may be at most twice that of plain torch computing in the same dtype, plus
the dtype's rounding at the output's magnitude.
"""
import pytest
import torch

from msmartcompute import ops
from msmartcompute.ops import reference
from attention_cases import CAUSAL, DEVICES, DTYPES, allowed_error, kernel_cases, max_err

# (B, H, Hkv, Sq, Sk, D): odd lengths, grouped-query, Sq = 1 decode, Sq < Sk.
SHAPES = [
    (1, 2, 2, 1, 1, 64),
    (2, 4, 2, 17, 17, 64),
    (1, 4, 1, 77, 77, 128),
    (1, 4, 2, 1, 300, 64),
    (1, 2, 1, 17, 300, 128),
    (1, 2, 2, 300, 300, 32),
]
INTERPRETER_SHAPES = [(1, 2, 2, 1, 1, 64), (1, 4, 2, 17, 17, 32), (1, 2, 1, 1, 77, 64), (1, 2, 2, 17, 40, 64),
                      (2, 4, 1, 77, 77, 128)]


def cases(shapes_for_interpreter=INTERPRETER_SHAPES, shapes=SHAPES):
    return kernel_cases("fused_attention_fwd", shapes_for_interpreter, shapes, lambda shape: shape[5],
                        lambda shape: "x".join(map(str, shape)), CAUSAL)


def make_inputs(shape, dtype, device, requires_grad=False):
    B, H, Hkv, Sq, Sk, D = shape
    q = torch.randn(B, H, Sq, D, device=device).to(dtype)
    k = torch.randn(B, Hkv, Sk, D, device=device).to(dtype)
    v = torch.randn(B, Hkv, Sk, D, device=device).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def test_extension_is_built():
    assert ops.extension_info()["loaded"], ops.extension_info()["error"]


@pytest.mark.parametrize("device,backend,dtype,shape,causal", list(cases()))
def test_forward_matches_reference(device, backend, dtype, shape, causal):
    q, k, v = make_inputs(shape, dtype, device)
    out = ops.fused_attention(q, k, v, causal=causal, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    ref64 = reference.attention_reference(q.double(), k.double(), v.double(), causal)
    baseline = reference.attention_reference(q, k, v, causal, compute_dtype=dtype)
    assert max_err(out, ref64) <= allowed_error(ref64, baseline, dtype, k.shape[2] * k.shape[3])


GRAD_SHAPES = [(1, 2, 2, 1, 1, 64), (2, 4, 2, 17, 17, 64), (1, 4, 2, 1, 300, 64), (1, 2, 1, 77, 300, 128)]
GRAD_INTERPRETER_SHAPES = [(1, 2, 2, 17, 17, 32), (1, 4, 2, 5, 40, 64), (1, 4, 2, 1, 77, 64), (1, 2, 1, 40, 77, 128)]


@pytest.mark.parametrize("device,backend,dtype,shape,causal", list(cases(GRAD_INTERPRETER_SHAPES, GRAD_SHAPES)))
def test_gradients_match_reference(device, backend, dtype, shape, causal):
    q, k, v = make_inputs(shape, dtype, device, requires_grad=True)
    grad = torch.randn(q.shape, device=device).to(dtype)
    out = ops.fused_attention(q, k, v, causal=causal, backend=backend)
    ours = torch.autograd.grad(out, (q, k, v), grad)

    def grads_of(inputs, compute_dtype):
        leaves = [t.detach().to(compute_dtype).requires_grad_() for t in inputs]
        o = reference.attention_reference(*leaves, causal, compute_dtype=compute_dtype)
        return torch.autograd.grad(o, leaves, grad.to(compute_dtype))

    ref64 = grads_of((q, k, v), torch.float64)
    baseline = grads_of((q, k, v), dtype)
    for name, g, r, b in zip("qkv", ours, ref64, baseline):
        assert g.shape == r.shape and g.dtype == dtype, name
        # scores sum over D, then dq sums over keys, dk/dv over the queries of a group
        terms = max(q.shape[2] * q.shape[1] // k.shape[1], k.shape[2]) * q.shape[3]
        assert max_err(g, r) <= allowed_error(r, b, dtype, terms, q.shape[3] ** 0.5), f"grad of {name}"


@pytest.mark.parametrize("backend", ops.available_backends("cpu"))
def test_non_contiguous_inputs(backend):
    # [B, S, H, D] storage viewed as [B, H, S, D], the layout a fused qkv projection gives.
    dtype = torch.float32
    q = torch.randn(2, 13, 4, 64).transpose(1, 2)
    k = torch.randn(2, 21, 2, 64).transpose(1, 2)
    v = torch.randn(2, 21, 2, 64).transpose(1, 2)
    assert not q.is_contiguous()
    out = ops.fused_attention(q, k, v, causal=True, backend=backend)
    ref64 = reference.attention_reference(q.double(), k.double(), v.double(), True)
    baseline = reference.attention_reference(q, k, v, True, compute_dtype=dtype)
    assert max_err(out, ref64) <= allowed_error(ref64, baseline, dtype, k.shape[2] * k.shape[3])


def test_scale_and_lse():
    q, k, v = make_inputs((1, 2, 2, 9, 33, 64), torch.float32, "cpu")
    out, lse = torch.ops.msmartcompute.fused_attention_fwd(q, k, v, False, 0.3)
    s = (q.double() @ k.double().transpose(-2, -1)) * 0.3
    ref64 = reference.attention_reference(q.double(), k.double(), v.double(), False, 0.3)
    baseline = reference.attention_reference(q, k, v, False, 0.3)
    assert max_err(out, ref64) <= allowed_error(ref64, baseline, torch.float32, k.shape[2] * k.shape[3])
    lse_ref = torch.logsumexp(s, -1)
    lse_baseline = torch.logsumexp((q @ k.transpose(-2, -1)) * 0.3, -1)
    assert max_err(lse, lse_ref) <= allowed_error(lse_ref, lse_baseline, torch.float32, k.shape[2] * k.shape[3])


def test_clear_errors():
    q, k, v = make_inputs((1, 4, 2, 8, 8, 64), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"q heads \(4\) must be a multiple of kv heads \(3\)"):
        ops.fused_attention(q, torch.ones(1, 3, 8, 64), torch.ones(1, 3, 8, 64))
    with pytest.raises(ValueError, match="head dim"):
        ops.fused_attention(q, k[..., :32], v[..., :32])
    with pytest.raises(ValueError, match="k and v must have one shape"):
        ops.fused_attention(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match="share a dtype"):
        ops.fused_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="one device"):
        ops.fused_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="causal needs Sq <= Sk"):
        ops.fused_attention(q, k[:, :, :4], v[:, :, :4], causal=True)
    with pytest.raises(ValueError, match=r"expected q \[B, H, Sq, D\]"):
        ops.fused_attention(q[0], k, v)
    with pytest.raises(ValueError, match="takes float32, bfloat16"):
        ops.fused_attention(q.double(), k.double(), v.double(), backend="cpu")
    if "triton" in ops.available_backends("cpu"):
        with pytest.raises(ValueError, match="head dim 48 is not supported by the triton kernels"):
            ops.fused_attention(q[..., :48], k[..., :48], v[..., :48], backend="triton")
    # The C++ op checks too, for callers that go through torch.ops directly.
    with pytest.raises(RuntimeError, match="multiple of the 3 kv heads"):
        torch.ops.msmartcompute.fused_attention_fwd(q, torch.ones(1, 3, 8, 64), torch.ones(1, 3, 8, 64), False, 1.0)
    with pytest.raises(RuntimeError, match="must share a dtype"):
        torch.ops.msmartcompute.fused_attention_fwd(q, k.half(), v, False, 1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    dtype = DTYPES[device][-1]
    q, k, v = make_inputs((2, 4, 2, 7, 19, 64), dtype, device)
    for causal in (False, True):
        torch.library.opcheck(torch.ops.msmartcompute.fused_attention_fwd.default, (q, k, v, causal, 0.125))
        out, lse = torch.ops.msmartcompute.fused_attention_fwd(q, k, v, causal, 0.125)
        torch.library.opcheck(torch.ops.msmartcompute.fused_attention_bwd.default,
                              (torch.randn_like(out), q, k, v, out, lse, causal, 0.125))
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    if device == "cpu":
        torch.library.opcheck(torch.ops.msmartcompute.fused_attention_fwd.default, (q32, k32, v32, True, 0.125))


def test_compiles_with_fullgraph():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def attend(q, k, v):
        return ops.fused_attention(q, k, v, causal=True, backend="cpu") * 2

    q, k, v = make_inputs((1, 4, 2, 17, 33, 64), torch.float32, "cpu", requires_grad=True)
    out = attend(q, k, v)
    expected = ops.fused_attention(q, k, v, causal=True, backend="cpu") * 2
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", [(2, 8, 2, 1024, 1024, 128), (2, 8, 8, 1, 8193, 64), (1, 16, 4, 4, 4099, 128),
                                   (1, 4, 4, 513, 2047, 64)], ids=str)
def test_gpu_long_sequences(backend, shape):
    # Long KV sequences take the CUDA split-KV decode path (Sq <= 16) and many tiles.
    for dtype in (torch.float16, torch.bfloat16):
        for causal in (False, True):
            q, k, v = make_inputs(shape, dtype, "cuda")
            out = ops.fused_attention(q, k, v, causal=causal, backend=backend)
            ref64 = reference.attention_reference(q.double(), k.double(), v.double(), causal)
            baseline = reference.attention_reference(q, k, v, causal, compute_dtype=dtype)
            assert max_err(out, ref64) <= allowed_error(ref64, baseline, dtype, k.shape[2] * k.shape[3])



@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", [(1, 8, 2, 300, 1031, 128), (2, 4, 4, 257, 257, 64), (1, 4, 2, 129, 200, 256),
                                   (2, 6, 2, 77, 131, 256), (1, 4, 1, 1, 333, 256), (3, 4, 1, 1, 777, 32)], ids=str)
def test_gpu_gradients_long_sequences(backend, shape):
    # Head dim 256 (cuda): dK/dV blocks split the output columns in two, dQ steps 16 keys; odd
    # lengths, GQA, causal with Sq != Sk (bottom-right), a decode row.
    for dtype in (torch.float16, torch.bfloat16):
        for causal in (False, True):
            q, k, v = make_inputs(shape, dtype, "cuda", requires_grad=True)
            grad = torch.randn(q.shape, device="cuda").to(dtype)
            ours = torch.autograd.grad(ops.fused_attention(q, k, v, causal=causal, backend=backend), (q, k, v), grad)
            leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
            ref64 = torch.autograd.grad(reference.attention_reference(*leaves64, causal), leaves64, grad.double())
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            baseline = torch.autograd.grad(reference.attention_reference(*leaves, causal, compute_dtype=dtype),
                                           leaves, grad)
            terms = max(shape[3] * shape[1] // shape[2], shape[4]) * shape[5]
            for name, g, r, b in zip("qkv", ours, ref64, baseline):
                assert max_err(g, r) <= allowed_error(r, b, dtype, terms, shape[5] ** 0.5), f"grad of {name}"

@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
@pytest.mark.parametrize("shape", [(2, 4, 2, 1, 1), (1, 8, 2, 1, 3001), (3, 6, 2, 5, 130), (1, 4, 4, 16, 70),
                                   (1, 4, 1, 17, 17), (2, 2, 2, 100, 333), (1, 2, 1, 129, 129)], ids=str)
def test_gpu_every_cuda_kernel_path(shape, head_dim):
    # Every CUDA forward instantiation: decode (Sq <= 16: warps split each key tile, keys split
    # across blocks for long caches) and prefill, each head dim, odd lengths, GQA, Sq != Sk.
    B, H, Hkv, Sq, Sk = shape
    for dtype in (torch.float16, torch.bfloat16):
        for causal in (False, True):
            q, k, v = make_inputs((B, H, Hkv, Sq, Sk, head_dim), dtype, "cuda")
            out, lse = torch.ops.msmartcompute.fused_attention_fwd(q, k, v, causal, head_dim ** -0.5)
            ref64 = reference.attention_reference(q.double(), k.double(), v.double(), causal)
            baseline = reference.attention_reference(q, k, v, causal, compute_dtype=dtype)
            assert max_err(out, ref64) <= allowed_error(ref64, baseline, dtype, Sk * head_dim), (dtype, causal)
            scores = (q.double() @ k.double().repeat_interleave(H // Hkv, 1).transpose(-2, -1)) * head_dim ** -0.5
            if causal:
                scores = scores.masked_fill(torch.ones(Sq, Sk, dtype=torch.bool, device="cuda")
                                            .tril(Sk - Sq).logical_not(), float("-inf"))
            assert max_err(lse, torch.logsumexp(scores, -1)) <= 1e-3 * Sk ** 0.5, (dtype, causal)


@pytest.mark.gpu
def test_gpu_strided_inputs_are_not_copied():
    # q/k/v as views with strides on the sequence and head dims (a fused qkv projection's
    # [B, S, 3, H, D] output, a KV-cache slice): the CUDA op reads them in place.
    B, S, H, D, cap = 2, 37, 4, 64, 200
    for dtype in (torch.float16, torch.bfloat16):
        qkv = torch.randn(B, S, 3, H, D, device="cuda").to(dtype)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        assert not q.is_contiguous() and q.stride(-1) == 1
        for causal in (False, True):
            out = ops.fused_attention(q, k, v, causal=causal, backend="cuda")
            ref64 = reference.attention_reference(q.double(), k.double(), v.double(), causal)
            baseline = reference.attention_reference(q, k, v, causal, compute_dtype=dtype)
            assert max_err(out, ref64) <= allowed_error(ref64, baseline, dtype, S * D)
        cache_k = torch.randn(B, 2, cap, D, device="cuda").to(dtype)
        cache_v = torch.randn(B, 2, cap, D, device="cuda").to(dtype)
        step_q = torch.randn(B, H, 1, D, device="cuda").to(dtype)
        ops.fused_attention(step_q, cache_k[:, :, :50], cache_v[:, :, :50], causal=True, backend="cuda")
        torch.cuda.synchronize()
        for end in (51, 120, 199):
            before = torch.cuda.memory_stats()["allocation.all.allocated"]
            k_view, v_view = cache_k[:, :, :end], cache_v[:, :, :end]
            assert not k_view.is_contiguous()
            out, lse = torch.ops.msmartcompute.fused_attention_fwd(step_q, k_view, v_view, True, D ** -0.5)
            allocations = torch.cuda.memory_stats()["allocation.all.allocated"] - before
            # out, lse and at most one split-KV workspace: never a copy of the cache slice
            assert allocations <= 3, allocations
            ref64 = reference.attention_reference(step_q.double(), k_view.double(), v_view.double(), True)
            baseline = reference.attention_reference(step_q, k_view, v_view, True, compute_dtype=dtype)
            assert max_err(out, ref64) <= allowed_error(ref64, baseline, dtype, end * D)


@pytest.mark.gpu
def test_gpu_strided_gradients():
    B, S, H, D = 2, 45, 4, 64
    for dtype in (torch.float16, torch.bfloat16):
        qkv = torch.randn(B, S, 3, H, D, device="cuda").to(dtype).requires_grad_()
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        grad = torch.randn(B, H, S, D, device="cuda").to(dtype)
        (ours,) = torch.autograd.grad(ops.fused_attention(q, k, v, causal=True, backend="cuda"), qkv, grad)
        leaf64 = qkv.detach().double().requires_grad_()
        q64, k64, v64 = (leaf64[:, :, i].transpose(1, 2) for i in range(3))
        (ref64,) = torch.autograd.grad(reference.attention_reference(q64, k64, v64, True), leaf64, grad.double())
        leaf = qkv.detach().clone().requires_grad_()
        qb, kb, vb = (leaf[:, :, i].transpose(1, 2) for i in range(3))
        (baseline,) = torch.autograd.grad(reference.attention_reference(qb, kb, vb, True, compute_dtype=dtype),
                                          leaf, grad)
        assert max_err(ours, ref64) <= allowed_error(ref64, baseline, dtype, S * D, D ** 0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
@pytest.mark.parametrize("shape", [([3000, 17, 5000], 1, 8, 2, 16), ([1, 700], 4, 4, 4, 5), ([500, 41], 40, 4, 1, 32),
                                   ([0, 9], 2, 2, 2, 16)], ids=str)
def test_gpu_paged_attention_cuda_paths(shape, head_dim):
    # The CUDA paged kernel: long contexts split across blocks (decode), GQA, odd block sizes,
    # chunked prefill (Sq > 16), an empty sequence and queries that see no key.
    from test_ops_paged_attention import check_against_reference, make_cache

    lens, sq, h, hkv, bs = shape
    for dtype in (torch.float16, torch.bfloat16):
        inputs = make_cache((lens, sq, h, hkv, head_dim, bs), dtype, "cuda")
        out = ops.paged_attention(*inputs, backend="cuda")
        check_against_reference(out, inputs, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
@pytest.mark.parametrize("lens", [([300, 1, 0, 77], [300, 5, 3, 200]), ([1, 4, 16], [900, 4, 33]),
                                  ([129, 130], [129, 130])], ids=str)
def test_gpu_varlen_attention_cuda_paths(lens, head_dim):
    # The CUDA varlen kernels, forward and backward, GQA, causal rows that
    # see no key, decode-like batches (every sequence <= 16 queries).
    from test_ops_varlen_attention import cu_seqlens

    lens_q, lens_k = lens
    h, hkv = 4, 2
    for dtype in (torch.float16, torch.bfloat16):
        for causal in (False, True):
            q = torch.randn(sum(lens_q), h, head_dim, device="cuda").to(dtype).requires_grad_()
            k = torch.randn(sum(lens_k), hkv, head_dim, device="cuda").to(dtype).requires_grad_()
            v = torch.randn(sum(lens_k), hkv, head_dim, device="cuda").to(dtype).requires_grad_()
            cu_q, cu_k = cu_seqlens(lens_q, "cuda"), cu_seqlens(lens_k, "cuda")
            out = ops.varlen_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, backend="cuda")
            grad = torch.randn_like(out)
            ours = torch.autograd.grad(out, (q, k, v), grad)

            def run_reference(compute_dtype):
                leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
                o = reference.varlen_attention_reference(*leaves, cu_q, cu_k, causal, compute_dtype=compute_dtype)
                return o, torch.autograd.grad(o, leaves, grad.to(compute_dtype))

            ref64, grads64 = run_reference(torch.float64)
            baseline, grads = run_reference(dtype)
            assert max_err(out, ref64) <= allowed_error(ref64, baseline, dtype, max(lens_k) * head_dim)
            terms = max(max(lens_q) * h // hkv, max(lens_k)) * head_dim
            for name, g, r, b in zip("qkv", ours, grads64, grads):
                assert max_err(g, r) <= allowed_error(r, b, dtype, terms, head_dim ** 0.5), (name, dtype, causal)


def test_triton_kernels_lower_to_tensor_cores():
    # The interpreter cannot show what the compiler makes of the kernels: lower the forward and
    # backward for real targets (no GPU needed) and look for mma.sync (sm_80) / wgmma (sm_90).
    import os
    import subprocess
    import sys

    code = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from msmartcompute.ops.triton import attention
done = set()
for kernel, signature, constexprs in attention.AOT_SPECS:
    if kernel.fn.__name__ in done or constexprs["HEAD_DIM"] != 64:
        continue
    done.add(kernel.fn.__name__)
    for arch, instruction in ((80, "mma.sync"), (90, "wgmma.mma_async")):
        source = ASTSource(kernel, dict(signature, **{n: "constexpr" for n in constexprs}), constexprs)
        ptx = compile(source, target=GPUTarget("cuda", arch, 32)).asm["ptx"]
        assert instruction in ptx, (kernel.fn.__name__, arch)
print(sorted(done))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "_attn_fwd_kernel" in result.stdout and "_attn_bwd_dq_kernel" in result.stdout


@pytest.mark.skipif(not ops.extension_info()["cuda_kernels"], reason="extension built without CUDA")
def test_cuda_kernels_use_tensor_cores():
    # Built without a GPU here, so the SASS is the proof: every instantiation of the attention
    # forward and backward kernels for sm_90 must hold HMMA (mma.sync m16n8k16) instructions.
    from device_code import sm90_functions

    # fp16/bf16 x head dims 32/64/128/256 x prefill / decode; backward: fp16/bf16 x 32/64/128/256.
    # Operands reach the tensor cores through ldmatrix (LDSM; .trans: MT88) from tiles that
    # cp.async (LDGSTS) fills.
    for kernel, count in (("20attention_fwd_kernel", 16), ("25attention_bwd_dkdv_kernel", 8),
                          ("23attention_bwd_dq_kernel", 8)):
        found = sm90_functions(kernel)
        assert len(found) == count, kernel
        for body in found:
            for instruction in ("HMMA.16816.F32", "LDSM.16.M88.4", "LDSM.16.MT88.4", "LDGSTS"):
                assert instruction in body, (instruction, body.split("\n", 1)[0])


def test_gpu_benchmark_script_parses_arguments(capsys):
    # The GPU benchmark cannot run here; its import and argument parsing can.
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu",
                        "bench_attention.py")
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--list", "--seqlens", "512", "4096", "--head-dims", "128", "--causal", "yes"]) == 0
    printed = capsys.readouterr().out
    assert "4 cases x 5 implementations" in printed
    assert bench.flops({"batch": 1, "heads": 1, "seqlen": 2, "head_dim": 1, "causal": False, "mode": "fwd"}) == 16


def test_gpu_paged_decode_script_parses_arguments(capsys):
    # The decode-bandwidth benchmark cannot run here; its import, cases and byte count can.
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu",
                        "bench_paged_decode.py")
    spec = importlib.util.spec_from_file_location("bench_paged_decode", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--list", "--batches", "2", "--contexts", "100", "4096"]) == 0
    assert "2 cases x 4 implementations" in capsys.readouterr().out
    case = {"batch": 2, "context": 100, "kv_heads": 8, "head_dim": 128}
    assert bench.kv_bytes(case) == 2 * 2 * 100 * 8 * 128 * 2


def allocated_bytes(fn) -> int:
    """Bytes the torch allocator hands out while fn runs (the profiler's memory records)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(event.self_cpu_memory_usage, 0) for event in prof.key_averages())


def test_decode_step_reads_the_cache_in_place():
    # One decode step against the first `end` positions of a [B, Hkv, capacity, D] cache: the
    # slice is a strided view, and the step allocates only its output and lse, however long the
    # cache (before: .contiguous() copied all `end` positions of k and v every step).
    cache_k, cache_v = torch.randn(2, 2, 4096, 64), torch.randn(2, 2, 4096, 64)
    q = torch.randn(2, 4, 1, 64)
    sizes = []
    for end in (16, 4096 - 7):
        k, v = cache_k[:, :, :end], cache_v[:, :, :end]
        assert not k.is_contiguous()
        sizes.append(allocated_bytes(lambda: ops.fused_attention(q, k, v, causal=True, backend="cpu")))
    out_and_lse = q.numel() * 4 + q[..., 0].numel() * 4
    assert sizes[0] == sizes[1] <= 2 * out_and_lse, sizes


@pytest.mark.skipif("triton" not in ops.available_backends("cpu"), reason="needs triton")
def test_triton_grids_stay_within_cuda_limits(monkeypatch):
    # CUDA caps grid y and z at 65535; B * H = 70000 heads must not land there. The interpreter
    # does not enforce the limit, so the launches are recorded (and skipped) instead of run.
    import triton.runtime.interpreter as interpreter

    grids = []
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", lambda self, *a, **k: grids.append(self.grid))
    from msmartcompute.ops.triton import attention as triton_attention

    q = torch.zeros(2, 35000, 1, 32)
    out, lse = triton_attention.attention_fwd(q, q, q, True, 1.0)
    triton_attention.attention_bwd(out, q, q, q, out, lse, True, 1.0)
    assert len(grids) == 3
    for grid in grids:
        assert all(size <= 65535 for size in grid[1:]) and grid[0] < 2 ** 31, grid
        assert grid[0] * (grid[1] if len(grid) > 1 else 1) >= 70000, grid  # every (batch, head) gets programs
