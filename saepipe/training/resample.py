"""Dead-latent resampling: a training option beside AuxK (``SAEConfig.resample_every``).

Anthropic's recipe ("Circuits Updates - April 2023", the seed guide's "dead neuron resampling"),
run by ``fit_sae`` after every ``resample_every``-th step (not after the last one), the same way
whatever the step's kernels (it edits the ``TrainState`` every step hands out and takes back):

1. The latents that have not fired for ``resample_window`` tokens (default ``dead_tokens_threshold``)
   are the ones to resample; none: nothing happens.
2. ``RESAMPLE_ROWS`` training rows (a seeded sample, normalized like the batches) are encoded and
   decoded by the current SAE; each row's squared reconstruction error ``|x - x_hat|^2`` is its
   weight, and one row per dead latent is drawn with probability proportional to it (without
   replacement while enough rows have an error).
3. Each dead latent's decoder row becomes the unit direction of its row's residual ``x - x_hat``;
   its encoder row the same direction scaled to ``resample_scale`` (0.2) x the mean encoder row
   norm of the alive latents (with tied weights the decoder row is the encoder); its ``b_enc`` 0.
4. Their Adam moments (``m``, ``v`` of those rows of ``W_enc``, ``W_dec`` and ``b_enc``) are zeroed
   and their dead counters restart at 0, so each gets a full window to fire before it can be
   resampled again. Adam's step count and every other row are unchanged.

The draw is seeded by (``seed``, step), so a resumed run resamples exactly as an uninterrupted one.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import numpy as np

from saepipe.sae.config import SAEConfig
from saepipe.sae.sparse import decode_rows, topk
from saepipe.training.state import TrainState

RESAMPLE_ROWS = 16384
"""Training rows scored at each resampling (Anthropic scored 819,200; a few per latent is enough here
to aim every dead latent at a different badly reconstructed row)."""

ENCODE_CHUNK = 2048
"""Rows encoded at a time while scoring (bounds the (rows, d_hidden) pre-activations in memory)."""


class Resampled(NamedTuple):
    state: TrainState
    latents: np.ndarray
    """The resampled latents (int64, ascending); empty when none was dead."""


def window(config: SAEConfig) -> int:
    """Tokens without firing after which a latent is resampled."""
    return int(config.resample_window if config.resample_window is not None else config.dead_tokens_threshold)


def due(step: int, config: SAEConfig, total_steps: int) -> bool:
    """Whether ``fit_sae`` resamples after optimisation step ``step`` (1-based) of ``total_steps``."""
    every = int(config.resample_every)
    return every > 0 and step % every == 0 and step < total_steps


def dead_latents(counter: np.ndarray, config: SAEConfig) -> np.ndarray:
    """The latents eligible for resampling: not fired for ``window(config)`` tokens (int64, ascending)."""
    return np.flatnonzero(np.asarray(counter) >= window(config)).astype(np.int64)


def sample_rows(train_rows: np.ndarray, config: SAEConfig, step: int) -> np.ndarray:
    """The training rows scored at the resampling after ``step`` (sorted, seeded by seed and step)."""
    rng = np.random.default_rng([config.seed, 3, step])
    size = min(len(train_rows), RESAMPLE_ROWS)
    return np.sort(rng.choice(train_rows, size=size, replace=False))


def residuals(params: dict[str, mx.array], x: np.ndarray, k: int, tied: bool) -> np.ndarray:
    """``x - x_hat`` (float32, (n, d_model)) of normalized rows under the SAE ``params``: the training
    forward (ReLU pre-activations, top-k, sparse decode)."""
    W_dec, b_dec, b_enc = params["W_dec"], params["b_dec"], params["b_enc"]
    W_enc = W_dec if tied else params["W_enc"]
    out = np.empty(x.shape, np.float32)
    for a in range(0, len(x), ENCODE_CHUNK):
        xb = mx.array(x[a : a + ENCODE_CHUNK])
        values, indices = topk(mx.maximum(mx.addmm(b_enc, xb - b_dec, W_enc.T), 0.0), k)
        e = xb - (decode_rows(values, indices, W_dec) + b_dec)
        out[a : a + ENCODE_CHUNK] = np.asarray(e)
    return out


def resample(state: TrainState, x: np.ndarray, config: SAEConfig, step: int) -> Resampled:
    """The state after resampling the dead latents toward the badly reconstructed rows of ``x``
    (normalized training rows); see the module docstring. ``state`` itself is not modified."""
    dead = dead_latents(state.counter, config)
    if dead.size == 0:
        return Resampled(state, dead)
    tied = config.tied_weights
    params = {name: np.array(a, dtype=np.float32) for name, a in state.params.items()}
    e = residuals(state.params, np.ascontiguousarray(x, dtype=np.float32), config.k, tied)
    err = np.square(e, dtype=np.float64).sum(axis=1)
    total = err.sum()
    if not np.isfinite(total) or total <= 0:  # nothing is reconstructed badly: nothing to aim at
        return Resampled(state, dead[:0])
    rng = np.random.default_rng([config.seed, 4, step])
    replace = int((err > 0).sum()) < dead.size
    chosen = rng.choice(len(err), size=dead.size, replace=replace, p=err / total)
    directions = e[chosen] / np.maximum(np.linalg.norm(e[chosen], axis=1, keepdims=True), 1e-12)

    params["W_dec"][dead] = directions
    if not tied:
        alive = np.ones(params["W_enc"].shape[0], bool)
        alive[dead] = False
        norms = np.linalg.norm(params["W_enc"][alive], axis=1)
        mean_norm = float(norms.mean()) if norms.size else 1.0
        params["W_enc"][dead] = directions * np.float32(config.resample_scale * mean_norm)
    params["b_enc"][dead] = 0.0
    m = {name: np.array(a, dtype=np.float32) for name, a in state.m.items()}
    v = {name: np.array(a, dtype=np.float32) for name, a in state.v.items()}
    for moments in (m, v):
        for name in ("W_dec", "W_enc", "b_enc"):
            if name in moments:
                moments[name][dead] = 0.0
    counter = np.array(state.counter, dtype=np.int32)
    counter[dead] = 0

    def as_mx(arrays: dict[str, np.ndarray]) -> dict[str, mx.array]:
        return {name: mx.array(a) for name, a in arrays.items()}

    new = TrainState(as_mx(params), as_mx(m), as_mx(v), mx.array(state.t), mx.array(counter))
    return Resampled(new, dead)


__all__ = [
    "ENCODE_CHUNK",
    "RESAMPLE_ROWS",
    "Resampled",
    "dead_latents",
    "due",
    "resample",
    "residuals",
    "sample_rows",
    "window",
]
