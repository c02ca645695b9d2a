"""How an SAE standardises its inputs with ``NormStats``: the modes, and the arrays it divides by."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from saepipe.activations.stats import NormStats

NORMALIZATIONS = ("scalar", "per_dim")
"""How ``std`` is formed from the stats. "scalar": one value for every dimension, the root of the
mean per-dimension variance, so normalization keeps the activations' geometry and the training loss
is proportional to the error in the original space (what ``evaluate`` measures). "per_dim": each
dimension standardised on its own (mlxterp's running mean/std); the loss then weights every
dimension equally, which under-weights the few high-variance dimensions that dominate the
original-space error of LLM activations."""

STD_FLOOR = 1e-6
"""A (near-)constant input dimension gets std 1 instead of a division by ~0."""


class InputNormalizer:
    """The mean and std arrays (float32 MLX) an SAE normalizes its inputs with: ``(x - mean) / std``.

    Kept out of the SAE module's parameter tree, so optimizers and ``parameters()`` never see them.
    """

    def __init__(self, stats: NormStats, mode: str) -> None:
        if mode not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, not {mode!r}")
        self.stats = stats
        self.mode = mode
        per_dim = np.asarray(stats.std, dtype=np.float64)
        if mode == "scalar":
            scale = float(np.sqrt(np.mean(np.square(per_dim))))
            std = np.full_like(per_dim, scale if scale > STD_FLOOR else 1.0)
        else:
            std = np.where(per_dim > STD_FLOOR, per_dim, 1.0)
        self.mean = mx.array(np.asarray(stats.mean, dtype=np.float32))
        self.std = mx.array(np.asarray(std, dtype=np.float32))

    def normalize(self, x: mx.array) -> mx.array:
        return (x - self.mean) / self.std

    def denormalize(self, x_n: mx.array) -> mx.array:
        return x_n * self.std + self.mean


__all__ = ["NORMALIZATIONS", "STD_FLOOR", "InputNormalizer"]
