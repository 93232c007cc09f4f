"""The server process against a careless operator and a hostile client: one server per state
dir, a damaged store refused at start, backup and restore, idle and slow connections that
cannot stall /health, waitress' own errors in the envelope."""
import json
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from live_server import LiveServer, free_port
from msmartcompute.runtime.store import STORE_FILENAME
from reliability_helpers import http, quiet_env

MLP = {"model_id": "m", "model_type": "mlp", "parameters": {"input_size": 2, "hidden_sizes": [2], "output_size": 1}}


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "msmartcompute.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_a_second_server_on_a_live_state_dir_refuses_before_reading_anything(tmp_path):
    state = tmp_path / "state"
    server = LiveServer(state, env=quiet_env())
    try:
        assert http(server.base_url, "POST", "/api/v1/models", MLP)[0] == 200
        second = run_cli("serve", "--port", str(free_port()), "--state-dir", str(state))
        assert second.returncode == 2
        assert f"in use by pid {server.process.pid}" in second.stderr
        assert "serving on" not in second.stderr and "loaded" not in second.stderr
        assert http(server.base_url, "GET", "/api/v1/models")[1]["models"][0]["model_id"] == "m"
        assert stat.S_IMODE((state / "lock").stat().st_mode) == 0o600
    finally:
        server.stop()


def test_a_damaged_store_stops_serve_and_a_backup_brings_it_back(tmp_path):
    state = tmp_path / "state"
    key = run_cli("keys", "--state-dir", str(state), "create", "--user", "ops", "--role", "admin").stdout.strip()
    backup = tmp_path / "backup.sqlite3"
    done = run_cli("store", "--state-dir", str(state), "backup", str(backup))
    assert done.returncode == 0, done.stderr
    (state / STORE_FILENAME).write_bytes(b"")  # truncated to 0 bytes
    refused = run_cli("serve", "--port", str(free_port()), "--state-dir", str(state))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "is empty (0 bytes)" in refused.stderr and "msmartcompute store restore" in refused.stderr
    assert run_cli("keys", "--state-dir", str(state), "list").returncode == 2  # nothing starts on it

    restored = run_cli("store", "--state-dir", str(state), "restore", str(backup))
    assert restored.returncode == 0, restored.stderr
    server = LiveServer(state, env=quiet_env())
    try:
        assert http(server.base_url, "GET", "/api/v1/models")[0] == 401  # the keys are back: closed
        assert http(server.base_url, "GET", "/api/v1/models", key=key)[0] == 200
        busy = run_cli("store", "--state-dir", str(state), "restore", str(backup))
        assert busy.returncode == 2 and "in use by pid" in busy.stderr  # never under a live server
    finally:
        server.stop()


def test_the_first_key_created_by_the_cli_closes_a_running_open_server(tmp_path):
    state = tmp_path / "state"
    server = LiveServer(state, env=quiet_env())
    try:
        assert http(server.base_url, "GET", "/api/v1/models")[0] == 200  # open on loopback
        key = run_cli("keys", "--state-dir", str(state), "create", "--user", "u", "--role", "user").stdout.strip()
        assert http(server.base_url, "GET", "/api/v1/models")[0] == 401
        assert http(server.base_url, "POST", "/api/v1/models", MLP, key=key)[0] == 403
    finally:
        server.stop()


def _raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, return everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def _envelope(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"application/json" in head, head
    return status, json.loads(body)


def _content_length(answer: bytes) -> int:
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def _idle_and_slow_connections(port: int, idle: int, slow: int, stop: threading.Event) -> list[socket.socket]:
    """`idle` connected sockets that send nothing, and `slow` ones that trickle one header byte
    per second from a thread until `stop` (the slow-loris attack of issue #17 item 4)."""
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(idle)]
    slow_socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(slow)]

    def trickle():
        line = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
        i = 0
        while not stop.wait(1.0):
            for s in slow_socks:
                try:
                    s.send(line[i:i + 1])
                except OSError:
                    pass
            i += 1

    threading.Thread(target=trickle, daemon=True).start()
    return socks + slow_socks


def test_health_answers_beside_500_idle_and_110_slow_connections(tmp_path):
    config = tmp_path / "server.json"
    config.write_text(json.dumps({"server": {"header_timeout_s": 3}}))
    server = LiveServer(tmp_path / "state", extra_args=["--config", str(config)], env=quiet_env())
    stop = threading.Event()
    socks = []
    try:
        socks = _idle_and_slow_connections(server.port, idle=500, slow=110, stop=stop)
        time.sleep(1.5)
        for _ in range(3):
            t0 = time.monotonic()
            with urllib.request.urlopen(server.base_url + "/health", timeout=5) as r:
                assert r.status == 200
            assert time.monotonic() - t0 < 2.0
            assert http(server.base_url, "GET", "/api/v1/models", timeout=5)[0] == 200
        # a trickling client is dropped once its head is late, however steadily it sends
        slow = socks[-1]
        slow.settimeout(15)
        try:
            assert slow.recv(1) == b""
        except ConnectionResetError:  # closed with our unread bytes in its buffer: a reset
            pass
    finally:
        stop.set()
        for s in socks:
            s.close()
        server.stop()


def test_waitress_errors_are_envelopes_and_never_echo_the_request(tmp_path):
    config = tmp_path / "server.json"
    config.write_text(json.dumps({"server": {"max_body_bytes": 1024}}))
    server = LiveServer(tmp_path / "state", extra_args=["--config", str(config)], env=quiet_env())
    try:
        secret = "msc_abcdef_SECRETSECRETSECRETSECRET"
        # a CR without LF inside the Authorization header: waitress' own 400 quoted the line
        status, body = _envelope(_raw(server.port, (
            f"GET /api/v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\rX: y\r\n\r\n").encode()))
        assert status == 400 and body["success"] is False and body["error"]["code"] == "INVALID_INPUT_DATA"
        assert "SECRET" not in json.dumps(body)
        status, body = _envelope(_raw(server.port, b"GARBAGE\r\n\r\n"))
        assert status == 400 and body["error"]["code"] == "INVALID_INPUT_DATA"
        # over the body limit by Content-Length, and by a chunked body
        status, body = _envelope(_raw(server.port, (
            b"POST /api/v1/inference HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000\r\n\r\n" + b"{" * 5000)))
        assert status == 413 and body["error"]["code"] == "INVALID_INPUT_DATA"
        status, body = _envelope(_raw(server.port, (
            b"POST /api/v1/inference HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + b"800\r\n" + b"{" * 2048 + b"\r\n0\r\n\r\n")))
        assert status == 413 and body["error"]["code"] == "INVALID_INPUT_DATA"
        # a header block over the header limit
        status, body = _envelope(_raw(server.port, (
            b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 100_000 + b"\r\n\r\n")))
        assert status == 431 and body["error"]["code"] == "INVALID_INPUT_DATA"
        assert "bbbb" not in json.dumps(body)
    finally:
        server.stop()


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(tmp_path):
    config = tmp_path / "server.json"
    config.write_text(json.dumps({"server": {"idle_timeout_s": 1}}))
    server = LiveServer(tmp_path / "state", extra_args=["--config", str(config)], env=quiet_env())
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _content_length(answer):
                answer += s.recv(65536)  # the head and the body may come in separate writes
            assert answer.startswith(b"HTTP/1.1 200")
            t0 = time.monotonic()
            assert s.recv(1) == b""  # closed by the server, not by our 10 s timeout
            assert time.monotonic() - t0 < 5
    finally:
        server.stop()


def test_require_keys_from_the_start(tmp_path):
    """Issue #17 item 1/12: an admin can refuse open mode before the first key exists."""
    server = LiveServer(tmp_path / "state", extra_args=["--require-keys"], env=quiet_env())
    try:
        status, body = http(server.base_url, "GET", "/api/v1/models")
        assert status == 401 and body["error"]["code"] == "UNAUTHORIZED"
        assert http(server.base_url, "GET", "/health")[0] == 200
    finally:
        server.stop()


def test_rights_limits_and_retry_answers_across_the_engine_and_fronts(tmp_path):
    """Items 7, 8, 11 and 12 of issue #17 through the real processes (fronts -> engine):
    a user cannot retrain a shared model, another user's session is a 404, a response over the
    limit and a vGPU larger than the device are 400s, a model that may fit later is a 503 with
    Retry-After."""
    state = tmp_path / "state"
    admin = run_cli("keys", "--state-dir", str(state), "create", "--user", "ops", "--role", "admin").stdout.strip()
    alice = run_cli("keys", "--state-dir", str(state), "create", "--user", "alice", "--role", "user").stdout.strip()
    bob = run_cli("keys", "--state-dir", str(state), "create", "--user", "bob", "--role", "user").stdout.strip()
    server = LiveServer(state, env=quiet_env(MSC_RATE_LIMIT_ENABLED="0"))
    url = server.base_url
    try:
        assert http(url, "POST", "/api/v1/models", MLP, key=admin)[0] == 200
        status, body = http(url, "POST", "/api/v1/training", {"model_id": "m", "training_data": [[1, 2]],
                                                              "labels": [[1.0]], "loss_function": "mse"}, key=alice)
        assert status == 403 and body["error"]["code"] == "FORBIDDEN"
        session = http(url, "POST", "/api/v1/sessions", {"user_id": "alice", "model_id": "m"}, key=alice)[1]
        assert http(url, "GET", f"/api/v1/sessions/{session['session_id']}", key=bob)[0] == 404
        wide = {"model_id": "wide", "model_type": "mlp",
                "parameters": {"input_size": 1, "hidden_sizes": [2], "output_size": 4096}}
        assert http(url, "POST", "/api/v1/models", wide, key=admin)[0] == 200
        status, body = http(url, "POST", "/api/v1/inference", {"model_id": "wide", "input_data": [[1.0]] * 2048},
                            key=alice)  # 8M values from a 20 kB body
        assert status == 400 and body["error"]["details"]["max_output_values"] == 1 << 22
        def vgpu(name, memory):
            return http(url, "POST", "/api/v1/virtualization/gpus",
                        {"virtual_gpu_id": name, "memory_size": memory, "compute_units": 1}, key=admin)

        status, body = vgpu("big", 1 << 40)
        assert status == 400 and body["error"]["details"]["capacity"] < 1 << 40  # 1 TiB on this host: never
        small = vgpu("small", 1 << 20)[1]["virtual_gpu_id"]
        held = {"model_id": "held", "model_type": "mlp", "virtual_gpu_id": small,  # ~600 kB of the 1 MiB quota
                "parameters": {"input_size": 128, "hidden_sizes": [1024], "output_size": 16}}
        assert http(url, "POST", "/api/v1/models", held, key=admin)[0] == 200
        request = urllib.request.Request(url + "/api/v1/models", method="POST", data=json.dumps(
            {**held, "model_id": "later"}).encode(), headers={"Authorization": f"Bearer {admin}",
                                                              "Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=30)
            raise AssertionError("a model over the quota's free memory was loaded")
        except urllib.error.HTTPError as refused:
            assert refused.code == 503 and int(refused.headers["Retry-After"]) >= 1
            assert json.loads(refused.read())["error"]["code"] == "INSUFFICIENT_MEMORY"
    finally:
        server.stop()
