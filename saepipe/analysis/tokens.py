"""Tokens: which latents fire most on each vocabulary token, and token ids as the strings text shows.

``token_features``: for every token id that occurs, the ``top`` latents with the largest activation
on any occurrence of it (a latent's maximum over that token's rows), strongest first; ties go to
the smaller latent id. One pass over the codes with a fixed-size table per token (vocabulary x
``top``), so memory depends on the vocabulary, not on the number of rows. The update keeps the
``top`` best (max activation, latent) pairs exactly and in any order of the rows: a latent is
evicted only when it is the table's weakest, and the weakest only grows.

``TokenStrings``: ``tokenizer.decode([id])`` of each id, once (" Paris", not "ĠParis").
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import numba as nb
import numpy as np

from saepipe.analysis.codes import Codes


@nb.njit(inline="always")
def _better(v1, f1, v2, f2):
    return v1 > v2 or (v1 == v2 and f1 < f2)


@nb.njit(inline="always")
def _lowest(vals, t, top):
    low = vals[t, 0]
    for u in range(1, top):
        low = min(low, vals[t, u])
    return low


@nb.njit(parallel=True, cache=True, boundscheck=False)
def _token_tables(values, indices, token_id, parts, feats, vals, filled, lowest):
    """Part p handles the tokens t with t % parts == p (no two threads share a table)."""
    n, k = values.shape
    top = feats.shape[1]
    for p in nb.prange(parts):
        for r in range(n):
            t = token_id[r]
            if t % parts != p:
                continue
            for s in range(k):
                v = values[r, s]
                if v <= 0:
                    continue
                m = filled[t]
                if m == top and v < lowest[t]:  # cannot enter, nor raise a latent already there
                    continue
                j = indices[r, s]
                here = -1
                for u in range(m):
                    if feats[t, u] == j:
                        here = u
                        break
                if here >= 0:
                    if v > vals[t, here]:
                        vals[t, here] = v
                        if m == top:
                            lowest[t] = _lowest(vals, t, top)
                elif m < top:
                    feats[t, m] = j
                    vals[t, m] = v
                    filled[t] = m + 1
                    if m + 1 == top:
                        lowest[t] = _lowest(vals, t, top)
                else:
                    worst = 0
                    for u in range(1, top):
                        if _better(vals[t, worst], feats[t, worst], vals[t, u], feats[t, u]):
                            worst = u
                    if _better(v, j, vals[t, worst], feats[t, worst]):
                        feats[t, worst] = j
                        vals[t, worst] = v
                        lowest[t] = _lowest(vals, t, top)


class TokenFeatures(NamedTuple):
    token_id: np.ndarray
    """(T,) int32 tokens that occur (with at least one firing), ascending."""
    offsets: np.ndarray
    """(T + 1,) int64: token i's latents are ``features[offsets[i]:offsets[i + 1]]``."""
    features: np.ndarray
    """int32 latents, per token strongest first."""
    values: np.ndarray
    """float32 activations, per token descending."""


def token_features(codes: Codes, vocab_size: int, top: int, parts: int = 16) -> TokenFeatures:
    """The ``top`` latents of each token (see the module docstring); ``vocab_size`` bounds the ids."""
    n_tokens = int(vocab_size)
    if codes.n_rows:
        n_tokens = max(n_tokens, int(codes.token_id.max()) + 1)
    width = max(top, 1)
    feats = np.full((n_tokens, width), -1, np.int32)
    vals = np.zeros((n_tokens, width), np.float32)
    filled = np.zeros(n_tokens, np.int64)
    lowest = np.zeros(n_tokens, np.float32)
    if top > 0 and codes.n_rows:
        _token_tables(codes.values, codes.indices, codes.token_id, parts, feats, vals, filled, lowest)
    ids = np.flatnonzero(filled)
    f, v = feats[ids], vals[ids]
    empty = f < 0
    order = np.lexsort((np.where(empty, np.iinfo(np.int32).max, f), np.where(empty, np.inf, -v)), axis=-1)
    f, v = np.take_along_axis(f, order, 1), np.take_along_axis(v, order, 1)
    keep = np.take_along_axis(~empty, order, 1)
    offsets = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(filled[ids], out=offsets[1:])
    return TokenFeatures(ids.astype(np.int32), offsets, f[keep], v[keep])


class TokenStrings:
    """Token id -> the string ``tokenizer.decode([id])`` gives, leading space kept; decoded once each."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def strings(self, ids: Iterable[int]) -> list[str]:
        ids = [int(i) for i in ids]
        missing = sorted({i for i in ids if i not in self._cache})
        if missing:
            for i, s in zip(missing, self._decode(missing), strict=True):
                self._cache[i] = s
        return [self._cache[i] for i in ids]

    def _decode(self, ids: list[int]) -> list[str]:
        tok = self.tokenizer
        texts = tok.batch_decode([[i] for i in ids]) if hasattr(tok, "batch_decode") else [tok.decode([i]) for i in ids]
        pieces = tok.convert_ids_to_tokens(ids) if hasattr(tok, "convert_ids_to_tokens") else [None] * len(ids)
        out = []
        for text, piece in zip(texts, pieces, strict=True):
            # SentencePiece tokenizers drop the word-start marker's space when decoding one token.
            if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" "):
                text = " " + text
            out.append(text)
        return out


__all__ = ["TokenFeatures", "TokenStrings", "token_features"]
