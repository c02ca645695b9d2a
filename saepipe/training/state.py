"""What every training step shares: the state it updates, the optimizer, the dead counters, AuxK.

The three steps (``reference``, ``mlx_step``, ``cpu_step``; see ``saepipe.training.steps``) differ
only in how they compute the same loss and gradients. Everything else is defined once, here:

- ``TrainState``: parameters, Adam moments, Adam's step count and the dead counters; checkpoints
  hold exactly this.
- The update (``constrained_adam``): remove each decoder row's gradient component parallel to the
  row, clip the global gradient norm (``gradient_clip``, 0 = off), bias-corrected Adam
  (``ADAM_BETAS``, ``ADAM_EPS``), then renormalize the decoder rows to unit norm. The CPU step runs
  the same update as a fused numba kernel with these constants.
- The dead counters (``count_since_fired``): tokens since each latent last fired (value > 0 in its
  row's top-k), saturating at ``counter_cap`` (``dead_tokens_threshold``, or the resampling window
  when that is longer); a latent is dead at ``dead_tokens_threshold``, and eligible for resampling
  (``saepipe.training.resample``) at the window.
- AuxK (``AuxK``): the loss ``scale * sum ||e - e_hat||^2 / sum ||e - mean_batch(e)||^2`` of the
  residual ``e = x - x_hat`` (no gradient) reconstructed from the top-``k_aux`` (ReLU)
  pre-activations of the dead latents only, without ``b_dec``; ``scale = min(n_dead / k_aux, 1)``.
  It runs only while some latent is dead (and ``aux_coef > 0``).
- ``METRICS``: what a step reports, in order.

Data-parallel training (``saepipe.parallel.ranks``): each rank steps on its part of the global
batch. Everything a step divides by is global (``global_variance``, the global row count), so each
rank's loss, gradients and metrics are its *share* of the global ones and sum over the ranks to
exactly them; the steps all-sum the gradients, metric parts and fired counts in one message before
the update (``sum_over_ranks``), so every rank applies the identical update to identical state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import mlx.core as mx
import numpy as np

from saepipe.activations.sources import ActivationSource
from saepipe.parallel.ranks import Ranks
from saepipe.sae.config import SAEConfig
from saepipe.sae.sparse import decode_rows, topk
from saepipe.sae.topk import init_params

METRICS = ("loss", "fvu", "recon_mse", "aux_loss", "l1_loss", "l0", "grad_norm", "dead_fraction")
"""The metrics a step returns, in this order (float64 numpy array)."""

ADAM_BETAS = (0.9, 0.999)
"""Adam's decay rates of the first and second moment estimates."""

ADAM_EPS = 1e-8
"""Added to Adam's root second moment (the denominator) so an unused parameter does not divide by 0."""

VARIANCE_FLOOR = 1e-12
"""Floor of the batch variances FVU and AuxK divide by: a batch of identical rows has none."""

GRAD_NORM_EPS = 1e-12
"""Added to the gradient norm in the clipping factor ``clip / (norm + eps)``: a zero gradient is not 0/0."""

ROW_NORM_FLOOR = 1e-12
"""Floor of a decoder row's norm when renormalizing it: an all-zero row stays zero instead of NaN."""

GEOMETRIC_MEDIAN_ROWS = 16384
"""Training rows sampled for the geometric median that initialises ``b_dec``."""

ENCODER_SCALE_ROWS = 4096
"""Rows of that sample the encoder's initial scale is fitted on (``fitted_encoder_scale``)."""


class TrainState(NamedTuple):
    """Everything a training step updates (MLX arrays, as checkpoints hold them)."""

    params: dict[str, mx.array]
    """``W_enc`` (absent when tied), ``b_enc``, ``W_dec``, ``b_dec`` (see ``saepipe.sae.topk``)."""
    m: dict[str, mx.array]
    """Adam's first moments, by parameter."""
    v: dict[str, mx.array]
    """Adam's second moments, by parameter."""
    t: mx.array
    """Adam's step count (float32 scalar)."""
    counter: mx.array
    """(d_hidden,) int32 tokens since each latent last fired, saturating at the dead threshold."""


class StepRunner(Protocol):
    """A training step with its state: what ``fit_sae`` drives, whatever the kernels."""

    def load(self, state: TrainState) -> None:
        """Continue from ``state`` (e.g. after dead latents were resampled); the runner keeps copies."""
        ...

    def step(self, lr: float, x: mx.array, mean: mx.array, std: mx.array, n_dead: int) -> np.ndarray:
        """One update on the batch ``x`` (n, d_model); returns ``METRICS`` (float64). ``n_dead``:
        dead latents before the step."""
        ...

    def state(self) -> TrainState:
        """The current state (copies the runner will not write)."""
        ...


def batch_variance(x: mx.array) -> mx.array:
    """``sum ||x - mean_batch(x)||^2`` over the rows of ``x``, floored: what FVU (x the inputs) and
    AuxK (x the residual) divide by."""
    return mx.maximum(mx.square(x - x.mean(axis=0)).sum(), VARIANCE_FLOOR)


def global_rows(n_rows: int, ranks: Ranks) -> mx.array:
    """The number of rows of the global batch (int32 scalar) when each rank holds ``n_rows``."""
    return ranks.sum(mx.array(n_rows, dtype=mx.int32))


def global_variance(x: mx.array, ranks: Ranks, n_total: mx.array | None = None) -> mx.array:
    """``batch_variance`` of the global batch whose rows ``x`` are this rank's part (two passes, like
    ``batch_variance``: the global mean first); ``batch_variance(x)`` itself on a single process."""
    if not ranks.distributed:
        return batch_variance(x)
    n = (global_rows(x.shape[0], ranks) if n_total is None else n_total).astype(x.dtype)
    mean = ranks.sum(x.sum(axis=0)) / n
    return mx.maximum(ranks.sum(mx.square(x - mean).sum()), VARIANCE_FLOOR)


def rows_mean(per_row: mx.array, ranks: Ranks, n_total: mx.array | None) -> mx.array:
    """This rank's share of the global batch mean of ``per_row`` (its sum over the ranks is the mean);
    ``per_row.mean()`` on a single process."""
    if not ranks.distributed:
        return per_row.mean()
    return per_row.sum() / n_total.astype(per_row.dtype)


# --------------------------------------------------------------------------------------------------
# AuxK
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuxK:
    """The AuxK term's settings and the formulas every step computes it with (see the module docstring)."""

    k_aux: int
    """Dead latents used per row to reconstruct the residual."""
    coef: float
    """Weight of the AuxK loss in the total loss (``SAEConfig.aux_coef``)."""

    @classmethod
    def from_config(cls, config: SAEConfig, d_model: int, d_hidden: int) -> AuxK:
        """``k_aux`` from the config (None: d_model // 2), at most d_hidden."""
        k_aux = min(config.k_aux if config.k_aux is not None else d_model // 2, d_hidden)
        if k_aux < 1:
            raise ValueError(f"k_aux must be >= 1, got {k_aux}")
        return cls(k_aux, config.aux_coef)

    def active(self, n_dead: int) -> bool:
        """Whether a step with ``n_dead`` dead latents computes AuxK at all."""
        return self.coef > 0 and n_dead > 0

    def scale(self, n_dead: int) -> float:
        """``min(n_dead / k_aux, 1)``: a few dead latents get a proportionally smaller loss (sparsify's rule)."""
        return min(n_dead / self.k_aux, 1.0)

    @staticmethod
    def loss(residual_sse: Any, residual_var: Any, scale: Any) -> Any:
        """The AuxK loss from ``sum ||e_hat - e||^2`` and ``sum ||e - mean(e)||^2`` (floored)."""
        return scale * residual_sse / residual_var

    def residual_grad_scale(self, scale: Any, residual_var: Any) -> Any:
        """``d (coef * loss) / d e_hat = this * (e_hat - e)``."""
        return 2.0 * self.coef * scale / residual_var


# --------------------------------------------------------------------------------------------------
# The update
# --------------------------------------------------------------------------------------------------
def constrained_adam(params: dict, grads: dict, m: dict, v: dict, t: mx.array, lr: mx.array,
                     clip: float) -> tuple[dict, dict, dict, mx.array, mx.array]:
    """One TopK-SAE optimizer update (MLX): drop each decoder row's gradient component parallel to the
    row, clip the global gradient norm to ``clip`` (0: no clipping), bias-corrected Adam, renormalize
    the decoder rows to unit norm. Returns ``(params, m, v, t, grad_norm)``."""
    W = params["W_dec"]
    g = grads["W_dec"]
    grads = {**grads, "W_dec": g - (g * W).sum(axis=1, keepdims=True) * W}
    gnorm = mx.sqrt(sum(mx.square(gi).sum() for gi in grads.values()))
    if clip > 0:
        scale = mx.minimum(1.0, clip / (gnorm + GRAD_NORM_EPS))
        grads = {name: gi * scale for name, gi in grads.items()}
    t = t + 1
    b1, b2 = ADAM_BETAS
    c1, c2 = 1 - b1**t, 1 - b2**t
    new_params, new_m, new_v = {}, {}, {}
    for name, p in params.items():
        update = _adam_unit_rows if name == "W_dec" else _adam
        new_params[name], new_m[name], new_v[name] = update(p, m[name], v[name], grads[name], lr, c1, c2)
    return new_params, new_m, new_v, t, gnorm


def _adam(p, m, v, g, lr, c1, c2):
    b1, b2 = ADAM_BETAS
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * mx.square(g)
    return p - lr * (m / c1) / (mx.sqrt(v / c2) + ADAM_EPS), m, v


def _adam_unit_rows(p, m, v, g, lr, c1, c2):
    p, m, v = _adam(p, m, v, g, lr, c1, c2)
    return p / mx.maximum(mx.linalg.norm(p, axis=1, keepdims=True), ROW_NORM_FLOOR), m, v


def clip_scale(grad_norm: float, clip: float) -> float:
    """The factor the gradients are multiplied by so their global norm is at most ``clip`` (0: off)."""
    return min(1.0, clip / (grad_norm + GRAD_NORM_EPS)) if clip > 0 else 1.0


# --------------------------------------------------------------------------------------------------
# Dead counters
# --------------------------------------------------------------------------------------------------
def counter_cap(config: SAEConfig) -> int:
    """Where the dead counters saturate: ``dead_tokens_threshold``, or the resampling window
    (``resample_window``, when resampling is on) if that is longer, so both can be read off them."""
    cap = int(config.dead_tokens_threshold)
    if config.resample_every and config.resample_window is not None:
        cap = max(cap, int(config.resample_window))
    return cap


def fired_counts(indices: mx.array, values: mx.array, width: int) -> mx.array:
    """(width,) int32: how many rows each latent fired on (among the row's top-k with a positive value)."""
    return mx.zeros((width,), dtype=mx.int32).at[indices.reshape(-1)].add(
        (values > 0).reshape(-1).astype(mx.int32))


def count_since_fired(counter: Any, fired: Any, n_rows: int, cap: int) -> Any:
    """The counters after a batch of ``n_rows`` tokens: 0 where the latent fired, else ``n_rows``
    more, capped at ``cap`` (``counter_cap``). Works on MLX and on numpy arrays (the CPU step's)."""
    xp = np if isinstance(counter, np.ndarray) else mx
    return xp.where(fired > 0, 0, xp.minimum(counter + n_rows, cap))


def dead_fraction(counter: Any, threshold: int) -> Any:
    """Share of latents at the threshold (dead): an MLX float32 scalar for MLX counters, else a float."""
    if isinstance(counter, np.ndarray):
        return float((counter >= threshold).mean())
    return (counter >= threshold).astype(mx.float32).mean()


def update_dead_counter(counter: mx.array, indices: mx.array, values: mx.array,
                        threshold: int, cap: int | None = None) -> tuple[mx.array, mx.array]:
    """Counters after a batch whose top-k codes are ``(values, indices)`` (every row is one token),
    saturating at ``cap`` (default ``threshold``), and the fraction of latents now dead."""
    fired = fired_counts(indices, values, counter.shape[0])
    counter = count_since_fired(counter, fired, indices.size // indices.shape[-1], threshold if cap is None else cap)
    return counter, dead_fraction(counter, threshold)


def sum_over_ranks(ranks: Ranks, grads: dict[str, mx.array], scalars: list[mx.array], indices: mx.array,
                   values: mx.array, counter: mx.array, threshold: int, n_total: mx.array,
                   cap: int | None = None) -> tuple[dict[str, mx.array], list[mx.array], mx.array, mx.array]:
    """A data-parallel MLX step's one all-reduce: this rank's gradients, metric parts (its shares of
    the global ones) and fired counts summed over the ranks. Returns the global gradients and metric
    parts, and the dead counters after the global batch of ``n_total`` rows (saturating at ``cap``,
    default ``threshold``) with the dead fraction (``update_dead_counter`` of the whole batch)."""
    names = sorted(grads)  # the same order on every rank
    fired = fired_counts(indices, values, counter.shape[0])
    summed = ranks.sum_all([*(grads[n] for n in names), mx.stack(scalars), fired])
    counter = count_since_fired(counter, summed[-1], n_total, threshold if cap is None else cap)
    return dict(zip(names, summed, strict=False)), list(summed[-2]), counter, dead_fraction(counter, threshold)


def count_dead(counter: Any, threshold: int) -> int:
    """How many latents are dead."""
    return int((np.asarray(counter) >= threshold).sum())


# --------------------------------------------------------------------------------------------------
# The first state
# --------------------------------------------------------------------------------------------------
def geometric_median(x: np.ndarray, iters: int = 50, tol: float = 1e-6) -> np.ndarray:
    """Weiszfeld's algorithm on the rows of ``x`` (float64); ``tol``: relative change that stops it."""
    x = x.astype(np.float64)
    guess = x.mean(axis=0)
    for _ in range(iters):
        w = 1.0 / np.maximum(np.linalg.norm(x - guess, axis=1), 1e-8)  # a row at the guess: weight 1e8, not inf
        new = (w[:, None] * x).sum(axis=0) / w.sum()
        if np.linalg.norm(new - guess) <= tol * max(1.0, np.linalg.norm(guess)):
            return new
        guess = new
    return guess


ENCODER_SCALE_SHRINK = 0.85
"""The default init's factor on ``fitted_encoder_scale``: the least-squares scale of the first
reconstruction is a little above the scale that trains best (measured on the default run's
activations at 1 and 4 epochs; planted-dictionary recovery unchanged: docs/performance.md)."""


def fitted_encoder_scale(xc: np.ndarray, W_dec: mx.array, k: int) -> float:
    """The scale ``a`` of encoder = ``a`` x decoder transpose that best reconstructs the centred rows
    ``xc`` at init: the least-squares ``a`` of ``xc ~ a * r``, with ``r`` the decode of the top-k of
    ``ReLU(xc @ W_dec.T)`` (so ``a = sum <xc, r> / sum ||r||^2``; 1.0 when nothing fires).

    With unit decoder rows and encoder = decoder transpose (a = 1) the first code overshoots: the k
    chosen rows all correlate with x, so r's norm exceeds x's projection on it (a ~ 0.6-0.75 for
    d_model 64-576, k 6-32). Training then spends its first steps, and Adam's second-moment
    estimates, on shrinking every encoder row together (docs/performance.md, 2026-11-28)."""
    x = mx.array(np.asarray(xc, dtype=np.float32))
    codes = topk(mx.maximum(x @ W_dec.T, 0.0), k)
    r = decode_rows(codes.values, codes.indices, W_dec)
    rr = float(mx.square(r).sum())
    return float((x * r).sum()) / rr if rr > 0 else 1.0


def initial_state(source: ActivationSource, train_rows: np.ndarray, config: SAEConfig, d_model: int,
                  d_hidden: int, mean: mx.array, std: mx.array) -> TrainState:
    """Random unit decoder rows, ``b_dec`` = the geometric median of a sample of (normalized)
    training rows, encoder = a x decoder transpose (a = ``config.encoder_init_scale``, or
    ``ENCODER_SCALE_SHRINK`` x ``fitted_encoder_scale`` on the first ``ENCODER_SCALE_ROWS`` of the
    sample, centred on ``b_dec``),
    ``b_enc`` = 0; zero Adam moments and counters. Every step (reference, cpu, sparse) starts here."""
    params = init_params(d_model, d_hidden, config.tied_weights, config.seed)
    rng = np.random.default_rng([config.seed, 2])
    sample = np.sort(rng.choice(train_rows, size=min(len(train_rows), GEOMETRIC_MEDIAN_ROWS), replace=False))
    x = (source.take(sample) - np.asarray(mean)) / np.asarray(std)
    b_dec = geometric_median(x).astype(np.float32)
    params["b_dec"] = mx.array(b_dec)
    if not config.tied_weights:
        scale = config.encoder_init_scale
        if scale is None:
            scale = ENCODER_SCALE_SHRINK * fitted_encoder_scale(x[:ENCODER_SCALE_ROWS] - b_dec, params["W_dec"],
                                                                config.k)
        params["W_enc"] = params["W_dec"] * scale
    zeros = {n: mx.zeros_like(p) for n, p in params.items()}
    return TrainState(params, zeros, dict(zeros), mx.array(0.0), mx.zeros((d_hidden,), dtype=mx.int32))


__all__ = ["ADAM_BETAS", "ADAM_EPS", "ENCODER_SCALE_ROWS", "ENCODER_SCALE_SHRINK", "GEOMETRIC_MEDIAN_ROWS", "GRAD_NORM_EPS", "METRICS",
           "ROW_NORM_FLOOR", "VARIANCE_FLOOR", "AuxK", "StepRunner", "TrainState", "batch_variance", "clip_scale",
           "constrained_adam",
           "count_dead", "count_since_fired", "counter_cap", "dead_fraction", "fired_counts",
           "fitted_encoder_scale", "geometric_median", "global_rows", "global_variance", "initial_state",
           "rows_mean", "sum_over_ranks", "update_dead_counter"]
