"""What a run visits when: the learning-rate schedule, the train/validation split, each epoch's order.

All three are pure functions of the config and the seed, so a resumed run recomputes them and
continues exactly where an uninterrupted run would be.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from saepipe.sae.config import SAEConfig


class Split(NamedTuple):
    train: np.ndarray
    """Sorted row indices trained on."""
    val: np.ndarray
    """Sorted row indices held out and scored at each epoch end."""


def learning_rate_at(step: int, total_steps: int, config: SAEConfig) -> float:
    """Learning rate of optimisation step ``step`` (0-based): linear warmup, then ``lr_decay``."""
    peak = config.learning_rate
    if peak is None:
        raise ValueError("learning_rate is None: fit_sae resolves it with default_learning_rate(d_hidden) first")
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    if config.lr_decay == "constant":
        return peak
    low = peak * config.min_lr_ratio
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    if config.lr_decay == "linear":
        return peak + (low - peak) * progress
    return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * progress))


def split_rows(n_rows: int, validation_split: float, seed: int) -> Split:
    """Seeded train/validation split of row indices (both sorted); at least one training row."""
    n_val = int(n_rows * validation_split)
    if validation_split > 0 and n_val == 0 and n_rows >= 2:
        n_val = 1
    n_val = min(n_val, n_rows - 1)
    perm = np.random.default_rng([seed, 0]).permutation(n_rows)
    return Split(np.sort(perm[n_val:]), np.sort(perm[:n_val]))


def epoch_order(train_rows: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The training rows in the order epoch ``epoch`` visits them (seeded, independent per epoch)."""
    return train_rows[np.random.default_rng([seed, 1, epoch]).permutation(len(train_rows))]


def epoch_batches(train_rows: np.ndarray, seed: int, epoch: int, batch_size: int) -> list[np.ndarray]:
    """Epoch ``epoch``'s batches, each sorted (a shard source reads sorted rows fastest); the
    remainder that does not fill a batch is skipped that epoch."""
    order = epoch_order(train_rows, seed, epoch)
    return [np.sort(order[b * batch_size : (b + 1) * batch_size]) for b in range(len(order) // batch_size)]


__all__ = ["Split", "epoch_batches", "epoch_order", "learning_rate_at", "split_rows"]
