"""Hostile input through the HTTP API: model roots, malicious pickles and programs, request
limits, NaN/Inf, key handling, one user's resources invisible to another."""
import io
import json
import logging
import pickle
import zipfile

import falcon.testing
import pytest
import torch

from api_helpers import MLP_SPEC, Api, assert_error, assert_ok, make_runtime
from msmartcompute.api import create_app, schemas
from msmartcompute.api.app import ApiConfig

MLP_CKPT_SPEC = {**MLP_SPEC, "model_id": "ckpt"}


@pytest.fixture
def env(tmp_path):
    runtime = make_runtime(tmp_path / "state")
    root = tmp_path / "state" / "models"
    root.mkdir(parents=True, exist_ok=True)
    yield Api(runtime), root, tmp_path
    runtime.close()


def _mlp_state_dict() -> dict:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    return m.state_dict()


def test_model_path_stays_under_the_model_roots(env):
    api, root, tmp = env
    outside = tmp / "outside"
    outside.mkdir()
    torch.save(_mlp_state_dict(), outside / "w.pt")
    torch.save(_mlp_state_dict(), root / "w.pt")
    (root / "sub").mkdir()
    (root / "escape.pt").symlink_to(outside / "w.pt")
    (root / "sub" / "inside.pt").symlink_to(root / "w.pt")
    (root / "dirlink").symlink_to(outside, target_is_directory=True)
    refused = {
        str(outside / "w.pt"): "outside the model roots",
        "../outside/w.pt": "'..'",
        "sub/../w.pt": "'..'",                        # would stay inside, still refused
        str(root / "escape.pt"): "outside the model roots",  # symlink out of the root
        "dirlink/w.pt": "outside the model roots",    # a linked directory out of the root
        "/etc/passwd": "outside the model roots",
        "nope.pt": "not a file",
    }
    for path, why in refused.items():
        error = assert_error(api.post("/api/v1/models", {**MLP_CKPT_SPEC, "model_path": path}),
                             400, "INVALID_INPUT_DATA")
        assert why in error["message"], (path, error)
    assert assert_ok(api.get("/api/v1/models"))["models"] == []
    # inside the root, directly, relative, or through a symlink that stays inside
    for i, path in enumerate([str(root / "w.pt"), "w.pt", "sub/inside.pt"]):
        assert_ok(api.post("/api/v1/models", {**MLP_CKPT_SPEC, "model_id": f"ok{i}", "model_path": path}))


class _Evil:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _rewrite_zip(src, dst, edit):
    zin = zipfile.ZipFile(src)
    files = {n: zin.read(n) for n in zin.namelist()}
    edit(files)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for n, b in files.items():
            zout.writestr(n, b)


def _evil_programs(root, marker):
    """Two .pt2 files that run code under a plain torch.export.load: a weight stored as a
    pickle, and an 'opaque object' constant (read with pickle.loads)."""
    program = torch.export.export(torch.nn.Linear(3, 2), (torch.randn(2, 3),))
    good = root / "good.pt2"
    torch.export.save(program, good)
    prefix = zipfile.ZipFile(good).namelist()[0].split("/")[0]

    def pickled_weight(files):
        name = f"{prefix}/data/weights/model_weights_config.json"
        config = json.loads(files[name])
        entry = next(iter(config["config"].values()))
        entry["use_pickle"] = True
        files[name] = json.dumps(config).encode()
        buffer = io.BytesIO()
        torch.save(_Evil(marker), buffer)
        files[f"{prefix}/data/weights/{entry['path_name']}"] = buffer.getvalue()

    def opaque(files):
        name = f"{prefix}/data/constants/model_constants_config.json"
        config = json.loads(files[name])
        config["config"]["c0"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                  "tensor_meta": None}
        files[name] = json.dumps(config).encode()
        files[f"{prefix}/data/constants/opaque_obj_0"] = pickle.dumps(_Evil(marker))

    _rewrite_zip(good, root / "evil_weight.pt2", pickled_weight)
    _rewrite_zip(good, root / "evil_opaque.pt2", opaque)
    return [root / "evil_weight.pt2", root / "evil_opaque.pt2"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickles_and_programs_are_refused_and_nothing_runs(env):
    api, root, tmp = env
    marker = tmp / "PWNED"
    payload = pickle.dumps({"0.weight": _Evil(marker)})
    pickle.loads(payload)  # the payload is live: unpickled, it creates the file
    assert marker.exists()
    marker.unlink()
    (root / "evil.pkl").write_bytes(payload)
    torch.save({"0.weight": _Evil(marker)}, root / "evil.pt")
    programs = _evil_programs(root, marker)
    for program in programs:  # live too: torch.export.load alone runs them
        try:
            torch.export.load(program)
        except Exception:
            pass
        assert marker.exists(), program
        marker.unlink()

    cases = [({**MLP_CKPT_SPEC, "model_path": "evil.pkl"}, "not a weights-only checkpoint"),
             ({**MLP_CKPT_SPEC, "model_path": "evil.pt"}, "not a weights-only checkpoint"),
             ({"model_id": "p", "model_type": "torchscript", "model_path": "evil.pt"},
              "is a torch checkpoint (torch.save), not a TorchScript program"),
             ({"model_id": "p", "model_type": "exported", "model_path": "evil.pkl"},
              "is a Python pickle, not an exported program")]
    cases += [({"model_id": "p", "model_type": "exported", "model_path": p.name}, "") for p in programs]
    for spec, why in cases:
        error = assert_error(api.post("/api/v1/models", spec), 400, "INVALID_INPUT_DATA")
        assert why in error["message"], (spec, error)
        assert not marker.exists(), spec
    assert assert_ok(api.get("/api/v1/models"))["models"] == []
    # the untouched program still loads and runs
    assert_ok(api.post("/api/v1/models", {"model_id": "good", "model_type": "exported", "model_path": "good.pt2"}))
    out = assert_ok(api.post("/api/v1/inference", {"model_id": "good", "input_data": [[1, 2, 3], [4, 5, 6]]}))
    assert len(out["output_data"]) == 2 and len(out["output_data"][0]) == 2


def _raw_post(api, path, raw: bytes):
    return api.client.simulate_request("POST", path, body=raw, headers={"Content-Type": "application/json"})


def test_request_limits(env, monkeypatch):
    api, root, tmp = env
    assert_ok(api.post("/api/v1/models", MLP_SPEC))
    infer = lambda body: api.post("/api/v1/inference", {"model_id": "mlp-small", **body})  # noqa: E731
    bad = {
        "3-D input": {"input_data": [[[1, 2, 3, 4]]]},
        "ragged rows": {"input_data": [[1, 2, 3, 4], [1, 2]]},
        "empty": {"input_data": []},
        "strings": {"input_data": [["a", "b", "c", "d"]]},
        "too many rows": {"input_data": [[0]] * (schemas.MAX_ROWS + 1)},
        "max_tokens": {"input_data": [[1, 2, 3, 4]], "options": {"max_tokens": 4097}},
        "timeout": {"input_data": [[1, 2, 3, 4]], "options": {"timeout": 3601}},
        "over float32": {"input_data": [[1e39, 0, 0, 0]]},
        "over int64": {"input_data": [[18446744073709551615] * 4]},  # would wrap to -1
        "just over int64": {"input_data": [[2 ** 63, 1, 2, 3]]},  # numpy would make it a float
        "over int64 beside a float": {"input_data": [[2 ** 63, 0.5, 2, 3]]},
        "batch_size mismatch": {"input_data": [[1, 2, 3, 4]], "batch_size": 2},
    }
    for what, body in bad.items():
        error = assert_error(infer(body), 400, "INVALID_INPUT_DATA")
        assert error["details"].get("field", "").startswith("body"), (what, error)
    too_long = "m" * (schemas.MAX_ID_LENGTH + 1)
    assert_error(api.post("/api/v1/models", {**MLP_SPEC, "model_id": too_long}), 400, "INVALID_INPUT_DATA")
    assert_error(api.post("/api/v1/models", {**MLP_SPEC, "model_id": "a/../b"}), 400, "INVALID_INPUT_DATA")
    assert_error(api.post("/api/v1/models", {**MLP_SPEC, "model_id": "x", "max_batch_size": 1025}),
                 400, "INVALID_INPUT_DATA")
    assert_error(api.post("/api/v1/models", {**MLP_SPEC, "model_id": "x", "model_path": "p" * 4097}),
                 400, "INVALID_INPUT_DATA")
    assert_error(api.post("/api/v1/sessions", {"user_id": too_long, "model_id": "mlp-small"}),
                 400, "INVALID_INPUT_DATA")
    for query in ("interval=", "interval=0", "interval=1.5", "start_time=", "start_time=yesterday"):
        response = api.client.simulate_get("/api/v1/metrics/history", query_string=query)
        assert_error(response, 400, "INVALID_INPUT_DATA")
    one = {"model_id": "mlp-small", "input_data": [[1, 2, 3, 4]]}
    assert_error(api.post("/api/v1/inference/batch", {"requests": [one] * 257}), 400, "INVALID_INPUT_DATA")
    assert_ok(api.post("/api/v1/inference/batch", {"requests": [one] * 256}))
    # the element count limit (lowered here so the test does not build 16M numbers)
    monkeypatch.setattr(schemas, "MAX_ELEMENTS", 100)
    error = assert_error(infer({"input_data": [[0.5] * 4] * 26}), 400, "INVALID_INPUT_DATA")
    assert "limit of 100" in error["message"]
    assert_ok(infer({"input_data": [[0.5] * 4] * 25}))


def test_nan_and_infinity_are_refused(env):
    api, _, _ = env
    assert_ok(api.post("/api/v1/models", MLP_SPEC))
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"nan", b"1e999", b"-1e400"):
        raw = b'{"model_id": "mlp-small", "input_data": [[1, 2, 3, ' + literal + b']]}'
        response = _raw_post(api, "/api/v1/inference", raw)
        assert_error(response, 400, "INVALID_INPUT_DATA")
    assert_error(_raw_post(api, "/api/v1/inference", b'{"model_id": '), 400, "INVALID_INPUT_DATA")


def test_body_size_limit(tmp_path):
    runtime = make_runtime(tmp_path / "state")
    try:
        client = falcon.testing.TestClient(create_app(runtime, ApiConfig(max_body_bytes=4096)))
        body = json.dumps({"model_id": "m", "input_data": [[0.125] * 1000]}).encode()
        response = client.simulate_post("/api/v1/inference", body=body, headers={"Content-Type": "application/json"})
        assert_error(response, 413, "INVALID_INPUT_DATA")
        assert "over the limit of 4096" in response.json["error"]["message"]
    finally:
        runtime.close()


def test_keys_are_hashed_and_never_logged(env, caplog):
    api, _, tmp = env
    key = api.keys.create("alice", "user")
    secret = key.split("_", 2)[2]
    secured = Api(api.runtime)  # keys exist now: closed mode
    with caplog.at_level(logging.DEBUG):
        assert_ok(secured.as_(key).get("/api/v1/models"))
        assert_error(secured.as_(key[:-1] + ("A" if key[-1] != "A" else "B")).get("/api/v1/models"),
                     401, "UNAUTHORIZED")
        assert_error(secured.as_("msc_unknownid_" + secret).get("/api/v1/models"), 401, "UNAUTHORIZED")
    assert not any(secret in r.getMessage() for r in caplog.records)
    stored = b"".join(p.read_bytes() for p in (tmp / "state").glob("msmartcompute.sqlite3*"))
    assert secret.encode() not in stored and key.encode() not in stored
    assert key.split("_", 2)[1].encode() in stored  # the key id is stored, only its digest beside it


def test_users_cannot_see_each_others_resources(env):
    api, _, _ = env
    keys = {name: api.keys.create(name, "admin" if name == "root" else "user") for name in ("root", "alice", "bob")}
    secured = Api(api.runtime)
    admin, alice, bob = (secured.as_(keys[n]) for n in ("root", "alice", "bob"))
    assert_ok(admin.post("/api/v1/models", MLP_SPEC))
    session = assert_ok(alice.post("/api/v1/sessions", {"user_id": "alice", "model_id": "mlp-small"}))["session_id"]
    alloc = assert_ok(alice.post("/api/v1/resources", {"user_id": "alice", "memory_size": 1024, "compute_units": 1,
                                                        "duration": 60}))["allocation_id"]
    job = assert_ok(alice.post("/api/v1/inference/async", {"model_id": "mlp-small",
                                                           "input_data": [[1, 2, 3, 4]]}))["request_id"]
    for method, path in (("GET", f"/api/v1/sessions/{session}"), ("DELETE", f"/api/v1/sessions/{session}"),
                         ("GET", f"/api/v1/resources/{alloc}"), ("DELETE", f"/api/v1/resources/{alloc}"),
                         ("GET", f"/api/v1/inference/{job}")):
        assert_error(bob.call(method, path), 404, "NOT_FOUND")  # as an unknown id: nothing to learn
        assert_error(secured.call(method, path), 401, "UNAUTHORIZED")
    assert_error(bob.post("/api/v1/resources", {"user_id": "alice", "memory_size": 1, "compute_units": 1,
                                                "duration": 60}), 403, "FORBIDDEN")
    assert assert_ok(bob.get("/api/v1/resources"))["allocations"] == []
    assert_error(bob.delete("/api/v1/virtualization/gpus/none"), 403, "FORBIDDEN")
    # still all there for their owner and for the admin
    for caller in (alice, admin):
        assert_ok(caller.get(f"/api/v1/sessions/{session}"))
        assert_ok(caller.get(f"/api/v1/resources/{alloc}"))
        assert caller.get(f"/api/v1/inference/{job}").status_code == 200
