"""Runtime model registry: load/list/get/unload, errors, model roots, restore, memory really freed."""
import gc
import os
import weakref

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from msmartcompute.models.mlp import MLP
from msmartcompute.runtime.caller import Caller
from msmartcompute.runtime.engine import Runtime, RuntimeConfig
from msmartcompute.runtime.errors import (Forbidden, InsufficientMemory, InvalidInputData, InvalidModelId,
                                          ModelAlreadyLoaded)


def mlp_spec(model_id="mlp", input_size=16, hidden=(32,), output_size=8, **kw):
    return {"model_id": model_id, "model_type": "mlp", "max_batch_size": 16,
            "parameters": {"input_size": input_size, "hidden_sizes": list(hidden), "output_size": output_size},
            **kw}


@pytest.fixture
def runtime(tmp_path):
    rt = Runtime(RuntimeConfig(state_dir=tmp_path / "state"))
    rt.start()
    yield rt
    rt.close()


def test_load_list_get_unload(runtime):
    out = runtime.registry.load(mlp_spec())
    n_params = 16 * 32 + 32 + 32 * 8 + 8
    assert out["model_id"] == "mlp" and out["memory_allocated"] == 4 * n_params  # float32 bytes, measured
    assert out["load_time"] > 0 and out["message"]
    [entry] = runtime.registry.list()
    assert entry == runtime.registry.get("mlp")
    assert entry["status"] == "loaded" and entry["memory_usage"] == 4 * n_params
    assert entry["device"] == "cpu" and entry["virtual_gpu_id"] is None and entry["load_time"].endswith("Z")
    assert runtime.registry.unload("mlp")["model_id"] == "mlp"
    assert runtime.registry.list() == []
    with pytest.raises(InvalidModelId):
        runtime.inference.infer({"model_id": "mlp", "input_data": np.zeros((1, 16), np.float32)})


def test_errors(runtime):
    runtime.registry.load(mlp_spec())
    with pytest.raises(ModelAlreadyLoaded):
        runtime.registry.load(mlp_spec())
    with pytest.raises(InvalidModelId) as err:
        runtime.registry.get("nope")
    assert err.value.details["available_models"] == ["mlp"]
    with pytest.raises(InvalidModelId) as err:
        runtime.registry.unload("nope")
    assert err.value.details["available_models"] == ["mlp"]
    with pytest.raises(InvalidInputData, match="hidden_sizes"):
        runtime.registry.load(mlp_spec("bad", hidden=("x",)))
    with pytest.raises(InvalidInputData, match="16 values"):
        runtime.inference.infer({"model_id": "mlp", "input_data": np.zeros((1, 5), np.float32)})
    user = Caller("u1", "user")
    with pytest.raises(Forbidden):
        runtime.registry.load(mlp_spec("other"), caller=user)
    with pytest.raises(Forbidden):
        runtime.registry.unload("mlp", caller=user)
    assert [m["model_id"] for m in runtime.registry.list()] == ["mlp"]


def test_model_path_must_lie_under_a_model_root(tmp_path):
    torch.manual_seed(0)
    seq = MLP(16, [32], 8)
    root = tmp_path / "state" / "models"
    root.mkdir(parents=True)
    save_file(seq.state_dict(), str(root / "w.safetensors"))
    outside = tmp_path / "outside.safetensors"
    save_file(seq.state_dict(), str(outside))
    os.symlink(outside, root / "link.safetensors")  # inside by name, outside once followed
    rt = Runtime(RuntimeConfig(state_dir=tmp_path / "state"))
    rt.start()
    try:
        rt.registry.load(mlp_spec("a", model_path=str(root / "w.safetensors")))
        rt.registry.load(mlp_spec("b", model_path="w.safetensors"))  # relative: from the first root
        x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
        with torch.no_grad():
            expected = seq(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(rt.inference.infer({"model_id": "a", "input_data": x})["output_data"], expected,
                                   rtol=1e-6, atol=1e-6)
        for bad in (str(outside), str(root / "link.safetensors"), str(root / ".." / ".." / "outside.safetensors")):
            with pytest.raises(InvalidInputData, match="outside the model roots|may not contain '..'"):
                rt.registry.load(mlp_spec("c", model_path=bad))
        with pytest.raises(InvalidInputData, match="not a file"):
            rt.registry.load(mlp_spec("c", model_path=str(root / "missing.safetensors")))
    finally:
        rt.close()


def test_registry_restored_after_restart(tmp_path):
    config = RuntimeConfig(state_dir=tmp_path)
    x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    rt = Runtime(config)
    rt.start()
    rt.registry.load(mlp_spec("keep", seed=7))
    rt.registry.load(mlp_spec("gone"))
    rt.registry.unload("gone")
    before = rt.inference.infer({"model_id": "keep", "input_data": x})["output_data"]
    rt.close()
    rt.close()  # idempotent

    rt = Runtime(config)
    rt.start()
    rt.start()  # idempotent
    try:
        assert [m["model_id"] for m in rt.registry.list()] == ["keep"]
        assert rt.inference.infer({"model_id": "keep", "input_data": x})["output_data"].tolist() == before.tolist()
    finally:
        rt.close()


def test_restore_reports_a_model_that_no_longer_fits(tmp_path):
    rt = Runtime(RuntimeConfig(state_dir=tmp_path))
    rt.start()
    rt.registry.load(mlp_spec(hidden=(256,)))
    rt.close()
    rt = Runtime(RuntimeConfig(state_dir=tmp_path, host_memory_capacity=1024))
    rt.start()
    try:
        [entry] = rt.registry.list()
        assert entry["status"] == "failed" and "requested" in entry["error"]
        rt.registry.unload("mlp")  # forgets it
        assert rt.registry.list() == [] and rt.store.get("models", "mlp") is None
    finally:
        rt.close()


def test_load_refused_when_it_does_not_fit(tmp_path):
    rt = Runtime(RuntimeConfig(state_dir=tmp_path, host_memory_capacity=200_000))
    rt.start()
    try:
        with pytest.raises(InvalidInputData) as err:  # more than the device holds: never (400, planned unbuilt)
            rt.registry.load(mlp_spec(hidden=(2048,)))  # 4 * (16*2048 + 2048 + 2048*8 + 8) bytes
        assert err.value.details["requested"] == 4 * (16 * 2048 + 2048 + 2048 * 8 + 8)
        assert err.value.details["capacity"] == 200_000
        rt.allocations.allocate({"user_id": "u", "memory_size": 150_000, "compute_units": 1, "duration": 60})
        with pytest.raises(InsufficientMemory) as err:  # fits the device, not what is left: later (503)
            rt.registry.load(mlp_spec(hidden=(1024,)))  # 4 * (16*1024 + 1024 + 1024*8 + 8) bytes
        assert err.value.details["requested"] == 4 * (16 * 1024 + 1024 + 1024 * 8 + 8)
        assert err.value.details["available"] == 50_000
        assert rt.registry.list() == [] and rt.vgpus.reserved_bytes() == 150_000
    finally:
        rt.close()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_load_unload_20_times_returns_memory(runtime):
    spec = mlp_spec("big", input_size=512, hidden=(2048, 2048), output_size=512)
    x = np.ones((4, 512), np.float32)

    def cycle():
        out = runtime.registry.load(spec)
        runtime.inference.infer({"model_id": "big", "input_data": x})
        module = weakref.ref(runtime.registry.models["big"].model.module)
        runtime.registry.unload("big")
        return out["memory_allocated"], module

    size, _ = cycle()  # warm-up: first-use allocations of torch and the worker
    assert size > 20 * 2**20
    gc.collect()
    baseline_rss, baseline_reserved = rss_bytes(), runtime.vgpus.reserved_bytes()
    for _ in range(20):
        _, module = cycle()
        assert module() is None, "the unloaded model is still referenced"
    assert runtime.vgpus.reserved_bytes() == baseline_reserved
    assert runtime.registry.total_memory() == 0
    growth = rss_bytes() - baseline_rss
    assert growth < 0.02 * baseline_rss, f"RSS grew {growth} bytes over 20 load/unload cycles"


def test_loading_unloading_and_serving_one_id_from_many_threads(runtime):
    """Before: an inference racing an unload hit a removed queue (KeyError -> HTTP 500)."""
    import threading

    outcomes, unexpected = [], []

    def worker(i):
        for j in range(30):
            try:
                op = (i + j) % 3
                if op == 0:
                    runtime.registry.load(mlp_spec("race", input_size=4, hidden=(8,), output_size=2))
                elif op == 1:
                    runtime.registry.unload("race")
                else:
                    runtime.inference.infer({"model_id": "race", "input_data": np.ones((1, 4), np.float32)})
                outcomes.append("ok")
            except (InvalidModelId, ModelAlreadyLoaded) as exc:
                outcomes.append(exc.code)
            except Exception as exc:  # anything else would be a 500
                unexpected.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not unexpected, unexpected[:5]
    assert outcomes.count("ok") > 0 and len(outcomes) == 16 * 30
