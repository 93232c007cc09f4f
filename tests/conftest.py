"""Shared test set-up. TRITON_INTERPRET must be set before any @triton.jit runs
its decorator, so it is decided here, before the kernel modules are imported."""
import os

import pytest
import torch

from live_server import LiveServer

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def live_server(tmp_path):
    server = LiveServer(tmp_path / "state")
    yield server
    server.stop()
