"""The generation options every decoder takes, checked once: temperature, top_p,
max_tokens, seed (transformer.py and pretrained.py)."""
from __future__ import annotations

import os

DEFAULT_MAX_TOKENS = 16


def _number(options: dict, name: str, default: float) -> float:
    value = options.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"options.{name} must be a number, got {value!r}")
    return float(value)


def sampling_options(options: dict, prompt_length: int, limit: int) -> dict:
    """options with temperature (>= 0, default 1; 0 = greedy), top_p (in (0, 1], default 1),
    max_tokens (>= 1, default min(16, room left); prompt + max_tokens <= limit) and seed
    (default a fresh random one) normalised. Raises ValueError naming the option."""
    options = dict(options or {})
    room = limit - prompt_length
    temperature = _number(options, "temperature", 1.0)
    top_p = _number(options, "top_p", 1.0)
    if temperature < 0 or temperature == float("inf"):
        raise ValueError(f"options.temperature must be a finite number >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"options.top_p must lie in (0, 1], got {top_p}")
    max_tokens = options.get("max_tokens")
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, room)
        if max_tokens < 1:
            raise ValueError(f"the prompt of {prompt_length} tokens leaves no room to generate "
                             f"within max_sequence_length {limit}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= limit:
        raise ValueError(f"options.max_tokens must be an integer in [1, {limit}], got {max_tokens!r}")
    if max_tokens > room:
        raise ValueError(f"prompt length {prompt_length} + max_tokens {max_tokens} exceeds "
                         f"max_sequence_length {limit}")
    seed = options.get("seed")
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"options.seed must be a non-negative integer, got {seed!r}")
    options.update(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    return options
