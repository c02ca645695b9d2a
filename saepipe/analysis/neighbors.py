"""Nearest latents: the latents whose decoder directions have the largest cosine with a latent's own
(itself excluded), computed in blocks of latents (only a (block, d_hidden) matrix in memory)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from saepipe.analysis.ranking import top_per_row

BLOCK = 1024
"""Latents per similarity matmul."""


def nearest_latents(directions: np.ndarray, features: np.ndarray, n: int,
                    block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(latents (len(features), n) int32, cosines (len(features), n) float32) of the rows
    ``features`` of ``directions`` (d_hidden, d_model), most similar first."""
    norms = np.linalg.norm(directions, axis=1, keepdims=True)
    unit = mx.array((directions / np.maximum(norms, 1e-12)).astype(np.float32))
    features = np.asarray(features, dtype=np.int64)
    n = min(int(n), max(len(directions) - 1, 0))
    out_j, out_c = [], []
    for a in range(0, len(features), block):
        rows = features[a : a + block]
        sims = unit[mx.array(rows)] @ unit.T
        mx.eval(sims)
        sims = np.array(sims, dtype=np.float32)
        sims[np.arange(len(rows)), rows] = -3.0  # below any cosine: not its own neighbour
        j, c = top_per_row(sims, n)
        out_j.append(j)
        out_c.append(c)
    if not out_j:
        return np.zeros((0, n), np.int32), np.zeros((0, n), np.float32)
    return np.concatenate(out_j), np.concatenate(out_c)


__all__ = ["BLOCK", "nearest_latents"]
