"""API building blocks on their own: rate limiter, request schemas, API keys, OpenAPI document, config."""
import json
import re
import time

import numpy as np
import pytest
from openapi_spec_validator import validate as validate_openapi

from msmartcompute.api import schemas
from msmartcompute.api.openapi import build_document
from msmartcompute.api.ratelimit import RateLimitConfig, RateLimiter
from msmartcompute.config import load_config
from msmartcompute.runtime.errors import InvalidInputData
from msmartcompute.runtime.keys import KeyStore
from msmartcompute.runtime.store import Store


class FakeClock:  # a clock we advance by hand: time is an input here, not our code
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_burst_then_refill():
    clock = FakeClock()
    limiter = RateLimiter(RateLimitConfig(per_minute=1000, burst_per_second=100), clock=clock, wall=clock)
    decisions = [limiter.check("k") for _ in range(101)]
    assert all(d.allowed for d in decisions[:100]) and not decisions[100].allowed
    assert decisions[0].remaining == 999 and decisions[99].remaining == 900
    assert 0 < decisions[100].retry_after <= 0.01 + 1e-9
    clock.now += 1.0  # one second refills the burst bucket
    assert limiter.check("k").allowed
    assert limiter.check("other").allowed  # keys are independent


def test_sustained_limit_per_minute():
    clock = FakeClock()
    limiter = RateLimiter(RateLimitConfig(per_minute=120, burst_per_second=1000), clock=clock, wall=clock)
    assert sum(limiter.check("k").allowed for _ in range(200)) == 120
    refused = limiter.check("k")
    assert not refused.allowed and refused.retry_after == pytest.approx(0.5)
    assert refused.reset == pytest.approx(clock.now + 60, abs=1)
    clock.now += 0.5
    assert limiter.check("k").allowed


def test_schema_names_the_field():
    with pytest.raises(InvalidInputData) as err:
        schemas.validate(schemas.LoadModel, {"model_id": "m", "model_type": "mlp", "max_batch_size": 0})
    assert err.value.details["field"] == "body.max_batch_size" and ">= 1" in err.value.message
    with pytest.raises(InvalidInputData, match="body.model_type is required"):
        schemas.validate(schemas.LoadModel, {"model_id": "m"})
    with pytest.raises(InvalidInputData, match="must be an integer, got a boolean"):
        schemas.validate(schemas.Allocation, {"user_id": "u", "memory_size": True, "compute_units": 1,
                                              "duration": 5})
    with pytest.raises(InvalidInputData, match=r"body.requests\[1\].model_id"):
        schemas.validate(schemas.BatchInference, {"requests": [{"model_id": "a", "input_data": [[1]]},
                                                                {"model_id": "", "input_data": [[1]]}]})
    schemas.validate(schemas.Inference, {"model_id": "m", "input_data": [[1.0]], "options": {"top_p": 1}})
    with pytest.raises(InvalidInputData, match="top_p must be > 0"):
        schemas.validate(schemas.Inference, {"model_id": "m", "input_data": [[1.0]], "options": {"top_p": 0}})
    # a typo is refused, not ignored: the error names the field
    with pytest.raises(InvalidInputData, match="body.options.temprature is not a field") as err:
        schemas.validate(schemas.Inference, {"model_id": "m", "input_data": [[1.0]], "options": {"temprature": 1}})
    assert err.value.details == {"field": "body.options.temprature"}
    with pytest.raises(InvalidInputData, match=r"body.requests\[0\].max_token is not a field"):
        schemas.validate(schemas.BatchInference, {"requests": [{"model_id": "a", "input_data": [[1]], "max_token": 3}]})


def test_parameters_are_typed_by_model_type():
    from typing import get_args

    from msmartcompute.models.layers import ACTIVATIONS
    assert set(get_args(schemas.Activation)) == set(ACTIVATIONS)
    mlp = {"input_size": 4, "output_size": 2, "hidden_sizes": [8], "activation": "gelu"}
    schemas.validate(schemas.PARAMETERS["mlp"], mlp)
    with pytest.raises(InvalidInputData, match="body.parameters.hidden_size is not a field"):
        schemas.validate(schemas.PARAMETERS["mlp"], {**mlp, "hidden_size": 8}, "body.parameters")
    with pytest.raises(InvalidInputData, match="body.parameters.num_heads is required"):
        schemas.validate(schemas.PARAMETERS["transformer"], {"vocab_size": 10, "hidden_size": 8, "num_layers": 1},
                         "body.parameters")
    with pytest.raises(InvalidInputData, match="activation has an unknown value"):
        schemas.validate(schemas.PARAMETERS["mlp"], {**mlp, "activation": "swish"})


def test_input_data_becomes_a_matrix():
    floats = schemas.as_matrix([[0.1, 0.2], [0.3, 0.4]])
    assert floats.dtype == np.float32 and floats.shape == (2, 2)
    assert schemas.as_matrix([[1, 2, 3]]).dtype == np.int64
    for bad, problem in [([[1, 2], [3]], "same length"), ([[1, "a"]], "only numbers"), ([1, 2], "rows"),
                         ([[[1]]], "2-D"), ([], "non-empty"), ([[1e300]], "finite"), ([[True]], "only numbers")]:
        with pytest.raises(InvalidInputData, match=problem):
            schemas.as_matrix(bad)


def test_keys_are_hashed_and_checked(tmp_path):
    store = Store(tmp_path / "s.sqlite3")
    keys = KeyStore(store)
    key = keys.create("alice", "user")
    caller = keys.authenticate(key)
    assert caller.user_id == "alice" and not caller.is_admin
    assert keys.authenticate(key[:-1] + ("x" if key[-1] != "x" else "y")) is None
    assert keys.authenticate("msc_nope_" + "a" * 40) is None and keys.authenticate("garbage") is None
    raw = (tmp_path / "s.sqlite3").read_bytes() + (tmp_path / "s.sqlite3-wal").read_bytes()
    assert key.split("_", 2)[2].encode() not in raw  # only the digest is stored
    key_id = keys.list()[0]["key_id"]
    assert keys.revoke(key_id) and keys.authenticate(key) is None
    with pytest.raises(ValueError, match="role"):
        keys.create("bob", "root")


def test_a_verified_key_is_checked_again_in_constant_time_and_revocation_elsewhere_still_ends_it(tmp_path):
    store = Store(tmp_path / "s.sqlite3")
    keys, cli = KeyStore(store, record_ttl_s=0.2), KeyStore(store)  # a server and the CLI beside it
    key = keys.create("alice", "user")
    first = keys.authenticate(key)
    assert keys.authenticate(key) == first  # from what the first check kept
    wrong = key[:-1] + ("x" if key[-1] != "x" else "y")
    assert keys.authenticate(wrong) is None and keys.authenticate(key + "x") is None
    assert keys.authenticate(key) == first
    cli.revoke(key)
    time.sleep(0.25)  # the record's time to live
    assert keys.authenticate(key) is None


def test_openapi_document_is_valid_openapi3():
    document = build_document()
    validate_openapi(json.loads(json.dumps(document)))
    assert "/api/v1/inference" in document["paths"]
    codes = document["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
    assert {"INVALID_MODEL_ID", "MODEL_ALREADY_LOADED", "INSUFFICIENT_MEMORY", "INVALID_INPUT_DATA",
            "REQUEST_TIMEOUT", "RATE_LIMIT_EXCEEDED", "UNAUTHORIZED", "FORBIDDEN", "NOT_FOUND",
            "INTERNAL_ERROR"} <= set(codes)
    # every body is typed from the Structs that decode it, and every example decodes into it
    for path, methods in document["paths"].items():
        for method, op in methods.items():
            body = op.get("requestBody")
            if body is None:
                assert all("example" in p for p in op.get("parameters", [])), (method, path)
                continue
            content = body["content"]["application/json"]
            name = content["schema"]["$ref"].rsplit("/", 1)[1]
            assert document["components"]["schemas"][name]["additionalProperties"] is False
            schemas.validate(getattr(schemas, name), content["example"])


def test_config_precedence(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[server]\nport = 9000\nlog_level = "DEBUG"\n[security]\nrate_limit_per_minute = 50\n'
                    '[inference]\nmax_queue_delay_ms = 3\n[[models]]\nmodel_id = "m"\nmodel_type = "mlp"\n')
    config = load_config(path, {"log_level": "WARNING"}, environ={"MSC_PORT": "9100"})
    assert (config.port, config.log_level, config.rate_limit_per_minute) == (9100, "WARNING", 50)
    assert config.runtime == {"max_queue_delay_ms": 3} and config.models[0]["model_id"] == "m"
    path.write_text('[nonsense]\nx = 1\n')
    with pytest.raises(ValueError, match="unknown section"):
        load_config(path, environ={})


def test_cors_is_off_by_default_and_allows_only_configured_origins(tmp_path):
    import falcon.testing

    from msmartcompute.api import create_app
    from msmartcompute.api.app import ApiConfig
    from msmartcompute.config import load_config
    from msmartcompute.runtime.engine import Runtime, RuntimeConfig

    runtime = Runtime(RuntimeConfig(state_dir=tmp_path))
    try:
        origin = {"Origin": "https://app.example"}
        off = falcon.testing.TestClient(create_app(runtime))
        assert "Access-Control-Allow-Origin" not in off.simulate_get("/api/v1/models", headers=origin).headers
        origins = load_config(None, environ={"MSC_CORS_ORIGINS": "https://app.example, https://b.example/"}).cors_origins
        assert origins == ["https://app.example", "https://b.example"]
        on = falcon.testing.TestClient(create_app(runtime, ApiConfig(cors_origins=tuple(origins))))
        allowed = on.simulate_get("/api/v1/models", headers=origin)
        assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "X-Request-ID" in allowed.headers["Access-Control-Expose-Headers"]
        preflight = on.simulate_options("/api/v1/inference", headers={
            **origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 200 and "POST" in preflight.headers["Access-Control-Allow-Methods"]
        assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
        other = on.simulate_get("/api/v1/models", headers={"Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in other.headers
    finally:
        runtime.close()


def test_timestamps_are_iso_utc_with_milliseconds_and_follow_the_clock():
    from datetime import datetime, timezone

    from msmartcompute.api.envelope import utc_now_iso

    for _ in range(3):  # across a second's turn too: each call formats the time it is called
        before = datetime.now(timezone.utc)
        stamp = utc_now_iso()
        after = datetime.now(timezone.utc)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp)
        at = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
        assert before.replace(microsecond=before.microsecond // 1000 * 1000) <= at <= after
        time.sleep(0.45)
