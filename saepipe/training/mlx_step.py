"""The TopK-SAE training step in pure MLX with hand-written sparse gradients: the step on a GPU.

``fit_sae``'s ``kernels="sparse"`` (what ``auto`` picks when MLX computes on a GPU). On a CPU,
``saepipe.training.cpu_step`` is faster (numba kernels on every core), so this step is the GPU path
and the pure-MLX formulation its tests pin against the reference. Why these formulations (compare
them with ``benchmarks/mlx_step.py`` on a new machine):

- Top-k and decoding use ``saepipe.sae.sparse``: a two-stage exact top-k that reads the
  pre-activations once, and a decoder that gathers the k active rows of ``W_dec`` in small chunks.
- The gradient w.r.t. the kept values is the same gather contracted with the output gradient
  (``decode_values_grad``).
- Weight gradients ``sum_r coef[r, j] * rows[r]`` for active latents only (``rows_grad``): a
  scatter-add runs single-threaded in MLX on a CPU, so the default builds the sparse code as a dense
  (n, d_hidden) matrix and runs one BLAS matmul; ``method="scatter"`` is the scatter-add alternative.
- AuxK touches only the dead latents: their columns of the pre-activations are gathered into an
  (n, capacity) block (capacity = a static bucket >= the number of dead latents) and the AuxK
  decoder is a small dense matmul over that block, so its cost scales with the number of dead
  latents instead of a second top-k over all of d_hidden.

Weight layout (as ``saepipe.sae.topk``): ``W_enc`` and ``W_dec`` are both (d_hidden, d_model),
``pre = (x - b_dec) @ W_enc.T + b_enc``; row j of ``W_dec`` is latent j's decoder direction. The loss
is the reference's (``saepipe.training.reference``); the update, dead counters and AuxK settings
are ``saepipe.training.state``'s. Data-parallel (``ranks``) as the reference: global variances and
row count in the loss, gradients, metrics and fired counts all-summed before the update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import mlx.core as mx  # saepipe/__init__ (imported first) has loaded the fast BLAS

from saepipe.parallel.ranks import Ranks
from saepipe.sae.config import SAEConfig
from saepipe.sae.sparse import decode_rows, row_chunks, to_dense, topk_indices
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

AUX_CAPACITY_MIN = 64
"""Smallest column bucket of AuxK: fewer buckets (compiled variants) for a handful of dead latents."""


class LossParts(NamedTuple):
    """Outputs of ``value_and_grads``, in the order of the reference's ``loss_parts``."""

    loss: mx.array
    fvu: mx.array
    mse: mx.array
    aux: mx.array
    l1: mx.array
    l0: mx.array
    values: mx.array
    """(n, k) post-ReLU values of the kept latents."""
    indices: mx.array
    """(n, k) their latent indices."""


# --------------------------------------------------------------------------------------------------
# Gradients of the sparse decoder
# --------------------------------------------------------------------------------------------------
def decode_values_grad(g: mx.array, indices: mx.array, W_dec: mx.array, chunk: int | None = None) -> mx.array:
    """``g[r] . W_dec[indices[r, j]]`` (n, k): the gradient of ``decode_rows`` w.r.t. its values."""
    n, k = indices.shape
    parts = [(W_dec[indices[s:e]] @ g[s:e, :, None]).squeeze(-1) for s, e in row_chunks(n, k, chunk)]
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)


def rows_grad(coef: mx.array, indices: mx.array, rows: mx.array, width: int, method: str = "dense") -> mx.array:
    """``out[j] = sum_{r, m: indices[r, m] = j} coef[r, m] * rows[r]``: (width, d) from (n, k) x (n, d).

    The weight gradient of both ``W_dec`` (coef = values, rows = output gradient) and ``W_enc``
    (coef = pre-activation gradient, rows = centred inputs); only rows of latents that fired are
    non-zero. ``method="dense"``: the code as a dense (n, width) matrix, then one BLAS matmul
    (multi-threaded); ``"scatter"``: a scatter-add of the n*k scaled rows (single-threaded).
    """
    if method == "dense":
        return to_dense(coef, indices, width).T @ rows
    if method == "scatter":
        n, k = coef.shape
        out = mx.zeros((width, rows.shape[1]), dtype=rows.dtype)
        for s, e in row_chunks(n, k):
            upd = (coef[s:e, :, None] * rows[s:e, None, :]).reshape(-1, rows.shape[1])
            out = out.at[indices[s:e].reshape(-1)].add(upd)
        return out
    raise ValueError(f"rows_grad: method must be 'dense' or 'scatter', not {method!r}")


@mx.custom_function
def sparse_decode(values: mx.array, indices: mx.array, W_dec: mx.array, b_dec: mx.array) -> mx.array:
    """``x_hat = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec`` (n, d_model), from k active latents.

    ``W_dec`` is (d_hidden, d_model). Differentiable (custom VJP) w.r.t. values, W_dec and b_dec with
    the sparse kernels above; ``indices`` get a zero cotangent.
    """
    return decode_rows(values, indices, W_dec) + b_dec


@sparse_decode.vjp
def _sparse_decode_vjp(primals, cotangent, output):
    values, indices, W_dec, _ = primals
    g = cotangent
    return (decode_values_grad(g, indices, W_dec).astype(values.dtype), mx.zeros_like(indices),
            rows_grad(values, indices, g, W_dec.shape[0]), g.sum(axis=0))


# --------------------------------------------------------------------------------------------------
# The whole loss and its gradients, written out
# --------------------------------------------------------------------------------------------------
def aux_capacity(n_dead: int, d_hidden: int, minimum: int = AUX_CAPACITY_MIN) -> int:
    """Static column bucket for ``n_dead`` dead latents: the next power of two (>= minimum), <= d_hidden.

    Compiled steps retrace once per bucket, so at most ~log2(d_hidden) variants ever exist.
    """
    if n_dead <= 0:
        return 0
    return min(d_hidden, max(minimum, 1 << (int(n_dead) - 1).bit_length()))


def value_and_grads(
    params: dict[str, mx.array],
    x: mx.array,
    *,
    k: int,
    dead: mx.array | None = None,
    aux_scale: mx.array | float = 1.0,
    k_aux: int = 256,
    capacity: int | None = None,
    aux_coef: float = 1 / 32,
    l1_coef: float = 0.0,
    tied: bool = False,
    method: str = "dense",
    ranks: Ranks | None = None,
    n_total: mx.array | None = None,
) -> tuple[LossParts, dict[str, mx.array]]:
    """Loss parts and exact gradients of the reference TopK loss, with sparse backward kernels.

    ``params``: ``W_enc`` (absent when ``tied``), ``b_enc``, ``W_dec``, ``b_dec`` as in ``saepipe.sae.topk``.
    ``x``: (n, d_model) normalized inputs. ``dead``: bool (d_hidden,) mask of dead latents, or None to
    skip AuxK; ``capacity`` (static, >= the number of dead latents, see ``aux_capacity``; default
    d_hidden) bounds the columns AuxK touches. ``aux_scale``: ``AuxK.scale(n_dead)``.
    ``method``: see ``rows_grad``. Same values and gradients as ``mx.value_and_grad`` of the dense
    reference (up to float32 rounding), without materialising dense gradients of unused latents.
    ``ranks`` (several): ``x`` is this rank's part of a global batch of ``n_total`` rows; the loss
    parts and gradients are this rank's shares (they sum over the ranks to the global ones).
    """
    ranks = ranks or Ranks()
    W_dec, b_dec, b_enc = params["W_dec"], params["b_dec"], params["b_enc"]
    W_enc = W_dec if tied else params["W_enc"]
    n, d_hidden = x.shape[0], W_dec.shape[0]
    xc = x - b_dec
    pre = mx.addmm(b_enc, xc, W_enc.T)
    indices = topk_indices(pre, k)
    pv = mx.take_along_axis(pre, indices, axis=-1)
    values = mx.maximum(pv, 0)
    e = x - (decode_rows(values, indices, W_dec) + b_dec)
    sse = mx.square(e).sum()
    total_var = global_variance(x, ranks, n_total)
    fvu = sse / total_var
    l1 = rows_mean(values.sum(axis=-1), ranks, n_total)
    loss = fvu + l1_coef * l1 if l1_coef else fvu

    g = (-2.0 / total_var) * e  # d loss / d x_hat
    gv = decode_values_grad(g, indices, W_dec)
    if l1_coef:
        gv = gv + l1_coef / (n if not ranks.distributed else n_total.astype(gv.dtype))
    gpre = mx.where(pv > 0, gv, 0.0)
    dW_dec = rows_grad(values, indices, g, d_hidden, method)
    dW_enc = rows_grad(gpre, indices, xc, d_hidden, method)
    db_enc = mx.zeros((d_hidden,), dtype=x.dtype).at[indices.reshape(-1)].add(gpre.reshape(-1))

    aux = mx.array(0.0)
    if dead is not None:
        aux, (didx, a_grad_W_dec, a_grad_W_enc, a_grad_b_enc) = _auxk(
            pre, xc, mx.stop_gradient(e), W_dec, dead, aux_scale, AuxK(k_aux, aux_coef), capacity or d_hidden,
            global_variance(mx.stop_gradient(e), ranks, n_total))
        loss = loss + aux_coef * aux
        dW_dec = dW_dec.at[didx].add(a_grad_W_dec)
        dW_enc = dW_enc.at[didx].add(a_grad_W_enc)
        db_enc = db_enc.at[didx].add(a_grad_b_enc)

    db_dec = g.sum(axis=0) - db_enc @ W_enc  # x_hat's bias + the encoder input's -b_dec
    grads = {"b_enc": db_enc, "b_dec": db_dec}
    if tied:
        grads["W_dec"] = dW_dec + dW_enc
    else:
        grads["W_dec"], grads["W_enc"] = dW_dec, dW_enc
    l0 = rows_mean((values > 0).sum(axis=-1).astype(mx.float32), ranks, n_total)
    mse = sse / e.size if not ranks.distributed else sse / (n_total.astype(sse.dtype) * e.shape[-1])
    parts = LossParts(loss, fvu, mse, aux, l1, l0, values, indices)
    return parts, grads


def _auxk(pre, xc, e, W_dec, dead, aux_scale, auxk: AuxK, capacity, e_var):
    """AuxK over the dead latents only (``e_var``: the residual's batch variance); returns
    (aux, (columns, dW_dec rows, dW_enc rows, db_enc))."""
    d_hidden = W_dec.shape[0]
    capacity = min(int(capacity), d_hidden)
    # The `capacity` columns with dead first (argpartition of 0 = dead, 1 = live), then the validity mask.
    didx = mx.argpartition(mx.logical_not(dead).astype(mx.int32), kth=capacity - 1)[:capacity] if capacity < d_hidden \
        else mx.arange(d_hidden, dtype=mx.uint32)
    valid = dead[didx]
    a = mx.where(valid, mx.maximum(mx.take(pre, didx, axis=1), 0.0), 0.0)  # (n, capacity)
    if capacity > auxk.k_aux:  # keep the k_aux largest per row (live columns are 0, as in the reference)
        keep = topk_indices(a, auxk.k_aux)
        a = to_dense(mx.take_along_axis(a, keep, axis=-1), keep, capacity)
    Wd = W_dec[didx]
    r = a @ Wd - e
    aux = AuxK.loss(mx.square(r).sum(), e_var, aux_scale)
    ga = auxk.residual_grad_scale(aux_scale, e_var) * r  # d (aux_coef * aux) / d e_hat
    da = mx.where(a > 0, ga @ Wd.T, 0.0)  # (n, capacity)
    return aux, (didx, a.T @ ga, da.T @ xc, da.sum(axis=0))


# --------------------------------------------------------------------------------------------------
# A whole training step (same signature and math as the reference step)
# --------------------------------------------------------------------------------------------------
def make_train_step(config: SAEConfig, d_hidden: int, k_aux: int, capacity: int = 0,
                    method: str = "dense", compile: bool = True, ranks: Ranks | None = None) -> Callable:
    """Compiled TopK-SAE step on the sparse kernels: ``value_and_grads`` + ``constrained_adam`` + dead
    counters, the contract of ``saepipe.training.reference.make_reference_step``.

    ``step(params, m, v, t, lr, x, mean, std, counter, aux_scale) -> (params, m, v, t, counter,
    metrics)``. ``capacity``: 0 for no AuxK, else ``aux_capacity(n_dead, d_hidden)`` for the step's
    dead count (build one step per bucket). ``method``: see ``rows_grad``. ``ranks`` (several):
    ``x`` is this rank's part of the global batch; gradients, metrics and fired counts are all-summed.
    """
    clip = float(config.gradient_clip)
    threshold = int(config.dead_tokens_threshold)
    cap = counter_cap(config)
    ranks = ranks or Ranks()

    def step(params, m, v, t, lr, x, mean, std, counter, aux_scale):
        x = (x - mean) / std
        dead = counter >= threshold if capacity else None
        n_total = global_rows(x.shape[0], ranks) if ranks.distributed else None
        parts, grads = value_and_grads(
            params, x, k=config.k, dead=dead, aux_scale=aux_scale, k_aux=k_aux, capacity=capacity,
            aux_coef=config.aux_coef, l1_coef=config.l1_coefficient, tied=config.tied_weights,
            method=method, ranks=ranks, n_total=n_total)
        scalars = [parts.loss, parts.fvu, parts.mse, parts.aux, parts.l1, parts.l0]
        if ranks.distributed:
            grads, scalars, counter, dead_fraction = sum_over_ranks(
                ranks, grads, scalars, parts.indices, parts.values, counter, threshold, n_total, cap)
        else:
            counter, dead_fraction = update_dead_counter(counter, parts.indices, parts.values, threshold, cap)
        new_params, new_m, new_v, t, gnorm = constrained_adam(params, grads, m, v, t, lr, clip)
        metrics = mx.stack([*scalars, gnorm, dead_fraction])
        return new_params, new_m, new_v, t, counter, metrics

    return mx.compile(step) if compile else step


__all__ = ["AUX_CAPACITY_MIN", "LossParts", "aux_capacity", "decode_values_grad", "make_train_step",
           "rows_grad", "sparse_decode", "value_and_grads"]
