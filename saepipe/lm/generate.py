"""Text generation with edits of component outputs at every position (steered generation).

``generate(loaded, prompt, max_tokens, edits_at=...)`` continues ``prompt`` one token at a time,
greedily (``temperature=0``) or by sampling with a seeded key. ``edits_at(start, length)`` returns
the edits (``saepipe.lm.forward``'s ``Add``/``Replace``...) for the absolute positions
``start .. start + length - 1``, so an intervention can cover the prompt and every generated token.

Two ways to run the model, same tokens up to float32 rounding:

- with a KV cache (``forward_cached``): the prompt once, then one position per new token, attention
  through the model's own mlx-lm modules. The default where every block's attention takes a
  ``cache`` argument (mlx-lm's Llama does).
- without (``cache=False``): the whole sequence again for each new token (``forward``), for a block
  layout without a cache.

Measured speeds are in docs/performance.md (``benchmarks/generate.py``).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np

from saepipe.lm.forward import Edit, forward, forward_cached, make_cache, unwrap_model
from saepipe.lm.sites import Site

EditsAt = Callable[[int, int], Mapping[Site, Edit]]
"""``edits_at(start, length)``: the edits for absolute positions ``start .. start + length - 1``."""


class Generation(NamedTuple):
    """A continuation: its text, its token ids and how it was made. ``str()`` gives the text."""

    text: str
    """The generated tokens decoded (the prompt not included; a stop token not included)."""
    tokens: list[int]
    """Generated token ids (a stop token not included)."""
    prompt_tokens: list[int]
    """The prompt's token ids, as the model saw them."""
    stopped: bool
    """True when a stop token (end of sequence) ended it before ``max_tokens``."""
    cached: bool
    """Whether the KV cache was used."""
    seconds: float
    """Wall time of the forward passes and sampling (tokenization and decoding not included)."""

    def __str__(self) -> str:
        return self.text

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("inf")


def supports_cache(model: Any) -> bool:
    """Whether every block's attention takes a ``cache`` argument (mlx-lm's modules do)."""
    for block in unwrap_model(model).model.layers:
        try:
            params = inspect.signature(block.self_attn.__call__).parameters
        except (TypeError, ValueError):
            return False
        if "cache" not in params:
            return False
    return True


def generate_tokens(model: Any, prompt_tokens: Sequence[int], max_tokens: int, *, edits_at: EditsAt | None = None,
                    temperature: float = 0.0, seed: int = 0, cache: bool | None = None,
                    stop_tokens: Sequence[int] = ()) -> tuple[list[int], bool, bool, float]:
    """The token loop of ``generate``: (new tokens, stopped, cached, seconds)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 0:
        raise ValueError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0 or not np.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    prompt = [int(t) for t in prompt_tokens]
    if not prompt:
        raise ValueError("the prompt has no tokens (an empty prompt with a tokenizer that adds no BOS)")
    use_cache = supports_cache(model) if cache is None else bool(cache)
    if use_cache and not supports_cache(model):
        raise ValueError("cache=True, but this model's attention takes no KV cache; use cache=False")
    stops = {int(t) for t in stop_tokens}
    key = mx.random.key(int(seed))
    no_edits: EditsAt = lambda start, length: {}  # noqa: E731
    edits_at = edits_at or no_edits
    started = time.perf_counter()
    out: list[int] = []
    stopped = False
    kv = make_cache(model) if use_cache else None
    for step in range(int(max_tokens)):
        if kv is not None:
            new = prompt if step == 0 else out[-1:]
            start = 0 if step == 0 else len(prompt) + len(out) - 1
            logits = forward_cached(model, mx.array([new]), kv, edit=edits_at(start, len(new)) or None)[0, -1]
        else:
            seq = prompt + out
            logits = forward(model, mx.array([seq]), edit=edits_at(0, len(seq)) or None).logits[0, -1]
        if temperature == 0:
            token = int(mx.argmax(logits).item())
        else:
            key, sub = mx.random.split(key)
            token = int(mx.random.categorical(logits.astype(mx.float32) / temperature, key=sub).item())
        if token in stops:
            stopped = True
            break
        out.append(token)
    return out, stopped, use_cache, time.perf_counter() - started


def generate(loaded: Any, prompt: str, max_tokens: int = 40, *, edits_at: EditsAt | None = None,
             temperature: float = 0.0, seed: int = 0, cache: bool | None = None,
             stop_at_eos: bool = True) -> Generation:
    """Continue ``prompt`` with up to ``max_tokens`` tokens of ``loaded`` (a LoadedModel).

    ``temperature`` 0: greedy (argmax, deterministic); > 0: sampling from softmax(logits / T) with
    ``mx.random.key(seed)`` (the same seed gives the same text). ``edits_at``: see the module
    docstring. ``cache``: None uses a KV cache when the model supports one. ``stop_at_eos``: stop
    at the tokenizer's end-of-sequence token.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, not {type(prompt).__name__}")
    tokenizer = loaded.tokenizer
    prompt_tokens = list(tokenizer.encode(prompt))
    eos = getattr(tokenizer, "eos_token_id", None)
    stops = [eos] if stop_at_eos and eos is not None else []
    tokens, stopped, cached, seconds = generate_tokens(
        loaded, prompt_tokens, max_tokens, edits_at=edits_at, temperature=temperature, seed=seed, cache=cache,
        stop_tokens=stops)
    return Generation(tokenizer.decode(tokens), tokens, prompt_tokens, stopped, cached, seconds)


__all__ = ["EditsAt", "Generation", "generate", "generate_tokens", "supports_cache"]
