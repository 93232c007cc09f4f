"""The server skeleton: health with real values and the error envelope, in-process and over HTTP."""
import http.client
import json
import re
import urllib.error
import urllib.request

import falcon.testing
import pytest

import msmartcompute
from msmartcompute.api import create_app
from msmartcompute.runtime.engine import Runtime, RuntimeConfig

ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


@pytest.fixture
def client(tmp_path):
    runtime = Runtime(RuntimeConfig(state_dir=tmp_path))
    yield falcon.testing.TestClient(create_app(runtime))
    runtime.close()


def check_health_body(body):
    assert body["success"] is True and body["error"] is None
    assert body["status"] == "healthy"
    assert body["version"] == msmartcompute.__version__
    assert isinstance(body["uptime"], (int, float)) and body["uptime"] >= 0
    assert body["gpu_status"] in ("available", "unavailable")
    assert 0.0 < body["memory_usage"] < 1.0
    assert ISO_Z.match(body["timestamp"])


@pytest.mark.parametrize("path", ["/health", "/api/v1/health"])
def test_health(client, path):
    r = client.simulate_get(path)
    assert r.status_code == 200
    check_health_body(r.json)


def test_health_memory_usage_is_measured(client):
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    expected = 1 - info["MemAvailable"] / info["MemTotal"]
    assert abs(client.simulate_get("/health").json["memory_usage"] - expected) < 0.05


def test_unknown_route_uses_error_envelope(client):
    r = client.simulate_get("/api/v1/nothing-here")
    assert r.status_code == 404
    assert r.json["success"] is False
    assert r.json["error"]["code"] == "NOT_FOUND"
    assert "/api/v1/nothing-here" in r.json["error"]["message"]
    assert ISO_Z.match(r.json["timestamp"])


def test_wrong_method_uses_error_envelope(client):
    r = client.simulate_delete("/health")
    assert r.status_code == 405
    assert r.json["error"]["code"] == "METHOD_NOT_ALLOWED"
    assert "GET" in r.headers["allow"]


@pytest.mark.parametrize("path", ["/health", "/api/v1/health", "/api/v1/models", "/api/v1/openapi.json", "/dashboard",
                                  "/metrics", "/api/v1/metrics", "/api/v1/inference/req_unknown", "/v1/models"])
def test_head_answers_as_get_without_a_body(client, path):
    got, head = client.simulate_get(path), client.simulate_head(path)
    assert head.status_code == got.status_code != 405
    assert head.content == b""
    if path not in ("/health", "/api/v1/health", "/metrics", "/api/v1/metrics"):  # these change between calls
        assert head.headers["content-length"] == str(len(got.content))
    assert head.headers["content-type"] == got.headers["content-type"]


def test_head_where_there_is_no_get_is_405(client):
    r = client.simulate_head("/api/v1/inference")
    assert r.status_code == 405
    assert "HEAD" not in r.headers["allow"] and "POST" in r.headers["allow"]


def test_store_is_created_in_state_dir(tmp_path):
    runtime = Runtime(RuntimeConfig(state_dir=tmp_path / "state"))
    assert (tmp_path / "state" / "msmartcompute.sqlite3").exists()
    assert runtime.store.schema_version >= 1
    runtime.close()


def test_live_server_over_http(live_server):
    with urllib.request.urlopen(live_server.base_url + "/health", timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("application/json")
        check_health_body(json.load(r))
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(live_server.base_url + "/api/v1/missing", timeout=5)
    assert err.value.code == 404
    assert json.load(err.value)["error"]["code"] == "NOT_FOUND"
    assert (live_server.state_dir / "msmartcompute.sqlite3").exists()


def test_live_server_head_keeps_the_connection(live_server):
    """HEAD over the fronts: GET's head with no body, and the kept-alive connection goes on."""
    conn = http.client.HTTPConnection("127.0.0.1", live_server.port, timeout=5)
    for method in ("HEAD", "GET", "HEAD", "GET"):
        conn.request(method, "/api/v1/openapi.json")
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200 and int(r.headers["Content-Length"]) > 1000
        assert body == b"" if method == "HEAD" else len(body) == int(r.headers["Content-Length"])
        assert r.headers.get("Connection") != "close"
    conn.close()
