"""``trace``: run texts through a model once and read any component output by its exact name.

    with trace(loaded, ["Hello world", "Another text"]) as t:
        pass
    t.activations["model.model.layers.10.mlp"]   # (batch, seq, d_model) mx.array

Names follow ``saepipe.lm.sites`` (``model.model.layers.{i}.mlp`` / ``.self_attn`` / the bare block
for its output, also with the ``model.layers`` prefix), matched exactly. Texts are tokenized as the
model's tokenizer says (a BOS is added only when it adds one: the default SmolLM2 adds none, the tiny
test models do) and right padded; ``lengths`` tells how many positions of each row are real, and
``text_positions`` which of them hold text rather than BOS or other special tokens (the positions
extraction stores and evaluation scores).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import mlx.core as mx
import numpy as np

from saepipe.lm.forward import forward, unwrap_model
from saepipe.lm.sites import COMPONENTS, Site, parse_site_name
from saepipe.lm.tokens import excluded_token_ids, tokenize_padded


class Activations(Mapping[str, mx.array]):
    """Captured outputs by exact site name; an unknown or uncaptured name is a KeyError listing valid ones."""

    def __init__(self, by_site: dict[Site, mx.array], num_layers: int) -> None:
        self._by_site = by_site
        self._num_layers = num_layers

    def __getitem__(self, name: str) -> mx.array:
        site = parse_site_name(name, self._num_layers)  # KeyError naming the valid forms
        if site not in self._by_site:
            raise KeyError(f"{name!r} was not captured; captured: {', '.join(self)}")
        return self._by_site[site]

    def __iter__(self) -> Iterator[str]:
        return (site.name for site in self._by_site)

    def __len__(self) -> int:
        return len(self._by_site)


class Trace:
    """The result of ``trace``: token ids, lengths, logits (when computed) and activations."""

    def __init__(self, tokens: np.ndarray, lengths: np.ndarray, logits: mx.array | None,
                 activations: Activations, text_positions: np.ndarray | None = None) -> None:
        self.tokens = tokens
        """(batch, seq) int32 token ids, right padded."""
        self.lengths = lengths
        """(batch,) number of real (non-pad) positions of each row."""
        if text_positions is None:
            text_positions = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
        self.text_positions = text_positions
        """(batch, seq) bool: real positions that hold text, not BOS/special tokens (nor padding)."""
        self.logits = logits
        """(batch, seq, vocab) logits, or None when only early layers were captured."""
        self.activations = activations
        """Component outputs by exact name, each (batch, seq, d_model)."""

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            mx.eval(list(self.activations.values()))  # materialize while the model is at hand


def trace(loaded: Any, texts: str | list[str], *, capture: Iterable[str] | None = None) -> Trace:
    """Run ``texts`` through ``loaded`` (a LoadedModel) in one forward and capture component outputs.

    ``capture``: names to capture (default: every site of every layer). When all captured sites are
    before the last block, the pass stops there and ``logits`` is None.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("trace needs at least one text")
    module = unwrap_model(loaded)
    n_layers = len(module.model.layers)
    if capture is None:
        sites = [Site(i, c) for i in range(n_layers) for c in COMPONENTS]
    else:
        sites = list(dict.fromkeys(parse_site_name(name, n_layers) for name in capture))
        if not sites:
            raise ValueError("capture names no site")
    stop = max(s.layer for s in sites)
    tokens, lengths = tokenize_padded(loaded.tokenizer, texts)
    out = forward(module, mx.array(tokens), capture=sites,
                  stop_layer=None if capture is None or stop == n_layers - 1 else stop)
    real = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    text = real & ~np.isin(tokens, excluded_token_ids(loaded.tokenizer, skip_special_tokens=True))
    return Trace(tokens, lengths, out.logits, Activations(out.activations, n_layers), text)
