"""Per-request sampling and stops for decoders (transformer.py, pretrained.py, the generation
engine): the options a request may give, checked once, and the choice of each next token.

A request's tokens depend only on its seed: every sampled row owns a torch.Generator seeded
with the request's seed (row r of a multi-row request with seed + r) and draws exactly one
uniform number per generated token, whatever else shares the batch. Temperature 0 is greedy
(argmax, no draw). top_k keeps the k most likely tokens, then top_p the smallest prefix of
them whose mass reaches top_p.

Stops, checked after every token (finish_reason "stop"; else "length" at max_tokens):
- EOS (the model's eos_token_id, unless ignore_eos) and stop_token_ids: the token ends the
  row and is not part of its output;
- stop strings (needs a tokenizer, `decode`): the row ends at the token whose text completes
  a stop string (across token boundaries: the text is detokenized incrementally); that token
  stays in the ids, and the text is cut before the stop string.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch


def _number(options: dict, name: str, default: float) -> float:
    value = options.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"options.{name} must be a number, got {value!r}")
    return float(value)


def _int(options: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = options.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        span = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"options.{name} must be an integer {span}, got {value!r}")
    return value


def _str_list(options: dict, name: str) -> tuple[str, ...]:
    value = options.get(name)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value) or len(value) > 16:
        raise ValueError(f"options.{name} must be a non-empty string or a list of at most 16 of them")
    return tuple(value)


DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                    # 0: off
    seed: int = 0
    max_tokens: int = DEFAULT_MAX_TOKENS
    stop_token_ids: frozenset = field(default_factory=frozenset)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_options(cls, options: dict, *, prompt_len: int, limit: int, vocab_size: int | None,
                     has_tokenizer: bool) -> "SamplingParams":
        """Checks a request's options (ValueError names the bad one). `limit` is the model's
        max_sequence_length: prompt + max_tokens must fit in it."""
        room = limit - prompt_len
        temperature = _number(options, "temperature", 1.0)
        if temperature < 0 or temperature == float("inf"):
            raise ValueError(f"options.temperature must be a finite number >= 0, got {temperature}")
        top_p = _number(options, "top_p", 1.0)
        if not 0 < top_p <= 1:
            raise ValueError(f"options.top_p must lie in (0, 1], got {top_p}")
        top_k = _int(options, "top_k", 0, 0)
        max_tokens = options.get("max_tokens")
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, room)
            if max_tokens < 1:
                raise ValueError(f"the prompt of {prompt_len} tokens leaves no room to generate "
                                 f"within max_sequence_length {limit}")
        max_tokens = _int({"max_tokens": max_tokens}, "max_tokens", None, 1, limit)
        if max_tokens > room:
            raise ValueError(f"prompt length {prompt_len} + max_tokens {max_tokens} exceeds "
                             f"max_sequence_length {limit}")
        seed = options.get("seed")
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        seed = _int({"seed": seed}, "seed", None, 0, 2 ** 63 - 1)
        stop_ids = options.get("stop_token_ids") or []
        if not isinstance(stop_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < (vocab_size or 2 ** 63) for t in stop_ids):
            raise ValueError(f"options.stop_token_ids must be a list of token ids in [0, {vocab_size})")
        stop = _str_list(options, "stop")
        if stop and not has_tokenizer:
            raise ValueError("options.stop (stop strings) needs a model with a tokenizer; "
                             "use options.stop_token_ids with token ids")
        ignore_eos = options.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise ValueError(f"options.ignore_eos must be a boolean, got {ignore_eos!r}")
        return cls(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_tokens=max_tokens,
                   stop_token_ids=frozenset(stop_ids), stop=stop, ignore_eos=ignore_eos)

    def normalised(self) -> dict:
        """The options as the response echoes them."""
        out = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
               "max_tokens": self.max_tokens, "seed": self.seed}
        if self.stop_token_ids:
            out["stop_token_ids"] = sorted(self.stop_token_ids)
        if self.stop:
            out["stop"] = list(self.stop)
        return out

    def generator(self, row: int, device: torch.device) -> torch.Generator | None:
        """Row `row`'s own random stream (None when greedy: argmax draws nothing)."""
        if self.greedy:
            return None
        return torch.Generator(device=device).manual_seed((self.seed + row) % 2 ** 63)


def _draw(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
          u: torch.Tensor) -> torch.Tensor:
    """logits [R, V], per-row temperature (> 0) / top_p / top_k (0: off) [R] and uniform draws
    u [R, 1] -> token ids [R]: u maps through the cumulative distribution of the kept tokens
    (the top_k most likely, then the smallest prefix of them whose mass reaches top_p). A row
    that keeps every token (top_p 1, top_k 0) takes the distribution in vocabulary order: no sort."""
    probs = torch.softmax(logits.float() / temperature[:, None], dim=-1)
    plain = (top_p >= 1) & (top_k == 0)
    if bool(plain.all()):
        return _pick(probs.cumsum(dim=-1), u)
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    if bool(plain.any()):
        out[plain] = _pick(probs[plain].cumsum(dim=-1), u[plain])
    cut = ~plain
    sorted_probs, order = probs[cut].sort(dim=-1, descending=True)  # [R', V]
    before = sorted_probs.cumsum(dim=-1) - sorted_probs           # mass of the tokens ahead
    kept = torch.where(before < top_p[cut, None], sorted_probs, torch.zeros_like(sorted_probs))
    rank = torch.arange(logits.shape[-1], device=logits.device)
    k = top_k[cut, None]
    kept = torch.where((k > 0) & (rank[None, :] >= k), torch.zeros_like(kept), kept)
    kept[:, 0] = sorted_probs[:, 0]                               # the top token always stays
    out[cut] = order.gather(-1, _pick(kept.cumsum(dim=-1), u[cut])[:, None]).squeeze(-1)
    return out


def _pick(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """cdf [R, V] (unnormalised), u [R, 1] in [0, 1) -> the index [R] where u * total falls."""
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator | None, top_k: int = 0) -> torch.Tensor:
    """logits [R, V] -> token ids [R]: argmax at temperature 0, else one uniform draw per row
    from `generator` (see _draw)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    r, device = logits.shape[0], logits.device
    u = torch.rand(r, 1, generator=generator, device=device)
    full = torch.full((r,), float(temperature), device=device)
    return _draw(logits, full, torch.full((r,), float(top_p), device=device),
                 torch.full((r,), int(top_k), dtype=torch.long, device=device), u)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> list[int]:
    """logits [N, V], one row per sequence with its own params and generator -> N token ids.
    Greedy rows share one argmax; the sampled rows share one _draw, each with the uniform
    drawn from its own generator (so the same tokens as `sample` row by row)."""
    out = logits.argmax(dim=-1).tolist()
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        device = logits.device
        u = torch.cat([torch.rand(1, 1, generator=generators[i], device=device) for i in rows])
        picked = _draw(logits[rows], torch.tensor([params[i].temperature for i in rows], device=device),
                       torch.tensor([params[i].top_p for i in rows], device=device),
                       torch.tensor([params[i].top_k for i in rows], dtype=torch.long, device=device), u)
        for i, token in zip(rows, picked.tolist()):
            out[i] = token
    return out


class StopChecker:
    """One row's output and stop state: `add(token)` says whether the row has finished.

    With a tokenizer (`decode`) the row's text is detokenized incrementally, as the tokens come:
    the last few tokens are decoded with and without the new one and the difference is the new
    text (a window, so byte-level pieces and leading-space rules decode as they would in the
    whole; a piece that ends inside a UTF-8 character waits for the next token). Stop strings
    are searched in the text across token boundaries; the text is cut before the first one.
    `take_text()` hands out the text not yet streamed, holding back a tail that could still
    grow into a stop string, so a stop string never reaches a stream."""

    def __init__(self, params: SamplingParams, eos_ids: frozenset, decode: Callable[[list[int]], str] | None):
        self.params = params
        self.eos_ids = frozenset() if params.ignore_eos else frozenset(eos_ids)
        self.decode = decode
        self.tokens: list[int] = []   # the row's output ids
        self.text = ""                # with a tokenizer: the output text so far (cut at a stop string)
        self.finish_reason: str | None = None
        self._prefix = 0              # tokens[_prefix:_read] decode to the text just before the unread ones
        self._read = 0
        self._streamed = 0            # chars of text handed out by take_text
        self._stopped_by_string = False

    def output_text(self) -> str | None:
        """The row's text (cut before a stop string); None without a tokenizer."""
        return None if self.decode is None else self.text

    def add(self, token: int) -> bool:
        p = self.params
        if token in self.eos_ids or token in p.stop_token_ids:
            return self._finish("stop")
        self.tokens.append(token)
        if self.decode is not None and self._detokenize(final=len(self.tokens) >= p.max_tokens):
            return self._finish("stop")
        if len(self.tokens) >= p.max_tokens:
            return self._finish("length")
        return False

    def take_text(self) -> str:
        """Text not handed out yet: all of it once finished, else up to a possible stop-string start."""
        end = len(self.text)
        if self.finish_reason is None:
            end -= _stop_prefix_len(self.text, self.params.stop)
        out = self.text[self._streamed:end]
        self._streamed = max(self._streamed, end)
        return out

    def _finish(self, reason: str) -> bool:
        if self.decode is not None and not self._stopped_by_string and self._read < len(self.tokens):
            if self._detokenize(final=True):  # a last piece that ended inside a character
                reason = "stop"
        self.finish_reason = reason
        return True

    def _detokenize(self, final: bool) -> bool:
        """Append the new tokens' text; True when it completes a stop string (the text is cut)."""
        before = self.decode(self.tokens[self._prefix:self._read])
        now = self.decode(self.tokens[self._prefix:])
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return False  # nothing new yet, or a character still incomplete
        start = len(self.text)
        self.text += now[len(before):]
        self._prefix, self._read = self._read, len(self.tokens)
        stops = self.params.stop
        if stops:
            search = max(0, start - max(map(len, stops)) + 1)
            hits = [i for i in (self.text.find(s, search) for s in stops) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self._stopped_by_string = True
                return True
        return False


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the start of a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
