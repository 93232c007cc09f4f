"""Tiny random Hugging Face checkpoints and tokenizers, made on the fly (never downloaded)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello model",
          "a small tokenizer trained in the test", "numbers 0 1 2 3 4 5 6 7 8 9",
          "it was the best of times, it was the worst of times"] * 4
VOCAB = 320  # the byte-level alphabet alone takes 256 ids


def train_tokenizer(kind: str = "bpe"):
    """A byte-level BPE (decoders) or WordPiece with [CLS]/[SEP] (BERT) tokenizer of VOCAB ids."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
        tok.train_from_iterator(CORPUS, trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
        tok.decoder = decoders.WordPiece()
        return tok
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def hf_config(family: str, **overrides):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                       bos_token_id=0, eos_token_id=1, **overrides)
    if family == "bert":
        return transformers.BertConfig(**{**common, **overrides})
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[family]
    return cls(**{**common, "num_key_value_heads": 2, "bos_token_id": 0, "eos_token_id": 1, **overrides})


def hf_model(family: str, seed: int = 0, **overrides):
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    cls = {"gpt2": transformers.GPT2LMHeadModel, "bert": transformers.BertModel,
           "llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
           "qwen2": transformers.Qwen2ForCausalLM}[family]
    model = cls(cfg).eval()
    with torch.no_grad():  # random init is tiny (std 0.02): widen it so logits differ clearly
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
            else:  # norms and biases: away from 1 / 0
                p.add_(torch.randn_like(p) * 0.05)
    return model


def save(model, folder: Path, fmt: str = "safetensors", tokenizer: str | None = "bpe",
         chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """save_pretrained as safetensors / sharded safetensors / pytorch_model.bin, plus a tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "sharded":
        model.save_pretrained(folder, max_shard_size="20KB")
        assert (folder / "model.safetensors.index.json").is_file()
    else:
        model.save_pretrained(folder)
    if fmt == "bin":
        (folder / "model.safetensors").unlink()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save(state, folder / "pytorch_model.bin")
    if tokenizer:
        train_tokenizer(tokenizer).save(str(folder / "tokenizer.json"))
        special = ({"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]"} if tokenizer == "wordpiece"
                   else {"bos_token": "<s>", "eos_token": "</s>"})
        if chat_template and tokenizer != "wordpiece":
            special["chat_template"] = chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(special))
    return folder
