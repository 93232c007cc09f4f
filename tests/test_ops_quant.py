"""quantize_int8 / dequantize_int8 on every backend this machine has, against the reference."""
import pytest
import torch

from msmartcompute import ops
from msmartcompute.ops import reference

DEVICES = ["cpu", "cuda"]  # the cuda cases are collected everywhere and skipped without a GPU (conftest)
SHAPES = [(1, 1), (4, 100), (7, 129), (3, 5, 77), (2, 1031), (0, 16)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def backends_for(device):
    found = ops.available_backends(device)
    assert "torch" in found
    return found


def cases():
    for device in DEVICES:
        for backend in backends_for(device):
            for dtype in DTYPES:
                # bf16 is wrong in the Triton interpreter (BUILD_NOTES); it runs on GPUs.
                if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
                    continue
                yield pytest.param(device, backend, dtype, id=f"{device}-{backend}-{str(dtype)[6:]}")


def test_extension_is_built():
    info = ops.extension_info()
    assert info["loaded"], info["error"]


@pytest.mark.parametrize("device,backend,dtype", list(cases()))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_matches_reference_exactly(device, backend, dtype, shape):
    x = (torch.randn(shape, device=device) * torch.rand(1, device=device) * 10).to(dtype)
    q, scale = ops.quantize_int8(x, backend=backend)
    q_ref, scale_ref = reference.quantize_int8(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q.shape == x.shape and scale.shape == x.shape[:-1]
    torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend,dtype", list(cases()))
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_quantize_along_any_dim(device, backend, dtype, dim):
    x = torch.randn(6, 9, 5, device=device).to(dtype)
    q, scale = ops.quantize_int8(x, dim, backend=backend)
    q_ref, scale_ref = reference.quantize_int8(x, dim)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=0)
    torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)
    out = ops.dequantize_int8(q, scale, dtype, dim=dim, backend=backend)
    torch.testing.assert_close(out, reference.dequantize_int8(q_ref, scale_ref, dim, dtype), rtol=0, atol=0)


@pytest.mark.parametrize("device,backend,dtype", list(cases()))
def test_round_trip_error_is_within_half_a_step(device, backend, dtype):
    x = torch.randn(33, 257, device=device, dtype=torch.float32)
    q, scale = ops.quantize_int8(x.to(dtype), backend=backend)
    back = ops.dequantize_int8(q, scale, torch.float32, backend=backend)
    # float32 input: |x - q*s| <= s/2 plus rounding of the division; half types add their own rounding.
    slack = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert ((back - x).abs() <= scale[:, None] * 0.5 + slack * x.abs().amax(-1, keepdim=True) + 1e-7).all()


@pytest.mark.parametrize("device,backend", [(d, b) for d in DEVICES for b in backends_for(d)])
def test_edge_values(device, backend):
    # Halves round to even; all-zero rows get scale 1, not NaN; absmax maps to +-127.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, -127.0],
                      [0.0] * 8], device=device)
    q, scale = ops.quantize_int8(x, backend=backend)
    assert q[0].tolist() == [127, 0, 2, 2, 0, -2, -2, -127]
    assert scale.tolist() == [1.0, 1.0]
    assert q[1].tolist() == [0] * 8


def test_non_contiguous_input():
    x = torch.randn(64, 48).t()[:, 3:40]  # strided view
    assert not x.is_contiguous()
    for backend in backends_for("cpu"):
        q, scale = ops.quantize_int8(x, backend=backend)
        q_ref, scale_ref = reference.quantize_int8(x)
        torch.testing.assert_close(q, q_ref, rtol=0, atol=0)
        torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)


def test_clear_errors():
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        ops.quantize_int8(torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="out of range"):
        ops.quantize_int8(torch.ones(3, 4), dim=2)
    with pytest.raises(ValueError, match="unknown backend"):
        ops.quantize_int8(torch.ones(3, 4), backend="fast")
    with pytest.raises(ValueError, match="backend 'cuda' cannot run"):
        ops.quantize_int8(torch.ones(3, 4), backend="cuda")
    with pytest.raises(ValueError, match="scale has shape"):
        ops.dequantize_int8(torch.zeros(3, 4, dtype=torch.int8), torch.ones(4))
    # The C++ op checks too, for callers that go through torch.ops directly.
    with pytest.raises(RuntimeError, match="expected float32, float16 or bfloat16"):
        torch.ops.msmartcompute.quantize_int8(torch.ones(3, dtype=torch.int64), -1)


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv("MSC_KERNEL_BACKEND", "torch")
    from msmartcompute.ops import _backend

    assert _backend.resolve(None, torch.device("cpu"), "op") == "torch"
    monkeypatch.setenv("MSC_KERNEL_BACKEND", "cpu")
    assert _backend.resolve(None, torch.device("cpu"), "op") == "cpu"


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(5, 37, device=device)
    torch.library.opcheck(torch.ops.msmartcompute.quantize_int8.default, (x, -1))
    torch.library.opcheck(torch.ops.msmartcompute.quantize_int8.default, (x.half(), 0))
    q, scale = torch.ops.msmartcompute.quantize_int8(x, -1)
    torch.library.opcheck(torch.ops.msmartcompute.dequantize_int8.default, (q, scale, -1, torch.bfloat16))


def test_compiles_with_fullgraph():
    @torch.compile(fullgraph=True, backend="eager")
    def roundtrip(x):
        q, scale = torch.ops.msmartcompute.quantize_int8(x, -1)
        return torch.ops.msmartcompute.dequantize_int8(q, scale, -1, torch.float32)

    x = torch.randn(8, 64)
    q_ref, scale_ref = reference.quantize_int8(x)
    torch.testing.assert_close(roundtrip(x), reference.dequantize_int8(q_ref, scale_ref), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("cols", [4096, 4095, 8])
def test_cuda_vector_and_scalar_paths(cols):
    # 4096 takes the 16-byte vector path, 4095 the scalar one.
    for dtype in DTYPES:
        x = torch.randn(129, cols, device="cuda", dtype=dtype)
        q, scale = ops.quantize_int8(x, backend="cuda")
        q_ref, scale_ref = reference.quantize_int8(x)
        torch.testing.assert_close(q, q_ref, rtol=0, atol=0)
        torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)
