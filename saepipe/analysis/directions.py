"""Latent directions in the model's activation space, and the model's unembedding applied to them.

A latent's decoder row lives in the SAE's normalized units; ``decoder_directions`` undoes the input
normalization (``W_dec[j] * std``: the change in the model's activation per unit of the latent).
``unembed`` maps directions through the final norm's weight (an RMSNorm's elementwise scale; the
per-token rms is ignored) and the unembedding (``lm_head``, or the tied input embeddings).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from saepipe.lm.forward import unwrap_model
from saepipe.sae.normalization import InputNormalizer


def decoder_directions(sae: Any) -> np.ndarray:
    """(d_hidden, d_model) float32: each latent's decoder row in the model's activation space."""
    w = np.asarray(sae.W_dec, dtype=np.float32)
    if sae.stats is None:
        return np.ascontiguousarray(w)
    std = np.asarray(InputNormalizer(sae.stats, sae.normalization).std, dtype=np.float32)
    return np.ascontiguousarray(w * std[None, :])


class Unembedding:
    """``logits(directions)`` -> (n, vocab) float32: directions scaled by the final norm's weight,
    through the model's output head."""

    def __init__(self, model: Any) -> None:
        module = unwrap_model(model)
        self.module = module
        norm = getattr(module.model, "norm", None)
        weight = getattr(norm, "weight", None)
        self.norm_weight = None if weight is None else mx.array(weight).astype(mx.float32)
        tied = getattr(getattr(module, "args", None), "tie_word_embeddings", False)
        self.tied = bool(tied) or not hasattr(module, "lm_head")

    def logits(self, directions: np.ndarray) -> np.ndarray:
        h = mx.array(np.ascontiguousarray(directions, dtype=np.float32))
        if self.norm_weight is not None:
            h = h * self.norm_weight
        out = self.module.model.embed_tokens.as_linear(h) if self.tied else self.module.lm_head(h)
        out = out.astype(mx.float32)
        mx.eval(out)
        return np.asarray(out)


__all__ = ["Unembedding", "decoder_directions"]
