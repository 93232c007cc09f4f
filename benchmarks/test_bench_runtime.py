"""The runtime: N requests through Runtime.infer_batch with dynamic batching on (one forward of
N rows) against batching off (max_queue_delay_ms 0: N forwards of one row). requests/s in
extra_info; the results are checked against the model run locally."""
import numpy as np
import pytest
import torch

from benchmarks.serving import model as models
from msmartcompute.runtime.engine import Runtime, RuntimeConfig

REQUESTS = [8, 32]
NAMES = ["mlp_small", "mlp_heavy"]  # mlp_xl (200 MB) is for the load benchmark only
MODES = {"batched": 5.0, "unbatched": 0.0}  # mode -> max_queue_delay_ms


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    return {name: models.write_weights(name, folder) for name in NAMES}


@pytest.fixture(scope="module", params=list(MODES))
def runtime(request, weights, tmp_path_factory):
    folder = next(iter(weights.values())).parent
    rt = Runtime(RuntimeConfig(state_dir=tmp_path_factory.mktemp("state"), model_roots=[folder],
                               max_queue_delay_ms=MODES[request.param], metrics_sample_interval_s=3600))
    rt.start()
    for name, path in weights.items():
        for n in REQUESTS:
            spec = models.load_spec(name, path, max_batch_size=n)
            rt.registry.load({**spec, "model_id": f"{name}-{n}"})
    rt.mode = request.param
    yield rt
    rt.close()


@pytest.mark.parametrize("n", REQUESTS)
@pytest.mark.parametrize("name", NAMES)
def test_runtime_infer_batch(benchmark, runtime, weights, name, n):
    x = np.random.default_rng(n).standard_normal((n, models.MODELS[name][0])).astype(np.float32)
    requests = [{"model_id": f"{name}-{n}", "input_data": x[i:i + 1]} for i in range(n)]
    out = benchmark(runtime.inference.infer_batch, requests)
    with torch.inference_mode():
        want = models.load(name, weights[name])(torch.from_numpy(x)).numpy()
    got = np.concatenate([np.asarray(r["output_data"], dtype=np.float32) for r in out["results"]])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    benchmark.extra_info.update(mode=runtime.mode, baseline="unbatched")
    if benchmark.stats:  # absent under --benchmark-disable
        benchmark.extra_info["requests/s"] = n / benchmark.stats.stats.median
