"""Text <-> token ids for a checkpoint folder, with the `tokenizers` library.

A folder's `tokenizer.json`, else GPT-2's `vocab.json` + `merges.txt` (byte-level BPE).
End-of-sequence ids come from generation_config.json, else config.json, else the
tokenizer_config.json `eos_token`. The chat template is tokenizer_config.json's
`chat_template` (or a `chat_template.jinja` file, as newer exporters write it)."""
from __future__ import annotations

import json
from pathlib import Path

from .spec import SpecError


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SpecError("model_path", f"{path.name} could not be read: {exc}") from None
    return value if isinstance(value, dict) else {}


class Tokenizer:
    def __init__(self, backend, eos_ids: list[int], bos_token: str | None, eos_token: str | None,
                 chat_template: str | None):
        self.backend = backend                       # tokenizers.Tokenizer
        self.eos_ids = eos_ids
        self.bos_token, self.eos_token = bos_token, eos_token
        self.chat_template = chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt for `messages` through the checkpoint's chat template, rendered in jinja2's
        sandbox (a template is data from the folder: it may not reach Python internals)."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template (tokenizer_config.json chat_template or "
                             "chat_template.jinja): use the completions endpoint")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"the chat template refused the messages: {message}")

        # the options transformers renders chat templates with, so prompts come out the same
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        try:
            template = env.from_string(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except ValueError:
            raise
        except jinja2.TemplateError as exc:
            raise ValueError(f"the chat template could not be rendered: {type(exc).__name__}: {exc}") from None

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(folder: str, config: dict) -> Tokenizer | None:
    """The folder's tokenizer, or None when it has no tokenizer files."""
    from tokenizers import Tokenizer as Backend, decoders, pre_tokenizers
    from tokenizers.models import BPE

    root = Path(folder)
    try:
        if (root / "tokenizer.json").is_file():
            backend = Backend.from_file(str(root / "tokenizer.json"))
        elif (root / "vocab.json").is_file() and (root / "merges.txt").is_file():
            backend = Backend(BPE.from_file(str(root / "vocab.json"), str(root / "merges.txt")))
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            backend.decoder = decoders.ByteLevel()
        else:
            return None
    except Exception as exc:  # the tokenizers library raises plain Exceptions on bad files
        raise SpecError("model_path", f"the folder's tokenizer could not be read: {exc}") from None
    tok_cfg = _json(root / "tokenizer_config.json")
    eos_token = _token_text(tok_cfg.get("eos_token"))
    eos_ids = _ids(_json(root / "generation_config.json").get("eos_token_id")) or _ids(config.get("eos_token_id"))
    if not eos_ids and eos_token is not None and backend.token_to_id(eos_token) is not None:
        eos_ids = [backend.token_to_id(eos_token)]
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(template, str) and (root / "chat_template.jinja").is_file():
        template = (root / "chat_template.jinja").read_text(encoding="utf-8")
    return Tokenizer(backend, eos_ids, _token_text(tok_cfg.get("bos_token")), eos_token,
                     template if isinstance(template, str) else None)
