"""Shared pieces of the API tests: a real Runtime on a temp state dir behind the real app."""
import re

import falcon.testing

from msmartcompute.api import create_app
from msmartcompute.api.app import ApiConfig
from msmartcompute.api.ratelimit import RateLimitConfig
from msmartcompute.runtime.engine import Runtime, RuntimeConfig
from msmartcompute.runtime.keys import KeyStore

ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")

MLP_SPEC = {
    "model_id": "mlp-small",
    "model_type": "mlp",
    "max_batch_size": 8,
    "parameters": {"input_size": 4, "hidden_sizes": [8], "output_size": 3, "activation": "relu"},
}


def make_runtime(state_dir, **overrides):
    runtime = Runtime(RuntimeConfig(state_dir=state_dir, **overrides))
    runtime.start()
    return runtime


class Api:
    """TestClient over the real app; `as_(key)` sends that key."""

    def __init__(self, runtime, open_mode=None, rate_limit=None):
        self.runtime = runtime
        self.keys = KeyStore(runtime.store)
        self.app = create_app(runtime, ApiConfig(open_mode=open_mode,
                                                 rate_limit=rate_limit or RateLimitConfig(enabled=False)))
        self.client = falcon.testing.TestClient(self.app)
        self.key = None

    def as_(self, key):
        other = Api.__new__(Api)
        other.__dict__.update(self.__dict__)
        other.key = key
        return other

    def call(self, method, path, body=None, params=None, headers=None):
        headers = dict(headers or {})
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        return self.client.simulate_request(method, path, json=body, params=params, headers=headers)

    def get(self, path, **kw):
        return self.call("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.call("POST", path, body, **kw)

    def delete(self, path, **kw):
        return self.call("DELETE", path, **kw)


def assert_ok(response, *fields):
    assert response.status_code == 200, response.json
    body = response.json
    assert body["success"] is True and body["error"] is None and ISO_Z.match(body["timestamp"])
    for name in fields:
        assert name in body, f"missing {name} in {body}"
    return body


def assert_error(response, status, code):
    assert response.status_code == status, response.json
    body = response.json
    assert body["success"] is False and body["error"]["code"] == code, body
    assert set(body) == {"success", "error", "timestamp"} and ISO_Z.match(body["timestamp"])
    assert isinstance(body["error"]["message"], str) and isinstance(body["error"]["details"], dict)
    assert "Traceback" not in body["error"]["message"]
    return body["error"]
