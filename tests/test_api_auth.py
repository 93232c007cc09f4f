"""Auth, roles, ownership and rate limits with real keys."""
import pytest

from api_helpers import MLP_SPEC, Api, assert_error, assert_ok, make_runtime
from msmartcompute.api.ratelimit import RateLimitConfig


@pytest.fixture
def secured(tmp_path):
    runtime = make_runtime(tmp_path / "state")
    base = Api(runtime)  # keys exist before the app is built: closed mode
    keys = {"admin": base.keys.create("root", "admin"), "alice": base.keys.create("alice", "user"),
            "bob": base.keys.create("bob", "user")}
    api = Api(runtime, rate_limit=RateLimitConfig(per_minute=10_000, burst_per_second=10_000))
    yield api, keys
    runtime.close()


def test_missing_or_bad_key_is_401(secured):
    api, _ = secured
    assert_error(api.get("/api/v1/models"), 401, "UNAUTHORIZED")
    assert_error(api.as_("msc_00_wrongwrongwrongwrong").get("/api/v1/models"), 401, "UNAUTHORIZED")
    r = api.get("/api/v1/models", headers={"Authorization": "Basic abc"})
    assert_error(r, 401, "UNAUTHORIZED")
    assert_ok(api.get("/health"))  # open
    assert api.get("/api/v1/openapi.json").status_code == 200  # open


def test_roles(secured):
    api, keys = secured
    admin, alice = api.as_(keys["admin"]), api.as_(keys["alice"])
    assert_error(alice.post("/api/v1/models", MLP_SPEC), 403, "FORBIDDEN")
    assert_ok(admin.post("/api/v1/models", MLP_SPEC))
    assert_ok(alice.get("/api/v1/models"))
    assert_ok(alice.post("/api/v1/inference", {"model_id": "mlp-small", "input_data": [[1, 2, 3, 4]]}))
    assert_error(alice.delete("/api/v1/models/mlp-small"), 403, "FORBIDDEN")
    assert_error(alice.post("/api/v1/virtualization/gpus", {"virtual_gpu_id": "v", "memory_size": 1,
                                                             "compute_units": 1}), 403, "FORBIDDEN")


def test_one_rule_per_operation_and_every_admin_operation_enforces_it(secured):
    """runtime/access.py POLICY is the one authorization table: every engine operation (so
    every route) has its rule, and each ADMIN / SELF rule is enforced by the runtime itself,
    whatever front calls it."""
    from msmartcompute.runtime.access import ADMIN, POLICY
    from msmartcompute.runtime.caller import Caller
    from msmartcompute.runtime.errors import Forbidden
    from msmartcompute.runtime.operations import OPERATIONS

    assert set(POLICY) == set(OPERATIONS)
    api, _ = secured
    rt, user = api.runtime, Caller("alice", "user")
    calls = {  # each ADMIN operation with arguments that would otherwise get past the check
        "registry.load": (dict(MLP_SPEC),), "registry.unload": ("mlp-small",),
        "training.train": ({"model_id": "mlp-small", "training_data": [[1, 2, 3, 4]], "labels": [0]},),
        "training.submit": ({"model_id": "mlp-small", "training_data": [[1, 2, 3, 4]], "labels": [0]},),
        "optimization.optimize": ("mlp-small", {"optimization_type": "quantization"}),
        "vgpus.create": ({"memory_size": 1024, "compute_units": 1},), "delete_vgpu": ("v",),
    }
    assert set(calls) == {op for op, (rule, _) in POLICY.items() if rule == ADMIN}
    rt.registry.load(dict(MLP_SPEC))
    for op, args in calls.items():
        with pytest.raises(Forbidden, match="only an admin"):
            rt.operation(op)(*args, caller=user)
    with pytest.raises(Forbidden):
        rt.sessions.create("bob", "mlp-small", caller=user)
    with pytest.raises(Forbidden):
        rt.allocations.allocate({"user_id": "bob", "memory_size": 1, "compute_units": 1, "duration": 1}, caller=user)


def test_ownership(secured):
    api, keys = secured
    admin, alice, bob = (api.as_(keys[k]) for k in ("admin", "alice", "bob"))
    assert_ok(admin.post("/api/v1/models", MLP_SPEC))
    session = assert_ok(alice.post("/api/v1/sessions", {"user_id": "alice", "model_id": "mlp-small"}))
    assert_error(bob.post("/api/v1/sessions", {"user_id": "alice", "model_id": "mlp-small"}), 403, "FORBIDDEN")
    # another user's object answers 404, as an unknown id does: a 403 would tell that it exists
    assert_error(bob.get(f"/api/v1/sessions/{session['session_id']}"), 404, "NOT_FOUND")
    assert_error(bob.delete(f"/api/v1/sessions/{session['session_id']}"), 404, "NOT_FOUND")
    assert_ok(admin.get(f"/api/v1/sessions/{session['session_id']}"))

    alloc = assert_ok(alice.post("/api/v1/resources", {"user_id": "alice", "memory_size": 1024,
                                                        "compute_units": 1, "duration": 60}))
    assert_error(bob.delete(f"/api/v1/resources/{alloc['allocation_id']}"), 404, "NOT_FOUND")
    assert assert_ok(bob.get("/api/v1/resources"))["allocations"] == []
    assert len(assert_ok(admin.get("/api/v1/resources"))["allocations"]) == 1

    job = assert_ok(alice.post("/api/v1/inference/async", {"model_id": "mlp-small", "input_data": [[1, 2, 3, 4]]}))
    assert_error(bob.get(f"/api/v1/inference/{job['request_id']}"), 404, "NOT_FOUND")
    assert_ok(alice.get(f"/api/v1/inference/{job['request_id']}"))
    assert_ok(alice.delete(f"/api/v1/sessions/{session['session_id']}"))


def test_rate_limit_headers_and_429(tmp_path):
    runtime = make_runtime(tmp_path / "state")
    key = Api(runtime).keys.create("carol", "user")
    api = Api(runtime, rate_limit=RateLimitConfig(per_minute=1000, burst_per_second=5)).as_(key)
    responses = [api.get("/api/v1/models") for _ in range(6)]
    for r in responses[:5]:
        assert r.status_code == 200
        assert r.headers["X-RateLimit-Limit"] == "1000"
        assert int(r.headers["X-RateLimit-Reset"]) > 0
    assert [int(r.headers["X-RateLimit-Remaining"]) for r in responses[:5]] == [999, 998, 997, 996, 995]
    error = assert_error(responses[5], 429, "RATE_LIMIT_EXCEEDED")
    assert int(responses[5].headers["Retry-After"]) >= 1 and error["details"]["retry_after"] >= 1
    assert responses[5].headers["X-RateLimit-Remaining"] == "0"  # exact: no request is allowed now
    # limits are per user: a second key of carol's spends the same buckets
    second = Api(runtime).keys.create("carol", "user")
    assert_error(api.as_(second).get("/api/v1/models"), 429, "RATE_LIMIT_EXCEEDED")
    # an unauthenticated request spends no user's tokens, but its address's: guessing keys is limited too
    failed = [api.as_(None).get("/api/v1/models") for _ in range(6)]
    for r in failed[:5]:
        assert_error(r, 401, "UNAUTHORIZED")
    assert [int(r.headers["X-RateLimit-Remaining"]) for r in failed[:5]] == [999, 998, 997, 996, 995]
    assert_error(failed[5], 429, "RATE_LIMIT_EXCEEDED")
    runtime.close()


def test_the_first_key_closes_an_open_server_at_once_and_for_good(tmp_path):
    """Before: started with no keys, the server stayed open after `keys create` until a restart."""
    from msmartcompute.runtime.keys import KeyStore
    from msmartcompute.runtime.store import STORE_FILENAME, Store

    runtime = make_runtime(tmp_path / "state")
    try:
        api = Api(runtime)  # no key yet: open
        assert_ok(api.post("/api/v1/models", MLP_SPEC))
        cli_keys = KeyStore(Store(tmp_path / "state" / STORE_FILENAME))  # `msmartcompute keys create`, elsewhere
        user = cli_keys.create("alice", "user")
        # the same app, no restart: no key, a made-up key, a user key may no longer unload
        assert_error(api.delete("/api/v1/models/mlp-small"), 401, "UNAUTHORIZED")
        assert_error(api.as_("msc_madeup_" + "x" * 32).delete("/api/v1/models/mlp-small"), 401, "UNAUTHORIZED")
        assert_error(api.as_(user).delete("/api/v1/models/mlp-small"), 403, "FORBIDDEN")
        assert cli_keys.revoke(user.split("_")[1])  # no key left: still closed, never open again
        assert_error(api.get("/api/v1/models"), 401, "UNAUTHORIZED")
        assert_error(Api(runtime).delete("/api/v1/models/mlp-small"), 401, "UNAUTHORIZED")  # a new app too
    finally:
        runtime.close()


def test_client_request_ids_are_echoed_only_when_short_and_plain(tmp_path):
    """Before: any X-Request-ID was echoed and logged, whatever its length or content."""
    runtime = make_runtime(tmp_path / "state")
    try:
        api = Api(runtime)
        assert api.get("/health", headers={"X-Request-ID": "trace-42"}).headers["X-Request-ID"] == "trace-42"
        for bad in ("x" * 129, "a b", "id\\tforged 200 GET /"):
            got = api.get("/health", headers={"X-Request-ID": bad}).headers["X-Request-ID"]
            assert got != bad and got.startswith("r_") and len(got) == 18
    finally:
        runtime.close()
