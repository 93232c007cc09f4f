"""Which implementation runs an op: the extension, Triton or plain torch."""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")

try:
    from msmartcompute import _C  # noqa: F401  (registers torch.ops.msmartcompute.*)

    EXTENSION_ERROR: str | None = None
except ImportError as exc:  # not built: the torch reference still works
    _C = None
    EXTENSION_ERROR = str(exc)


def extension_loaded() -> bool:
    return _C is not None


def extension_has_cuda() -> bool:
    """True when the built extension registered CUDA kernels."""
    if _C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("msmartcompute::quantize_int8", "CUDA")


def triton_usable(device: torch.device) -> bool:
    """Triton runs CUDA tensors, and CPU tensors only in interpreter mode."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    device = torch.device(device)
    found = []
    if device.type == "cuda" and extension_has_cuda():
        found.append("cuda")
    if triton_usable(device):
        found.append("triton")
    if device.type == "cpu" and extension_loaded():
        found.append("cpu")
    found.append("torch")
    return found


def extension_info() -> dict:
    return {
        "loaded": extension_loaded(),
        "cuda_kernels": extension_has_cuda(),
        "error": EXTENSION_ERROR,
    }


def resolve(requested: str | None, device: torch.device, op: str) -> str:
    """The backend that runs `op` on a tensor on `device`; raises ValueError if unusable."""
    requested = requested or os.environ.get("MSC_KERNEL_BACKEND") or "auto"
    if requested not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    usable = available_backends(device)
    if requested == "auto":
        for choice in ("cuda", "cpu", "triton", "torch"):
            if choice in usable and (choice != "triton" or device.type == "cuda"):
                return choice
    if requested not in usable:
        reason = {
            "cuda": "needs a CUDA tensor and an extension built with CUDA",
            "cpu": f"needs a CPU tensor and the built extension ({EXTENSION_ERROR or 'loaded'})",
            "triton": "needs triton and a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)",
        }[requested]
        raise ValueError(
            f"{op}: backend {requested!r} cannot run a tensor on {device}: it {reason}; "
            f"usable here: {', '.join(usable)}"
        )
    return requested
