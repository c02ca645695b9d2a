"""The reference training step: the loss written in plain MLX, differentiated by ``mx.value_and_grad``.

This is the definition the fast steps (``mlx_step``, ``cpu_step``) are tested against, so it is
written independently of them: dense codes, autograd, no hand-written gradients. It shares only
what ``saepipe.training.state`` defines for every step (the update, the dead counters, AuxK's
settings and formulas). The loss, per batch of normalized rows x (see ``saepipe.training.fit``):

    FVU  = sum ||x - x_hat||^2 / sum ||x - mean_batch(x)||^2
    loss = FVU + l1_coefficient * mean_rows(sum of kept values) + aux_coef * AuxK

Data-parallel (``ranks``): x is this rank's part of the global batch; the variances and the row
count are the global batch's, so the loss is this rank's share of the global loss and the
gradients, all-summed, are the global loss's (``saepipe.training.state``).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from saepipe.parallel.ranks import Ranks
from saepipe.sae.config import SAEConfig
from saepipe.sae.sparse import to_dense, topk
from saepipe.training.state import (
    AuxK,
    constrained_adam,
    counter_cap,
    global_rows,
    global_variance,
    rows_mean,
    sum_over_ranks,
    update_dead_counter,
)


def encode_select(
    xc: mx.array, W_enc: mx.array, b_enc: mx.array, k: int, dead: mx.array | None, k_aux: int
) -> tuple[mx.array, mx.array, mx.array | None, mx.array | None]:
    """Top-k code of centred inputs ``xc`` and, when ``dead`` (bool (d_hidden,)) is given, the
    top-``k_aux`` ReLU pre-activations among dead latents (live ones count as 0 and get no gradient).

    Returns (values, indices, aux_values, aux_indices); values are differentiable w.r.t. W_enc, b_enc.
    """
    pre = nn.relu(xc @ W_enc.T + b_enc)
    values, indices = topk(pre, k)
    if dead is None:
        return values, indices, None, None
    aux_values, aux_indices = topk(mx.where(dead, pre, 0.0), k_aux)
    return values, indices, aux_values, aux_indices


def decode(values: mx.array, indices: mx.array, W_dec: mx.array) -> mx.array:
    """sum_j values[:, j] * W_dec[indices[:, j]]: (n, d_model), differentiable w.r.t. values and W_dec."""
    return to_dense(values, indices, W_dec.shape[0]) @ W_dec


def loss_parts(params: dict, x: mx.array, dead: mx.array | None, aux_scale: mx.array, *,
               k: int, k_aux: int, aux_coef: float, l1_coef: float, tied: bool,
               ranks: Ranks | None = None, n_total: mx.array | None = None) -> tuple[mx.array, ...]:
    """``(loss, fvu, mse, aux, l1, l0, values, indices)`` of a batch of normalized rows ``x``;
    AuxK only when ``dead`` is given. With ``ranks`` (several), ``x`` is this rank's part of a global
    batch of ``n_total`` rows and the scalars are this rank's shares (they sum to the global ones)."""
    ranks = ranks or Ranks()
    W_enc = params["W_dec"] if tied else params["W_enc"]
    values, indices, aux_values, aux_indices = encode_select(
        x - params["b_dec"], W_enc, params["b_enc"], k, dead, k_aux)
    x_hat = decode(values, indices, params["W_dec"]) + params["b_dec"]
    e = x - x_hat
    sse = (e * e).sum()
    total_var = global_variance(x, ranks, n_total)
    fvu = sse / total_var
    l1 = rows_mean(values.sum(axis=-1), ranks, n_total)
    loss = fvu + l1_coef * l1 if l1_coef else fvu
    aux = mx.array(0.0)
    if dead is not None:
        e = mx.stop_gradient(e)
        e_hat = decode(aux_values, aux_indices, params["W_dec"])
        e_var = global_variance(e, ranks, n_total)
        aux = AuxK.loss(mx.square(e_hat - e).sum(), e_var, aux_scale)
        loss = loss + aux_coef * aux
    mse = sse / e.size if not ranks.distributed else sse / (n_total.astype(sse.dtype) * e.shape[-1])
    l0 = rows_mean((values > 0).sum(axis=-1).astype(mx.float32), ranks, n_total)
    return loss, fvu, mse, aux, l1, l0, values, indices


def make_reference_step(config: SAEConfig, d_hidden: int, k_aux: int, with_aux: bool,
                        ranks: Ranks | None = None) -> Callable:
    """A compiled training step; ``with_aux`` adds the AuxK term (used while latents are dead).

    ``step(params, m, v, t, lr, x, mean, std, counter, aux_scale) -> (params, m, v, t, counter,
    metrics)`` with ``metrics`` the ``METRICS`` of ``saepipe.training.state`` (an MLX array).
    ``ranks`` (several): ``x`` is this rank's part of the global batch; the gradients, metrics and
    fired counts are all-summed, so every rank returns the same state and metrics.
    """
    tied = config.tied_weights
    clip = float(config.gradient_clip)
    threshold = int(config.dead_tokens_threshold)
    cap = counter_cap(config)
    ranks = ranks or Ranks()

    def loss_only(params, x, dead, aux_scale, n_total):
        return loss_parts(params, x, dead if with_aux else None, aux_scale, k=config.k, k_aux=k_aux,
                          aux_coef=config.aux_coef, l1_coef=config.l1_coefficient, tied=tied,
                          ranks=ranks, n_total=n_total)

    grad_fn = mx.value_and_grad(loss_only)

    def step(params, m, v, t, lr, x, mean, std, counter, aux_scale):
        x = (x - mean) / std
        dead = counter >= threshold
        n_total = global_rows(x.shape[0], ranks) if ranks.distributed else None
        (loss, fvu, mse, aux, l1, l0, values, indices), grads = grad_fn(params, x, dead, aux_scale, n_total)
        if ranks.distributed:
            grads, (loss, fvu, mse, aux, l1, l0), counter, dead_fraction = sum_over_ranks(
                ranks, grads, [loss, fvu, mse, aux, l1, l0], indices, values, counter, threshold, n_total, cap)
        else:
            counter, dead_fraction = update_dead_counter(counter, indices, values, threshold, cap)
        new_params, new_m, new_v, t, gnorm = constrained_adam(params, grads, m, v, t, lr, clip)
        metrics = mx.stack([loss, fvu, mse, aux, l1, l0, gnorm, dead_fraction])
        return new_params, new_m, new_v, t, counter, metrics

    return mx.compile(step)


__all__ = ["decode", "encode_select", "loss_parts", "make_reference_step"]
