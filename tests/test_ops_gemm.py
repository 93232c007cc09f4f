"""int8_matmul / int8_linear / mixed_gemm on every backend this machine has, against the reference."""
import pytest
import torch

from msmartcompute import ops
from msmartcompute.ops import reference

DEVICES = ["cpu", "cuda"]  # the cuda cases are collected everywhere and skipped without a GPU (conftest)
# (M, K, N): M in {1, 7, 129}; K and N off every tile size the kernels use (16/32/64/128).
SHAPES = [(1, 40, 24), (7, 100, 33), (129, 67, 130)]
ACTIVATIONS = [None, "relu", "gelu", "silu"]


def interpreted(device, backend):
    return backend == "triton" and device == "cpu"


def backend_cases(float_dtypes=(torch.float32, torch.float16, torch.bfloat16), half_only_on_gpu_kernels=False):
    for device in DEVICES:
        for backend in ops.available_backends(device):
            for dtype in float_dtypes:
                # bf16 is wrong in the Triton interpreter (BUILD_NOTES); it runs on GPUs.
                if interpreted(device, backend) and dtype == torch.bfloat16:
                    continue
                if half_only_on_gpu_kernels and backend in ("cuda", "triton") and dtype == torch.float32:
                    continue
                yield pytest.param(device, backend, dtype, id=f"{device}-{backend}-{str(dtype)[6:]}")


def int8_operands(M, K, N, device):
    a_q = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=device)
    b_q = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
    a_scale = torch.rand(M, device=device) / 100 + 1e-3
    b_scale = torch.rand(N, device=device) / 100 + 1e-3
    return a_q, b_q, a_scale, b_scale


def one_ulp_close(out, ref):
    """Equal up to one rounding of the output dtype (the float32 epilogue may round once differently)."""
    eps = torch.finfo(ref.dtype).eps
    torch.testing.assert_close(out.float(), ref.float(), rtol=eps, atol=eps * ref.float().abs().max().item())


def assert_within_torch_error(out, truth, torch_same_dtype):
    """Our error against a float64 truth is at most twice torch's own error in the same dtype
    (flash-attention's rule), plus one rounding of the output dtype."""
    scale = truth.abs().max().item()
    ours = (out.double() - truth).abs().max().item()
    theirs = (torch_same_dtype.double() - truth).abs().max().item()
    bound = 2 * theirs + torch.finfo(out.dtype).eps * scale
    assert ours <= bound, f"error {ours:.3g} > bound {bound:.3g} (torch's same-dtype error {theirs:.3g})"


def int8_backends():
    return [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in ops.available_backends(d)]


def test_ops_are_exported():
    assert {"int8_matmul", "int8_linear", "mixed_gemm"} <= set(ops.__all__)


# ---- int8_matmul -------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", int8_backends())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int8_matmul_int32_is_exact(device, backend, shape):
    a_q, b_q, a_scale, b_scale = int8_operands(*shape, device)
    out = ops.int8_matmul(a_q, b_q, a_scale, b_scale, out_dtype=torch.int32, backend=backend)
    assert out.dtype == torch.int32 and out.shape == (shape[0], shape[2])
    torch.testing.assert_close(out, reference.int8_matmul(a_q, b_q, a_scale, b_scale, None, torch.int32),
                               rtol=0, atol=0)


def test_int8_matmul_accumulates_beyond_int16():
    # All +-127: every dot product is +-127*127*K, far past int16, exactly representable in int32.
    K = 1000
    a_q = torch.full((3, K), 127, dtype=torch.int8)
    b_q = torch.full((5, K), -127, dtype=torch.int8)
    for backend in ops.available_backends("cpu"):
        out = ops.int8_matmul(a_q, b_q, torch.ones(3), torch.ones(5), out_dtype=torch.int32, backend=backend)
        assert (out == -127 * 127 * K).all(), backend


@pytest.mark.parametrize("device,backend,dtype", list(backend_cases()))
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_int8_matmul_epilogue(device, backend, dtype, with_bias):
    M, K, N = 7, 100, 33
    a_q, b_q, a_scale, b_scale = int8_operands(M, K, N, device)
    bias = torch.randn(N, device=device).to(dtype) if with_bias else None
    out = ops.int8_matmul(a_q, b_q, a_scale, b_scale, bias, dtype, backend=backend)
    assert out.dtype == dtype and out.shape == (M, N)
    one_ulp_close(out, reference.int8_matmul(a_q, b_q, a_scale, b_scale, bias, dtype))


@pytest.mark.parametrize("device,backend", int8_backends())
def test_int8_matmul_non_contiguous(device, backend):
    a_q, b_q, a_scale, b_scale = int8_operands(70, 50, 40, device)
    a_t = a_q.t().contiguous().t()[::2]        # column-major, every other row: [35, 50]
    b_t = b_q[:, 5:45]                         # row stride 50: [40, 40]
    a_t = a_t[:, 5:45]
    assert not a_t.is_contiguous() and not b_t.is_contiguous()
    sa, sb = a_scale[::2].contiguous(), b_scale
    out = ops.int8_matmul(a_t, b_t, sa, sb, out_dtype=torch.int32, backend=backend)
    torch.testing.assert_close(out, reference.int8_matmul(a_t, b_t, sa, sb, None, torch.int32), rtol=0, atol=0)


# ---- int8_linear -------------------------------------------------------------------------------

def linear_operands(lead, K, N, dtype, device, with_bias=True):
    x = torch.randn(*lead, K, device=device).to(dtype)
    w_q, w_scale = reference.quantize_int8(torch.randn(N, K, device=device))
    bias = torch.randn(N, device=device).to(dtype) if with_bias else None
    return x, w_q, w_scale, bias


@pytest.mark.parametrize("device,backend,dtype", list(backend_cases()))
@pytest.mark.parametrize("lead", [(1,), (7,), (3, 43)], ids=str)
def test_int8_linear_w8a8_matches_reference(device, backend, dtype, lead):
    x, w_q, w_scale, bias = linear_operands(lead, 67, 130, dtype, device)
    out = ops.int8_linear(x, w_q, w_scale, bias, "w8a8", backend=backend)
    assert out.dtype == dtype and out.shape == (*lead, 130)
    # Per-token quantization is exact on every backend, so only the epilogue may round differently.
    one_ulp_close(out, reference.int8_linear(x, w_q, w_scale, bias, "w8a8"))


@pytest.mark.parametrize("device,backend,dtype", list(backend_cases()))
@pytest.mark.parametrize("lead", [(1,), (7,), (3, 43)], ids=str)
def test_int8_linear_w8a16_within_torch_error(device, backend, dtype, lead):
    x, w_q, w_scale, bias = linear_operands(lead, 67, 130, dtype, device)
    out = ops.int8_linear(x, w_q, w_scale, bias, "w8a16", backend=backend)
    assert out.dtype == dtype and out.shape == (*lead, 130)
    w = reference.dequantize_int8(w_q, w_scale, dtype=torch.float64)
    truth = torch.nn.functional.linear(x.double(), w, bias.double())
    same_dtype = torch.nn.functional.linear(x, w.to(dtype), bias)
    assert_within_torch_error(out, truth, same_dtype)


@pytest.mark.parametrize("device,backend", int8_backends())
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_int8_linear_non_contiguous(device, backend, mode):
    dtype = torch.float32 if interpreted(device, backend) or device == "cpu" else torch.float16
    x = torch.randn(50, 9, device=device).to(dtype).t()  # [9, 50], column-major
    w_q, w_scale = reference.quantize_int8(torch.randn(40, 50, device=device))
    w_q = w_q.t().contiguous().t()  # same values, column-major
    assert not x.is_contiguous() and not w_q.is_contiguous()
    out = ops.int8_linear(x, w_q, w_scale, None, mode, backend=backend)
    ref = reference.int8_linear(x, w_q, w_scale, None, mode)
    if mode == "w8a8":
        one_ulp_close(out, ref)
    else:
        w = reference.dequantize_int8(w_q, w_scale, dtype=torch.float64)
        assert_within_torch_error(out, x.double() @ w.t(), x @ w.to(dtype).t())


def test_int8_linear_tracks_float_linear():
    # The quantized linear stays close to the float one it replaces (per-token and
    # per-channel int8: a relative error of a few 1/127 steps).
    x, w = torch.randn(16, 256), torch.randn(64, 256)
    w_q, w_scale = ops.quantize_int8(w)
    exact = x @ w.t()
    for mode in ("w8a8", "w8a16"):
        out = ops.int8_linear(x, w_q, w_scale, mode=mode)
        assert (out - exact).norm() / exact.norm() < 3 / 127, mode


# ---- mixed_gemm --------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend,dtype", list(backend_cases(half_only_on_gpu_kernels=True)))
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_mixed_gemm_within_torch_error(device, backend, dtype, activation, shape):
    M, K, N = shape
    a = torch.randn(M, K, device=device).to(dtype)
    b = (torch.randn(N, K, device=device) / K ** 0.5).to(dtype)
    bias = torch.randn(N, device=device).to(dtype)
    out = ops.mixed_gemm(a, b, bias, activation, backend=backend)
    assert out.dtype == dtype and out.shape == (M, N)
    truth = reference.mixed_gemm(a, b, bias, activation, torch.float64, compute_dtype=torch.float64)
    same_dtype = reference.mixed_gemm(a, b, bias, activation, compute_dtype=dtype)
    assert_within_torch_error(out, truth, same_dtype)


@pytest.mark.parametrize("device,backend,dtype", list(backend_cases(half_only_on_gpu_kernels=True)))
def test_mixed_gemm_out_dtype_and_no_bias(device, backend, dtype):
    a = torch.randn(7, 100, device=device).to(dtype)
    b = torch.randn(33, 100, device=device).to(dtype)
    out = ops.mixed_gemm(a, b, out_dtype=torch.float32, backend=backend)
    assert out.dtype == torch.float32
    truth = reference.mixed_gemm(a, b, None, None, torch.float64, compute_dtype=torch.float64)
    assert_within_torch_error(out, truth, reference.mixed_gemm(a, b, compute_dtype=dtype))


@pytest.mark.parametrize("device,backend,dtype", list(backend_cases(half_only_on_gpu_kernels=True)))
def test_mixed_gemm_non_contiguous(device, backend, dtype):
    a = torch.randn(60, 9, device=device).to(dtype).t()   # [9, 60], column-major
    b = torch.randn(35, 70, device=device).to(dtype)[:, 5:65]  # [35, 60], row stride 70
    assert not a.is_contiguous() and not b.is_contiguous()
    out = ops.mixed_gemm(a, b, None, "silu", backend=backend)
    truth = reference.mixed_gemm(a, b, None, "silu", torch.float64, compute_dtype=torch.float64)
    assert_within_torch_error(out, truth, reference.mixed_gemm(a, b, None, "silu", compute_dtype=dtype))


# ---- errors, opcheck, compile ------------------------------------------------------------------

def test_clear_errors():
    q = torch.zeros(3, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="disagree on K"):
        ops.int8_matmul(q, torch.zeros(4, 9, dtype=torch.int8), torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="bias must be None"):
        ops.int8_matmul(q, q, torch.ones(3), torch.ones(3), torch.ones(3), torch.int32)
    with pytest.raises(ValueError, match="mode must be"):
        ops.int8_linear(torch.ones(2, 8), q, torch.ones(3), mode="w4a16")
    with pytest.raises(ValueError, match="activation must be"):
        ops.mixed_gemm(torch.ones(2, 8), torch.ones(3, 8), activation="tanh")
    with pytest.raises(ValueError, match="bias must be"):
        ops.mixed_gemm(torch.ones(2, 8), torch.ones(3, 8), torch.ones(4))
    # The C++ ops check too, for callers that go through torch.ops directly.
    with pytest.raises(RuntimeError, match="disagree on K"):
        torch.ops.msmartcompute.int8_matmul(q, torch.zeros(4, 9, dtype=torch.int8), torch.ones(3), torch.ones(4))
    with pytest.raises(RuntimeError, match="activation must be"):
        torch.ops.msmartcompute.mixed_gemm(torch.ones(2, 8), torch.ones(3, 8), None, "tanh")
    with pytest.raises(RuntimeError, match="mode must be"):
        torch.ops.msmartcompute.int8_linear(torch.ones(2, 8), q, torch.ones(3), None, "w4")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    half = torch.float32 if device == "cpu" else torch.float16
    a_q, b_q, a_scale, b_scale = int8_operands(7, 40, 24, device)
    bias = torch.randn(24, device=device)
    torch.library.opcheck(torch.ops.msmartcompute.int8_matmul.default, (a_q, b_q, a_scale, b_scale, bias, torch.float16))
    torch.library.opcheck(torch.ops.msmartcompute.int8_matmul.default, (a_q, b_q, a_scale, b_scale, None, torch.int32))
    x = torch.randn(2, 7, 40, device=device)
    for mode in ("w8a8", "w8a16"):
        torch.library.opcheck(torch.ops.msmartcompute.int8_linear.default, (x.to(half), b_q, b_scale, bias, mode))
    a, b = torch.randn(7, 40, device=device).to(half), torch.randn(24, 40, device=device).to(half)
    torch.library.opcheck(torch.ops.msmartcompute.mixed_gemm.default, (a, b, bias, "gelu", None))
    torch.library.opcheck(torch.ops.msmartcompute.mixed_gemm.default, (a, b, None, None, torch.float32))


def test_compiles_with_fullgraph():
    @torch.compile(fullgraph=True, backend="eager")
    def mlp(x, w_q, w_scale, w2):
        h = torch.ops.msmartcompute.int8_linear(x, w_q, w_scale, None, "w8a8")
        return torch.ops.msmartcompute.mixed_gemm(h, w2, None, "relu", None)

    x, w2 = torch.randn(4, 32), torch.randn(8, 16)
    w_q, w_scale = reference.quantize_int8(torch.randn(16, 32))
    expected = reference.mixed_gemm(reference.int8_linear(x, w_q, w_scale), w2, None, "relu")
    torch.testing.assert_close(mlp(x, w_q, w_scale, w2), expected)


# ---- GPU only: sizes that exercise full tiles, the pipeline and the tails ------------------------

GPU_SHAPES = [(1, 4096, 4096), (16, 4096, 1000), (129, 1000, 4096), (512, 2048, 2048), (257, 4104, 771)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_int8_matmul_exact(backend, shape):
    a_q, b_q, a_scale, b_scale = int8_operands(*shape, "cuda")
    out = ops.int8_matmul(a_q, b_q, a_scale, b_scale, out_dtype=torch.int32, backend=backend)
    torch.testing.assert_close(out, reference.int8_matmul(a_q, b_q, a_scale, b_scale, None, torch.int32),
                               rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_mixed_gemm_and_w8a16(backend, shape, dtype):
    M, K, N = shape
    a = torch.randn(M, K, device="cuda").to(dtype)
    b = (torch.randn(N, K, device="cuda") / K ** 0.5).to(dtype)
    bias = torch.randn(N, device="cuda").to(dtype)
    out = ops.mixed_gemm(a, b, bias, "gelu", backend=backend)
    truth = reference.mixed_gemm(a, b, bias, "gelu", torch.float64, compute_dtype=torch.float64)
    assert_within_torch_error(out, truth, reference.mixed_gemm(a, b, bias, "gelu", compute_dtype=dtype))
    w_q, w_scale = reference.quantize_int8(b.float())
    out = ops.int8_linear(a, w_q, w_scale, bias, "w8a16", backend=backend)
    w = reference.dequantize_int8(w_q, w_scale, dtype=torch.float64)
    assert_within_torch_error(out, torch.nn.functional.linear(a.double(), w, bias.double()),
                              torch.nn.functional.linear(a, w.to(dtype), bias))
    out = ops.int8_linear(a, w_q, w_scale, bias, "w8a8", backend=backend)
    one_ulp_close(out, reference.int8_linear(a, w_q, w_scale, bias, "w8a8"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_mixed_gemm_gradients(device, activation):
    # float32 on CPU, float16 on a GPU (the tensor-core kernels take half types).
    dtype = torch.float32 if device == "cpu" else torch.float16
    a = torch.randn(7, 33, device=device).to(dtype).requires_grad_()
    b = (torch.randn(20, 33, device=device) / 6).to(dtype).requires_grad_()
    bias = torch.randn(20, device=device).to(dtype).requires_grad_()
    grad_out = torch.randn(7, 20, device=device).to(dtype)
    ours = torch.autograd.grad(ops.mixed_gemm(a, b, bias, activation), (a, b, bias), grad_out)

    def grads(compute_dtype):
        leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (a, b, bias)]
        out = reference.mixed_gemm(*leaves, activation, compute_dtype, compute_dtype=compute_dtype)
        return torch.autograd.grad(out, leaves, grad_out.to(compute_dtype))

    for mine, truth, same_dtype in zip(ours, grads(torch.float64), grads(dtype)):
        assert mine.dtype == dtype
        assert_within_torch_error(mine, truth, same_dtype)


def test_mixed_gemm_opcheck_with_grad():
    a, b = torch.randn(5, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    torch.library.opcheck(torch.ops.msmartcompute.mixed_gemm.default, (a, b, bias, "silu", None))
    torch.library.opcheck(torch.ops.msmartcompute.mixed_gemm.default, (a, b, None, None, None))
