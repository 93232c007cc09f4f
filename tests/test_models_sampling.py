"""Per-request sampling and stops (models/sampling.py)."""
from __future__ import annotations

import pytest
import torch

from msmartcompute.models.sampling import SamplingParams, StopChecker, sample, sample_rows


def params(**options) -> SamplingParams:
    return SamplingParams.from_options(options, prompt_len=4, limit=64, vocab_size=50, has_tokenizer=True)


def test_options_are_checked_and_normalised():
    p = params(temperature=0.5, top_p=0.9, top_k=5, max_tokens=8, seed=3, stop_token_ids=[1, 2], stop="ab")
    assert p.normalised() == {"temperature": 0.5, "top_p": 0.9, "top_k": 5, "max_tokens": 8, "seed": 3,
                              "stop_token_ids": [1, 2], "stop": ["ab"]}
    assert params().max_tokens == 16 and params().seed >= 0
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -1}, {"max_tokens": 61}, {"max_tokens": 0},
                {"seed": -1}, {"seed": True}, {"stop_token_ids": [50]}, {"stop_token_ids": "1"},
                {"stop": ""}, {"stop": [1]}, {"ignore_eos": 1}, {"temperature": "hot"}):
        with pytest.raises(ValueError):
            params(**bad)
    with pytest.raises(ValueError, match="tokenizer"):
        SamplingParams.from_options({"stop": "x"}, prompt_len=1, limit=8, vocab_size=5, has_tokenizer=False)


def test_a_rows_tokens_depend_only_on_its_seed():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    p = params(temperature=1.0, seed=11)
    alone = [sample_rows(logits[2:3], [p], [p.generator(0, torch.device("cpu"))])[0] for _ in range(1)]
    others = [params(temperature=0.8, seed=s) for s in range(5)]
    mixed = [others[0], others[1], p, params(temperature=0), others[3], others[4]]
    gens = [q.generator(0, torch.device("cpu")) for q in mixed]
    assert sample_rows(logits, mixed, gens)[2] == alone[0]
    # the greedy row is the argmax whatever the others draw
    assert sample_rows(logits, mixed, [q.generator(0, torch.device("cpu")) for q in mixed])[3] == int(logits[3].argmax())


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample(logits, 1.0, 1.0, g, top_k=2)[0]) for _ in range(200)}
    assert picks == {0, 1}
    picks = {int(sample(logits, 1.0, 1e-9, g)[0]) for _ in range(50)}
    assert picks == {0}
    picks = {int(sample(logits, 1.0, 1.0, g)[0]) for _ in range(400)}
    assert picks == {0, 1, 2, 3, 4}


def test_stops_eos_token_ids_strings_and_length():
    decode = lambda ids: "".join(chr(ord("a") + i % 26) for i in ids)  # noqa: E731 - a toy tokenizer
    stop = StopChecker(params(max_tokens=5), eos_ids={9}, decode=decode)
    assert [stop.add(t) for t in (1, 2, 9)] == [False, False, True]
    assert stop.tokens == [1, 2] and stop.finish_reason == "stop"           # EOS is not output
    stop = StopChecker(params(max_tokens=5, ignore_eos=True), eos_ids={9}, decode=decode)
    assert [stop.add(t) for t in (9, 9, 9, 9, 9)] == [False] * 4 + [True] and stop.finish_reason == "length"
    stop = StopChecker(params(max_tokens=5, stop_token_ids=[4]), eos_ids=(), decode=decode)
    assert [stop.add(t) for t in (0, 4)] == [False, True] and stop.tokens == [0]
    stop = StopChecker(params(max_tokens=20, stop=["cd", "zz"]), eos_ids=(), decode=decode)
    done = [stop.add(t) for t in (0, 1, 2, 3)]
    assert done == [False, False, False, True] and stop.finish_reason == "stop"
    assert stop.tokens == [0, 1, 2, 3] and stop.output_text() == "ab"        # text cut before the stop
