"""Hugging Face-format folders through the seed's REST API: load from a folder under the model
root, input_text in and output_text out on /inference, /inference/async and /inference/batch."""
from __future__ import annotations

import time

import pytest
import torch

from api_helpers import Api, assert_error, assert_ok, make_runtime
from hf_fixtures import hf_model, save

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    llama = hf_model("llama", seed=1)
    save(llama, root / "tiny-llama")
    save(hf_model("gpt2", seed=2), root / "tiny-gpt2", tokenizer=None)
    save(hf_model("bert"), root / "tiny-bert", tokenizer="wordpiece")
    return root, llama


@pytest.fixture
def api(tmp_path, folders):
    root, _ = folders
    runtime = make_runtime(tmp_path / "state", model_roots=[root])
    yield Api(runtime)
    runtime.close()


def wait_job(api, request_id):
    deadline = time.monotonic() + 60
    while True:
        result = assert_ok(api.get(f"/api/v1/inference/{request_id}"))
        if result["status"] in ("completed", "failed") or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


def test_text_in_text_out_equals_transformers(api, folders):
    from tokenizers import Tokenizer

    root, ref = folders
    assert_ok(api.post("/api/v1/models", {"model_id": "llama", "model_type": "transformer",
                                          "model_path": "tiny-llama"}))
    prompt = "hello world, hello"
    body = assert_ok(api.post("/api/v1/inference", {"model_id": "llama", "input_text": prompt,
                                                    "options": {"max_tokens": 8, "temperature": 0}}))
    tok = Tokenizer.from_file(str(root / "tiny-llama" / "tokenizer.json"))
    ids = tok.encode(prompt).ids
    with torch.no_grad():
        x = torch.tensor([ids])  # an explicit mask: transformers would take BOS (= pad id 0) for padding
        want = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                            pad_token_id=0)[0, len(ids):]
    want = want.tolist()
    if 1 in want:  # generation stops at the EOS id (1), which is not returned
        want = want[:want.index(1)]
    assert body["output_data"] == [want]
    assert body["output_text"] == [tok.decode(want)]
    assert body["tokens_generated"] == len(want)
    assert body["finish_reasons"] == ["stop" if len(want) < 8 else "length"]

    # two prompts of different lengths in one request
    two = assert_ok(api.post("/api/v1/inference", {"model_id": "llama", "input_text": [prompt, "the quick brown fox"],
                                                   "options": {"max_tokens": 8, "temperature": 0}}))
    assert two["output_data"][0] == body["output_data"][0] and len(two["output_text"]) == 2

    queued = assert_ok(api.post("/api/v1/inference/async", {"model_id": "llama", "input_text": prompt,
                                                            "options": {"max_tokens": 8, "temperature": 0}}))
    result = wait_job(api, queued["request_id"])
    assert result["status"] == "completed" and result["output_text"] == body["output_text"]

    batch = assert_ok(api.post("/api/v1/inference/batch", {"requests": [
        {"model_id": "llama", "input_text": prompt, "options": {"max_tokens": 8, "temperature": 0}},
        {"model_id": "llama", "input_data": [ids], "options": {"max_tokens": 8, "temperature": 0}},
    ]}))["results"]
    assert batch[0]["output_text"] == body["output_text"] and "output_text" not in batch[1]
    assert batch[1]["output_data"] == body["output_data"]


def test_text_errors(api):
    assert_ok(api.post("/api/v1/models", {"model_id": "gpt2", "model_type": "transformer",
                                          "model_path": "tiny-gpt2"}))
    err = assert_error(api.post("/api/v1/inference", {"model_id": "gpt2", "input_text": "hi"}), 400,
                       "INVALID_INPUT_DATA")
    assert err["details"]["field"] == "input_text" and "tokenizer" in err["message"]
    err = assert_error(api.post("/api/v1/inference", {"model_id": "gpt2"}), 400, "INVALID_INPUT_DATA")
    assert err["details"]["field"] == "body.input_data"
    err = assert_error(api.post("/api/v1/inference", {"model_id": "gpt2", "input_text": ["ok", 3]}), 400,
                       "INVALID_INPUT_DATA")
    assert err["details"]["field"] == "body.input_text[1]"
    err = assert_error(api.post("/api/v1/inference", {"model_id": "gpt2", "input_text": "a", "input_data": [[1]]}),
                       400, "INVALID_INPUT_DATA")
    assert err["details"]["field"] == "body.input_text"


def test_load_errors_name_the_field(api):
    err = assert_error(api.post("/api/v1/models", {"model_id": "x", "model_type": "transformer",
                                                   "model_path": "tiny-llama", "parameters": {"num_layers": 3}}),
                       400, "INVALID_INPUT_DATA")
    assert err["details"]["field"] == "parameters.num_layers" and "2" in err["message"]
    err = assert_error(api.post("/api/v1/models", {"model_id": "x", "model_type": "encoder",
                                                   "model_path": "tiny-llama"}), 400, "INVALID_INPUT_DATA")
    assert err["details"]["field"] == "model_type"


def test_encoder_text_gives_embeddings(api):
    assert_ok(api.post("/api/v1/models", {"model_id": "bert", "model_type": "encoder", "model_path": "tiny-bert",
                                          "parameters": {"normalize": True}}))
    body = assert_ok(api.post("/api/v1/inference", {"model_id": "bert", "input_text": ["hello world", "the fox"]}))
    assert len(body["output_data"]) == 2 and len(body["output_data"][0]) == 32
    assert "output_text" not in body
    norm = sum(x * x for x in body["output_data"][0]) ** 0.5
    assert abs(norm - 1) < 1e-5


def test_streamed_input_text_sends_text_deltas_and_stops_at_a_stop_string(api):
    import json

    assert_ok(api.post("/api/v1/models", {"model_id": "llama", "model_type": "transformer",
                                          "model_path": "tiny-llama"}))
    options = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}
    plain = assert_ok(api.post("/api/v1/inference", {"model_id": "llama", "input_text": "the quick",
                                                     "options": options}))
    text = plain["output_text"][0]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    resp = api.post("/api/v1/inference", {"model_id": "llama", "input_text": "the quick",
                                          "options": {**options, "stream": True, "stop": stop}})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in resp.text.split("\n\n") if b.strip()]
    events = [json.loads(b.split("data: ", 1)[1]) for b in blocks]
    assert blocks[-1].startswith("event: done") and events[-1]["success"]
    deltas = [e["text"][0] for e in events[:-1]]
    assert len(deltas) > 3 and "".join(deltas) == text[:text.index(stop)] == events[-1]["output_text"][0]
    assert events[-1]["finish_reasons"] == ["stop"]
