"""Virtual GPUs, the capacity ledger (quotas), allocations with expiry, ownership, persistence."""
import os
import time

import numpy as np
import pytest

from msmartcompute.runtime.caller import Caller
from msmartcompute.runtime.engine import Runtime, RuntimeConfig
from msmartcompute.runtime.errors import Forbidden, InsufficientMemory, InvalidInputData, NotFound

MiB = 2**20
CAPACITY = 64 * MiB
ADMIN, ALICE, BOB = Caller("root", "admin"), Caller("alice", "user"), Caller("bob", "user")


def mlp_spec(model_id="mlp", hidden=32, **kw):
    return {"model_id": model_id, "model_type": "mlp",
            "parameters": {"input_size": 16, "hidden_sizes": [hidden], "output_size": 8}, **kw}


def mlp_bytes(hidden):
    return 4 * (16 * hidden + hidden + hidden * 8 + 8)


@pytest.fixture
def runtime(tmp_path):
    rt = Runtime(RuntimeConfig(state_dir=tmp_path, host_memory_capacity=CAPACITY, reaper_interval_s=0.1))
    rt.start()
    yield rt
    rt.close()


def test_host_is_physical_device_0(runtime):
    [dev] = runtime.vgpus.devices
    assert dev.index == 0 and dev.memory_capacity == CAPACITY and dev.compute_units == os.cpu_count()


def test_vgpu_create_get_list_delete(runtime):
    v = runtime.vgpus.create({"virtual_gpu_id": "v1", "memory_size": 8 * MiB, "compute_units": 1,
                             "scheduling_policy": "fair_share"}, caller=ADMIN)
    assert v["virtual_gpu_id"] == "v1" and v["physical_gpu_id"] == 0 and v["status"] == "active"
    assert v["memory_size"] == 8 * MiB and v["scheduling_policy"] == "fair_share" and v["created_at"].endswith("Z")
    auto = runtime.vgpus.create({"memory_size": MiB, "compute_units": 1})
    assert auto["virtual_gpu_id"].startswith("vgpu_") and auto["scheduling_policy"] == "round_robin"
    assert runtime.vgpus.describe("v1") == v
    assert {x["virtual_gpu_id"] for x in runtime.vgpus.list()} == {"v1", auto["virtual_gpu_id"]}
    with pytest.raises(Forbidden):
        runtime.vgpus.create({"memory_size": MiB, "compute_units": 1}, caller=ALICE)
    with pytest.raises(Forbidden):
        runtime.delete_vgpu("v1", caller=ALICE)
    with pytest.raises(InvalidInputData, match="already exists"):
        runtime.vgpus.create({"virtual_gpu_id": "v1", "memory_size": MiB, "compute_units": 1})
    with pytest.raises(InvalidInputData, match="scheduling_policy"):
        runtime.vgpus.create({"memory_size": MiB, "compute_units": 1, "scheduling_policy": "lottery"})
    assert runtime.delete_vgpu("v1", caller=ADMIN)["virtual_gpu_id"] == "v1"
    with pytest.raises(NotFound):
        runtime.vgpus.get("v1")


def test_quotas_refuse_what_does_not_fit(runtime):
    cu = runtime.vgpus.devices[0].compute_units
    runtime.vgpus.create({"virtual_gpu_id": "small", "memory_size": mlp_bytes(32) + 100, "compute_units": 1})
    # a vGPU larger than what is left of the device
    with pytest.raises(InsufficientMemory) as err:
        runtime.vgpus.create({"memory_size": CAPACITY, "compute_units": 1})
    assert err.value.details == {"requested": CAPACITY, "available": CAPACITY - mlp_bytes(32) - 100,
                                 "where": "device 0"}
    with pytest.raises(InsufficientMemory) as err:
        runtime.vgpus.create({"memory_size": MiB, "compute_units": cu})  # one unit is taken by 'small'
    assert err.value.details["available_compute_units"] == cu - 1
    # models inside the vGPU's quota
    with pytest.raises(InvalidInputData, match="does not exist"):
        runtime.registry.load(mlp_spec("fits", virtual_gpu_id="nope"))
    runtime.registry.load(mlp_spec("fits", virtual_gpu_id="small"))
    with pytest.raises(InsufficientMemory) as err:
        runtime.registry.load(mlp_spec("second", virtual_gpu_id="small"))
    assert err.value.details["requested"] == mlp_bytes(32) and err.value.details["available"] == 100
    assert [m["model_id"] for m in runtime.registry.list()] == ["fits"]
    assert runtime.registry.get("fits")["virtual_gpu_id"] == "small"
    x = np.ones((2, 16), np.float32)
    assert len(runtime.inference.infer({"model_id": "fits", "input_data": x})["output_data"]) == 2
    with pytest.raises(InvalidInputData, match="still hosts"):
        runtime.delete_vgpu("small")
    # allocations draw on the device: an allocation of all that is left blocks a model load
    free = runtime.vgpus.device_free(0)[0]
    with pytest.raises(InsufficientMemory):
        runtime.allocations.allocate({"user_id": "alice", "memory_size": free + 1, "compute_units": 1, "duration": 60})
    alloc = runtime.allocations.allocate({"user_id": "alice", "memory_size": free, "compute_units": 1, "duration": 60})
    with pytest.raises(InsufficientMemory) as err:
        runtime.registry.load(mlp_spec("blocked"))
    assert err.value.details["available"] == 0
    runtime.allocations.deallocate(alloc["allocation_id"])
    runtime.registry.load(mlp_spec("blocked"))
    runtime.registry.unload("fits")
    runtime.delete_vgpu("small")
    runtime.registry.unload("blocked")
    assert runtime.vgpus.reserved_bytes() == 0


def test_allocation_fields_and_ownership(runtime):
    a = runtime.allocations.allocate({"user_id": "alice", "memory_size": MiB, "compute_units": 1, "duration": 3600},
                         caller=ALICE)
    assert a["allocation_id"].startswith("alloc_") and a["user_id"] == "alice" and a["gpu_id"] == 0
    assert a["memory_size"] == MiB and a["compute_units"] == 1
    assert a["start_time"].endswith("Z") and a["end_time"] > a["start_time"]
    with pytest.raises(Forbidden):
        runtime.allocations.allocate({"user_id": "alice", "memory_size": MiB, "compute_units": 1, "duration": 1}, caller=BOB)
    with pytest.raises(NotFound):  # another user's: as if it did not exist (a 403 would tell it does)
        runtime.allocations.get(a["allocation_id"], caller=BOB)
    with pytest.raises(NotFound):
        runtime.allocations.deallocate(a["allocation_id"], caller=BOB)
    assert runtime.allocations.list(caller=BOB) == []
    assert runtime.allocations.list(caller=ALICE) == [a] == runtime.allocations.list(caller=ADMIN)
    with pytest.raises(InvalidInputData, match="duration"):
        runtime.allocations.allocate({"user_id": "alice", "memory_size": MiB, "compute_units": 1, "duration": 0})
    assert runtime.allocations.deallocate(a["allocation_id"], caller=ADMIN)["allocation_id"] == a["allocation_id"]
    with pytest.raises(NotFound):
        runtime.allocations.get(a["allocation_id"])
    assert runtime.vgpus.reserved_bytes() == 0


def test_allocation_expires_by_itself(runtime):
    a = runtime.allocations.allocate({"user_id": "alice", "memory_size": 4 * MiB, "compute_units": 1, "duration": 0.3})
    assert runtime.vgpus.reserved_bytes() == 4 * MiB
    assert runtime.allocations.get(a["allocation_id"])["allocation_id"] == a["allocation_id"]
    time.sleep(0.6)  # the reaper (every 0.1 s here) frees it without any read
    assert runtime.vgpus.reserved_bytes() == 0
    assert runtime.store.get("allocations", a["allocation_id"]) is None
    with pytest.raises(NotFound):
        runtime.allocations.get(a["allocation_id"])


def test_allocation_expires_lazily_on_read(tmp_path):
    rt = Runtime(RuntimeConfig(state_dir=tmp_path, host_memory_capacity=CAPACITY, reaper_interval_s=3600))
    rt.start()
    try:
        a = rt.allocations.allocate({"user_id": "alice", "memory_size": MiB, "compute_units": 1, "duration": 0.2})
        time.sleep(0.3)
        assert rt.vgpus.reserved_bytes() == MiB  # nobody has looked yet
        assert rt.allocations.list() == []
        assert rt.vgpus.reserved_bytes() == 0
        with pytest.raises(NotFound):
            rt.allocations.deallocate(a["allocation_id"])
    finally:
        rt.close()


def test_vgpus_allocations_and_placement_survive_restart(tmp_path):
    config = RuntimeConfig(state_dir=tmp_path, host_memory_capacity=CAPACITY)
    rt = Runtime(config)
    rt.start()
    v = rt.vgpus.create({"virtual_gpu_id": "v", "memory_size": 8 * MiB, "compute_units": 1,
                        "scheduling_policy": "priority"})
    rt.registry.load(mlp_spec("m", virtual_gpu_id="v"))
    a = rt.allocations.allocate({"user_id": "alice", "memory_size": MiB, "compute_units": 1, "duration": 3600})
    reserved = rt.vgpus.reserved_bytes()
    rt.close()
    rt = Runtime(config)
    rt.start()
    try:
        assert rt.vgpus.list() == [v]
        assert rt.allocations.list() == [a]
        assert rt.registry.get("m")["virtual_gpu_id"] == "v"
        assert rt.vgpus.reserved_bytes() == reserved
        assert rt.registry.models["m"].executor.policy == "priority"
    finally:
        rt.close()
