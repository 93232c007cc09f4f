"""HTTP end to end: one POST per benchmarked call over a keep-alive loopback connection to a real
waitress server: ours (`msmartcompute serve`, auth and rate limits on) against the bare Falcon app
running the same MLP in-process (the lower bound of overhead). requests/s in extra_info."""
import http.client

import numpy as np
import orjson
import pytest
import torch

from benchmarks.serving import model as models
from benchmarks.serving import targets

NAME = "mlp_small"
ROWS = [1, 64]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return models.write_weights(NAME, tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module", params=["ours", "bare"])
def server(request, weights, tmp_path_factory):
    work = tmp_path_factory.mktemp(request.param)
    if request.param == "ours":
        proc, target = targets.ours("ours", models.load_spec(NAME, weights), work,
                                    {"model_roots": [str(weights.parent)]})
    else:
        proc, target = targets.bare("bare", NAME, weights, work)
    yield target
    proc.stop()


@pytest.mark.parametrize("rows", ROWS)
def test_http_inference(benchmark, server, weights, rows):
    x = np.random.default_rng(rows).standard_normal((rows, models.MODELS[NAME][0])).astype(np.float32)
    body = server.encode(x)
    headers = {"Content-Type": "application/json", **server.headers}
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)

    def post():
        conn.request("POST", server.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        assert resp.status == 200, data[:300]
        return data

    data = benchmark(post)
    conn.close()
    with torch.inference_mode():
        want = models.load(NAME, weights)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(server.decode(data), dtype=np.float32), want, rtol=1e-4, atol=1e-5)
    benchmark.extra_info.update(target=server.name, baseline="bare")
    if benchmark.stats:
        benchmark.extra_info["requests/s"] = 1 / benchmark.stats.stats.median
