"""Token streaming over HTTP (options.stream on /inference, Server-Sent Events), a client
that disconnects mid-stream, and the generation metrics in JSON and Prometheus form."""
from __future__ import annotations

import http.client
import json
import socket
import time

import numpy as np

VOCAB = 97
SPEC = {"model_id": "lm", "model_type": "transformer", "seed": 7, "max_sequence_length": 4096,
        "parameters": {"vocab_size": VOCAB, "hidden_size": 64, "num_layers": 2, "num_heads": 4}}


def call(server, method, path, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request(method, path, body=None if body is None else json.dumps(body),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def sse_events(raw: bytes) -> list[tuple[str, dict]]:
    out = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines.get("event", "message"), json.loads(lines["data"])))
    return out


def generation(server) -> dict:
    return json.loads(call(server, "GET", "/api/v1/metrics")[1])["metrics"]["generation"]["lm"]


def test_stream_then_disconnect_mid_stream(live_server):
    assert call(live_server, "POST", "/api/v1/models", SPEC)[0] == 200
    prompt = np.random.default_rng(0).integers(0, VOCAB, (1, 12)).tolist()
    body = {"model_id": "lm", "input_data": prompt, "options": {"max_tokens": 20, "temperature": 0}}

    status, raw = call(live_server, "POST", "/api/v1/inference", {**body, "options": {**body["options"], "stream": True}})
    assert status == 200
    events = sse_events(raw)
    (kind, final), tokens = events[-1], events[:-1]
    assert kind == "done" and final["success"] and all(k == "message" for k, _ in tokens)
    streamed = sum((e["token_ids"][0] for _, e in tokens), [])
    plain = json.loads(call(live_server, "POST", "/api/v1/inference", body)[1])
    assert streamed == final["output_data"][0] == plain["output_data"][0] and len(streamed) == 20

    status, raw = call(live_server, "POST", "/api/v1/inference",
                       {**body, "options": {"stream": True, "top_p": 2}})
    assert status == 400 and json.loads(raw)["error"]["code"] == "INVALID_INPUT_DATA"  # refused before streaming
    # an error the engine raises before the first event (a model id that does not exist) is plain
    # JSON in the envelope, not an empty 415 under text/event-stream (a fuzz finding)
    conn = http.client.HTTPConnection("127.0.0.1", live_server.port, timeout=60)
    conn.request("POST", "/api/v1/inference", body=json.dumps({**body, "model_id": "nope", "options": {"stream": True}}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 404 and resp.getheader("Content-Type").startswith("application/json")
    assert json.loads(resp.read())["error"]["code"] == "INVALID_MODEL_ID"
    conn.close()

    # a client that goes away after its first token: the request leaves the batch
    long = json.dumps({**body, "options": {"max_tokens": 4000, "temperature": 0, "stream": True}}).encode()
    sock = socket.create_connection(("127.0.0.1", live_server.port))
    sock.sendall(b"POST /api/v1/inference HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(long)).encode() + b"\r\n\r\n" + long)
    received = b""
    while b"data: " not in received:
        received += sock.recv(65536)
    assert b"text/event-stream" in received
    sock.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        g = generation(live_server)
        if g["cancelled_sequences"] == 1 and g["kv_blocks_used"] == 0:
            break
        time.sleep(0.05)
    assert g["cancelled_sequences"] == 1 and g["kv_blocks_used"] == 0 and g["running"] == 0
    assert g["tokens_generated"] < 4000 + 40

    status, text = call(live_server, "GET", "/metrics")
    text = text.decode()
    assert 'msmartcompute_generation_kv_blocks_free{model_id="lm"}' in text
    assert 'msmartcompute_generation_tokens_generated_total{model_id="lm"}' in text
    assert 'msmartcompute_generation_time_to_first_token_p99{model_id="lm"}' in text
