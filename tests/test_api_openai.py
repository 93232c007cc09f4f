"""The OpenAI-compatible routes with the `openai` Python package against a real server process
(tests/live_server.py), on tiny checkpoint folders made in the test."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import requests
import torch

from hf_fixtures import CHAT_TEMPLATE, hf_model, save
from live_server import LiveServer

openai = pytest.importorskip("openai")
pytest.importorskip("transformers")

ADMIN_KEY = "msc_oaiadmin_" + "s3cret" * 6


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    state = tmp_path_factory.mktemp("oai")
    ref = hf_model("llama", seed=4)
    save(ref, state / "models" / "chat-llama")
    bert = hf_model("bert")
    save(bert, state / "models" / "tiny-bert", tokenizer="wordpiece")
    live = LiveServer(state, env={"MSC_ADMIN_KEY": ADMIN_KEY})
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for body in ({"model_id": "chat-llama", "model_type": "transformer", "model_path": "chat-llama"},
                 {"model_id": "tiny-bert", "model_type": "encoder", "model_path": "tiny-bert",
                  "parameters": {"pooling": "mean", "normalize": True}}):
        r = requests.post(live.base_url + "/api/v1/models", json=body, headers=headers, timeout=120)
        assert r.status_code == 200, r.text
    live.ref, live.bert, live.folder = ref, bert, state / "models"
    yield live
    live.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=ADMIN_KEY, max_retries=0)


def reference_greedy(server, ids, max_tokens):
    with torch.no_grad():
        x = torch.tensor([ids])  # an explicit mask: transformers would take BOS (= pad id 0) for padding
        out = server.ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                                  pad_token_id=0)[0, len(ids):].tolist()
    return out[:out.index(1)] if 1 in out else out


def tokenizer(server):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(server.folder / "chat-llama" / "tokenizer.json"))


def test_models_list(client):
    ids = {m.id for m in client.models.list().data}
    assert {"chat-llama", "tiny-bert"} <= ids


def test_completion_equals_transformers_greedy(server, client):
    tok = tokenizer(server)
    prompt = "the quick brown"
    out = client.completions.create(model="chat-llama", prompt=prompt, max_tokens=6, temperature=0)
    ids = tok.encode(prompt).ids
    want = reference_greedy(server, ids, 6)
    assert out.choices[0].text == tok.decode(want)
    assert out.choices[0].finish_reason == ("stop" if len(want) < 6 else "length")
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(want)
    assert out.usage.total_tokens == len(ids) + len(want)


def test_completion_n_seed_stop(client):
    a = client.completions.create(model="chat-llama", prompt=["hello", "numbers 1"], max_tokens=5,
                                  temperature=1.0, seed=7, n=2)
    b = client.completions.create(model="chat-llama", prompt=["hello", "numbers 1"], max_tokens=5,
                                  temperature=1.0, seed=7, n=2)
    assert len(a.choices) == 4 and [c.index for c in a.choices] == [0, 1, 2, 3]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same samples
    full = client.completions.create(model="chat-llama", prompt="hello", max_tokens=8, temperature=0).choices[0]
    if len(full.text) > 2:
        stop = full.text[1:3]
        cut = client.completions.create(model="chat-llama", prompt="hello", max_tokens=8, temperature=0,
                                        stop=[stop]).choices[0]
        assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"


def test_chat_completion_uses_the_template(server, client):
    import jinja2

    tok = tokenizer(server)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    out = client.chat.completions.create(model="chat-llama", messages=messages, max_tokens=6, temperature=0)
    prompt = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(CHAT_TEMPLATE).render(
        messages=messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    ids = tok.encode(prompt, add_special_tokens=False).ids
    want = reference_greedy(server, ids, 6)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == tok.decode(want)
    assert out.usage.prompt_tokens == len(ids)


def test_streamed_completion_and_chat(client):
    plain = client.completions.create(model="chat-llama", prompt="hello", max_tokens=5, temperature=0)
    chunks = list(client.completions.create(model="chat-llama", prompt="hello", max_tokens=5, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    chat = list(client.chat.completions.create(model="chat-llama", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4, temperature=0, stream=True,
                                               stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
    assert chat[-1].usage is not None and chat[-1].usage.completion_tokens >= len(text) * 0  # usage chunk last
    assert any(c.choices and c.choices[0].finish_reason for c in chat)


def generation(server, model_id: str) -> dict:
    r = requests.get(server.base_url + "/api/v1/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    return r.json()["metrics"]["generation"][model_id]


def test_stream_goes_token_by_token_and_a_closed_stream_cancels(server, client):
    plain = client.completions.create(model="chat-llama", prompt="the quick", max_tokens=40, temperature=0,
                                      extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model="chat-llama", prompt="the quick", max_tokens=40, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert len(texts) > 5 and "".join(texts) == plain.choices[0].text      # incremental deltas
    assert chunks[-1].choices[0].finish_reason == "length" and plain.usage.completion_tokens == 40
    # the first chunk comes while the generation runs: closing the stream then cancels it (a model
    # with room for 3000 tokens, so the generation cannot end before the close is seen)
    save(hf_model("llama", seed=6, max_position_embeddings=4096), server.folder / "long-llama")
    r = requests.post(server.base_url + "/api/v1/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                      json={"model_id": "long-llama", "model_type": "transformer", "model_path": "long-llama"},
                      timeout=120)
    assert r.status_code == 200, r.text
    stream = client.completions.create(model="long-llama", prompt="numbers 1", max_tokens=3000, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert first.choices[0].text and first.choices[0].finish_reason is None
    stream.close()
    deadline = time.monotonic() + 20
    while generation(server, "long-llama")["cancelled_sequences"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    after = generation(server, "long-llama")
    assert after["cancelled_sequences"] == 1 and after["tokens_generated"] < 3000
    assert after["kv_blocks_used"] == 0 and after["running"] == 0


def test_streamed_stop_string_and_the_raw_events(server, client):
    full = client.completions.create(model="chat-llama", prompt="hello", max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    want = full[:full.index(stop)]
    cut = client.completions.create(model="chat-llama", prompt="hello", max_tokens=30, temperature=0, stop=stop,
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == want and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 30                                # generation ended at the stop
    raw = requests.post(server.base_url + "/v1/chat/completions", stream=True, timeout=60,
                        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                        json={"model": "chat-llama", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                              "max_tokens": 30, "temperature": 0, "stop": [stop], "n": 2, "ignore_eos": True})
    assert raw.headers["Content-Type"].startswith("text/event-stream")
    lines = [line for line in raw.iter_lines() if line]
    assert lines[-1] == b"data: [DONE]"
    chunks = [json.loads(line[len(b"data: "):]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    for i in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant" and mine[-1]["finish_reason"] in ("stop", "length")
        text = "".join(c["delta"].get("content", "") for c in mine)
        assert stop not in text
    plain = client.chat.completions.create(model="chat-llama", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=30, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    first = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                    if c["choices"] and c["choices"][0]["index"] == 0)
    assert first == plain.choices[0].message.content


def test_embeddings_equal_transformers(server, client):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(server.folder / "tiny-bert" / "tokenizer.json"))
    texts = ["hello world", "the quick brown fox"]
    out = client.embeddings.create(model="tiny-bert", input=texts)  # the client asks for base64 by default
    assert [d.index for d in out.data] == [0, 1]
    for text, item in zip(texts, out.data):
        ids = tok.encode(text).ids
        with torch.no_grad():
            want = torch.nn.functional.normalize(server.bert(torch.tensor([ids])).last_hidden_state[0].mean(0), dim=-1)
        assert np.abs(np.asarray(item.embedding) - want.numpy()).max() <= 1e-5
    plain = requests.post(client.base_url.__str__().rstrip("/") + "/embeddings", timeout=30,
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                          json={"model": "tiny-bert", "input": "hello world", "encoding_format": "float"}).json()
    assert np.abs(np.asarray(plain["data"][0]["embedding"]) - np.asarray(out.data[0].embedding)).max() <= 1e-6
    assert plain["usage"]["prompt_tokens"] == len(tok.encode("hello world").ids)


def test_errors_in_openai_shape(server, client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-model", prompt="x")
    assert err.value.status_code == 404 and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="chat-llama", prompt="x", temperature=5)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="chat-llama", prompt=["x"] * 20, n=16)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="chat-llama", input="x")
    assert err.value.body["param"] == "model"
    bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key="msc_nobody_" + "x" * 36, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.body["type"] == "authentication_error"
    raw = requests.post(server.base_url + "/v1/chat/completions", data="{not json", timeout=30,
                        headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"})
    assert raw.status_code == 400 and set(json.loads(raw.text)) == {"error"}
