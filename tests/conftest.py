"""Shared test set-up. TRITON_INTERPRET must be set before any @triton.jit runs
its decorator, so it is decided here, before the kernel modules are imported.

Two rules keep the GPU run (benchmarks/gpu/run_all.sh) honest on a machine that has a
GPU but no server stack:
- every test case that runs on CUDA carries the `gpu` mark: the ones marked by hand and
  every case parametrized with device="cuda", so `-m gpu` selects all of them;
- a test module that imports a package of the server stack (falcon, waitress, orjson,
  msgspec, greenlet: SERVER_STACK), directly or through a helper, is skipped where that
  package is not installed, instead of breaking collection.
"""
import os

import pytest
import torch

from live_server import LiveServer

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Top-level modules the GPU machine lacks (.ci/rehearse_gpu_run.sh removes these too).
SERVER_STACK = ("falcon", "waitress", "orjson", "msgspec", "greenlet")


def runs_on_cuda(item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    device = callspec.params.get("device")
    return (isinstance(device, str) and device.startswith("cuda")) or \
        (isinstance(device, torch.device) and device.type == "cuda")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if runs_on_cuda(item):
            item.add_marker(pytest.mark.gpu)
        if not HAS_CUDA and "gpu" in item.keywords:
            item.add_marker(skip)


class ServerStackModule(pytest.Module):
    def _getobj(self):
        try:
            return super()._getobj()
        except self.CollectError as exc:
            cause = exc.__cause__
            if isinstance(cause, ModuleNotFoundError) and (cause.name or "").split(".")[0] in SERVER_STACK:
                pytest.skip(f"needs {cause.name}, which is not installed here", allow_module_level=True)
            raise


def pytest_pycollect_makemodule(module_path, parent):
    return ServerStackModule.from_parent(parent, path=module_path)


@pytest.fixture
def live_server(tmp_path):
    server = LiveServer(tmp_path / "state")
    yield server
    server.stop()


@pytest.fixture
def rt(tmp_path):
    """A started Runtime whose state dir is tmp_path (a module may define its own rt)."""
    from msmartcompute.runtime.engine import Runtime, RuntimeConfig

    runtime = Runtime(RuntimeConfig(state_dir=tmp_path))
    runtime.start()
    yield runtime
    runtime.close()
