"""Texts to token-id batches: the one tokenize, truncate and right-pad used by trace, extract and evaluate.

Texts are encoded with ``tokenizer.encode`` (so BOS/EOS are added exactly as the model's tokenizer
says), cut to ``context_length`` tokens, and right padded with the tokenizer's pad id (0 when it has
none). The model is causal, so pads after a text never change the text's own positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def pad_id(tokenizer: Any) -> int:
    """The id that fills positions after a text (the tokenizer's pad token, else 0)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def encode(tokenizer: Any, texts: Sequence[str], context_length: int | None = None) -> list[list[int]]:
    """Token ids of each text, at most ``context_length`` of them (None: all)."""
    return [tokenizer.encode(t)[:context_length] for t in texts]


def pad_right(rows: Sequence[Sequence[Any]], fill: Any, dtype: Any = np.int32) -> np.ndarray:
    """``rows`` as one (len(rows), longest) array, each row followed by ``fill`` (width >= 1)."""
    width = max(1, max((len(r) for r in rows), default=0))
    out = np.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def lengths(rows: Sequence[Sequence[Any]]) -> np.ndarray:
    """(len(rows),) int64 number of real (non-pad) positions of each row."""
    return np.array([len(r) for r in rows], dtype=np.int64)


def tokenize_padded(tokenizer: Any, texts: Sequence[str],
                    context_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (B, T) int32 right padded, lengths (B,)) of ``texts``."""
    encoded = encode(tokenizer, texts, context_length)
    return pad_right(encoded, pad_id(tokenizer)), lengths(encoded)


def excluded_token_ids(tokenizer: Any, skip_special_tokens: bool) -> np.ndarray:
    """Token ids whose positions are never stored or scored: BOS and every special token, when
    ``skip_special_tokens`` (their activations say more about the position than about the text)."""
    if not skip_special_tokens:
        return np.zeros(0, dtype=np.int64)
    ids = set(tokenizer.all_special_ids)
    if tokenizer.bos_token_id is not None:
        ids.add(tokenizer.bos_token_id)
    return np.array(sorted(ids), dtype=np.int64)


__all__ = ["encode", "excluded_token_ids", "lengths", "pad_id", "pad_right", "tokenize_padded"]
