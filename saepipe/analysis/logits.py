"""Logit effects: the tokens each latent's decoder direction promotes and suppresses most.

The direction (``saepipe.analysis.directions``) goes through the final norm's weight and the
unembedding; the ``top`` largest and smallest logits are kept, in blocks of latents so that only a
(block, vocab) matrix is ever in memory.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from saepipe.analysis.directions import Unembedding
from saepipe.analysis.ranking import top_per_row

BLOCK = 1024
"""Latents per unembedding matmul."""


class LogitEffects(NamedTuple):
    promoted: np.ndarray
    """(n, top) int32 token ids, largest logit first."""
    promoted_values: np.ndarray
    """(n, top) float32."""
    suppressed: np.ndarray
    """(n, top) int32 token ids, most negative logit first."""
    suppressed_values: np.ndarray
    """(n, top) float32 (negative when the direction lowers that token)."""


def logit_effects(unembedding: Unembedding, directions: np.ndarray, top: int, block: int = BLOCK) -> LogitEffects:
    """Top promoted and suppressed tokens of each row of ``directions`` (n, d_model)."""
    parts: list[tuple[np.ndarray, ...]] = []
    for a in range(0, len(directions), block):
        logits = unembedding.logits(directions[a : a + block])
        up, up_v = top_per_row(logits, top)
        np.negative(logits, out=logits)
        down, down_v = top_per_row(logits, top)
        parts.append((up, up_v, down, -down_v))
    if not parts:
        empty_i, empty_f = np.zeros((0, top), np.int32), np.zeros((0, top), np.float32)
        return LogitEffects(empty_i, empty_f, empty_i, empty_f)
    return LogitEffects(*(np.concatenate(col) for col in zip(*parts, strict=True)))


__all__ = ["BLOCK", "LogitEffects", "logit_effects"]
