"""Fast TopK-SAE training-step kernels in pure MLX: the training step on a GPU (``fit_sae``'s
``kernels="sparse"``). On a CPU ``fit_sae`` runs ``saepipe.training.cpu_step`` instead (multi-threaded numba
kernels, ~4x faster than these there: benchmarks/train.py); these stay the pure-MLX path and its tests.

They were tuned for MLX on a small CPU first:

Why these formulations (measured on the 2-core Linux box, batch 4096, d_model 576, d_hidden 9216;
see ``benchmarks/sparse_ops.py`` for the side-by-side numbers):

- Only MLX's float32 matmul is multi-threaded (OpenBLAS); its CPU argpartition, gather, scatter and
  elementwise kernels run on one core, and any intermediate of more than a few MB costs page faults
  on top (a 300 MB gather output is ~2.5x slower than the same gather done in 64-row chunks).
- ``topk``: ``argpartition`` over 9216 columns costs ~3x the encoder matmul. A two-stage selection
  (max of column blocks -> the k best blocks -> argpartition over their k*block entries) reads the
  pre-activations once and partitions ~2*sqrt(k*d_hidden) entries per row instead of d_hidden:
  ~4-5x faster, and still exact (see ``topk_indices``).
- Decoding ``sum_j v_j W_dec[i_j]`` gathers the k active rows of ``W_dec`` in small row chunks
  (cache-resident) and contracts them with a batched matmul; the gradient w.r.t. the values is
  the same gather contracted with the output gradient. Both beat a dense masked matmul here.
- Weight gradients ``sum_r coef[r, j] * rows[r]`` for active latents only (``rows_grad``): MLX's
  scatter-add is single-threaded (~6 ns per element), so the default builds the sparse code as a
  dense (n, d_hidden) matrix and runs one multi-threaded BLAS matmul; ``method="scatter"`` is the
  scatter-add alternative (compare both with the benchmark on a new machine).
- AuxK touches only the dead latents: their columns of the pre-activations are gathered into an
  (n, capacity) block (capacity = a static bucket >= the number of dead latents) and the AuxK
  decoder is a small dense matmul over that block, so its cost scales with the number of dead
  latents instead of a second top-k over all of d_hidden.
- ``make_train_step`` splits the batch over one CPU stream per core (each stream is one thread) with
  single-threaded BLAS, so the one-core kernels above run on every core; batch statistics (FVU's
  and AuxK's variances) are merged exactly from the parts, and the W_enc / W_dec updates run on
  different streams (~1.3x on a loaded 2-core machine, more when it is quiet).

Weight layout (same as ``saepipe.sae.topk``): ``W_enc`` and ``W_dec`` are both (d_hidden, d_model),
``pre = (x - b_dec) @ W_enc.T + b_enc``; row j of ``W_dec`` is latent j's decoder direction. The loss
is the one documented in ``saepipe.training.fit``: FVU + l1_coef * L1 + aux_coef * AuxK.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import mlx.core as mx  # saepipe/__init__ (imported first) has loaded the fast BLAS

from saepipe.sae.config import SAEConfig

#: Rows per chunk times k: the gathered (rows, k, d_model) block stays a few MB (cache-resident).
_DECODE_ROWS_TIMES_K = 1024


class TopK(NamedTuple):
    values: mx.array
    """(n, k) the selected entries (as given: apply ReLU yourself when the input was not ReLU'd)."""
    indices: mx.array
    """(n, k) uint32 column indices, distinct within a row, in no particular order."""


class LossParts(NamedTuple):
    """Outputs of ``value_and_grads`` in the order ``saepipe.training.fit``'s loss function returns them."""

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
# Top-k selection
# --------------------------------------------------------------------------------------------------
def default_block(width: int, k: int) -> int:
    """Block size for ``topk_indices``: a divisor of ``width`` near 1.4 * sqrt(width / k).

    ~sqrt(width / k) balances the two partitions (width / block and k * block entries); a bit larger
    measured faster (the block-max pass is cheaper than partitioning), and a divisor avoids padding.
    """
    target = 1.4 * math.sqrt(width / k)
    divisors = [b for b in range(2, int(2 * target) + 2) if width % b == 0 and b >= target / 2]
    return min(divisors, key=lambda b: abs(b - target)) if divisors else max(1, round(target))


def topk_indices(pre: mx.array, k: int, block: int | None = None) -> mx.array:
    """Indices (n, k) of the k largest entries of each row of ``pre`` (n, width): exactly k, distinct.

    Two stages: the maxima of ``block``-wide column blocks, the k best blocks by maximum
    (argpartition over width/block entries), then argpartition over those blocks' k*block entries.
    Exact: if t is the k-th largest block maximum, every row has >= k entries >= t inside the chosen
    blocks and every entry above t lies in a chosen block, so the k largest of the chosen blocks are
    k largest of the row. Ties at the threshold are broken by argpartition (never more than k kept).
    Falls back to one argpartition when blocks would not pay off (small widths).
    """
    n, width = pre.shape
    if not 1 <= k <= width:
        raise ValueError(f"topk: k must be in 1..{width} (the row width), got {k}")
    block = default_block(width, k) if block is None else int(block)
    n_blocks = -(-width // block)
    if block <= 1 or n_blocks <= k or k * block >= width // 2:
        return mx.argpartition(pre, kth=width - k, axis=-1)[:, width - k:]
    if n_blocks * block != width:  # pad with -inf so every block is full
        pad = mx.full((n, n_blocks * block - width), -mx.inf, dtype=pre.dtype)
        pre = mx.concatenate([pre, pad], axis=1)
    blocks = pre.reshape(n, n_blocks, block)
    best = mx.argpartition(blocks.max(axis=-1), kth=n_blocks - k, axis=-1)[:, n_blocks - k:]  # (n, k)
    cand = mx.take_along_axis(blocks, best[:, :, None], axis=1).reshape(n, k * block)
    pos = mx.argpartition(cand, kth=k * block - k, axis=-1)[:, k * block - k:]  # (n, k)
    chosen = mx.take_along_axis(best, pos // block, axis=1)
    return (chosen * block + pos % block).astype(mx.uint32)


def topk(pre: mx.array, k: int, block: int | None = None) -> TopK:
    """The k largest entries of each row (exactly k; ties never keep more): ``TopK(values, indices)``.

    Indices carry no gradient; values are differentiable w.r.t. ``pre`` (a take_along_axis).
    """
    indices = mx.stop_gradient(topk_indices(mx.stop_gradient(pre), k, block))
    return TopK(mx.take_along_axis(pre, indices, axis=-1), indices)


# --------------------------------------------------------------------------------------------------
# Sparse decoder and its gradients
# --------------------------------------------------------------------------------------------------
def _row_chunks(n: int, k: int, chunk: int | None) -> list[tuple[int, int]]:
    size = chunk or max(1, _DECODE_ROWS_TIMES_K // k)
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def decode_rows(values: mx.array, indices: mx.array, W_dec: mx.array, chunk: int | None = None) -> mx.array:
    """``sum_j values[r, j] * W_dec[indices[r, j]]`` (n, d_model), no bias: gather + batched matmul.

    Works in row chunks so the gathered (rows, k, d_model) block stays cache-resident.
    """
    n, k = values.shape
    parts = [(values[s:e, None, :] @ W_dec[indices[s:e]]).squeeze(1) for s, e in _row_chunks(n, k, chunk)]
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)


def decode_values_grad(g: mx.array, indices: mx.array, W_dec: mx.array, chunk: int | None = None) -> mx.array:
    """``g[r] . W_dec[indices[r, j]]`` (n, k): the gradient of ``decode_rows`` w.r.t. its values."""
    n, k = indices.shape
    parts = [(W_dec[indices[s:e]] @ g[s:e, :, None]).squeeze(-1) for s, e in _row_chunks(n, k, chunk)]
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)


def to_dense(values: mx.array, indices: mx.array, width: int) -> mx.array:
    """Scatter an (n, k) sparse code into an (n, width) array of zeros."""
    zeros = mx.zeros((values.shape[0], width), dtype=values.dtype)
    return mx.put_along_axis(zeros, indices, values, axis=-1)


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
        for s, e in _row_chunks(n, k, None):
            upd = (coef[s:e, :, None] * rows[s:e, None, :]).reshape(-1, rows.shape[1])
            out = out.at[indices[s:e].reshape(-1)].add(upd)
        return out
    raise ValueError(f"rows_grad: method must be 'dense' or 'scatter', not {method!r}")


def _sparse_decode_impl(values, indices, W_dec, b_dec):
    return decode_rows(values, indices, W_dec) + b_dec


@mx.custom_function
def sparse_decode(values: mx.array, indices: mx.array, W_dec: mx.array, b_dec: mx.array) -> mx.array:
    """``x_hat = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec`` (n, d_model), from k active latents.

    ``W_dec`` is (d_hidden, d_model). Differentiable (custom VJP) w.r.t. values, W_dec and b_dec with
    the sparse kernels above; ``indices`` get a zero cotangent.
    """
    return _sparse_decode_impl(values, indices, W_dec, b_dec)


@sparse_decode.vjp
def _sparse_decode_vjp(primals, cotangent, output):
    values, indices, W_dec, _ = primals
    g = cotangent
    return (decode_values_grad(g, indices, W_dec).astype(values.dtype), mx.zeros_like(indices),
            rows_grad(values, indices, g, W_dec.shape[0]), g.sum(axis=0))


# --------------------------------------------------------------------------------------------------
# The whole loss and its gradients, written out
# --------------------------------------------------------------------------------------------------
def aux_capacity(n_dead: int, d_hidden: int, minimum: int = 64) -> int:
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
) -> tuple[LossParts, dict[str, mx.array]]:
    """Loss parts and exact gradients of ``saepipe.training.fit``'s TopK loss, with sparse backward kernels.

    ``params``: ``W_enc`` (absent when ``tied``), ``b_enc``, ``W_dec``, ``b_dec`` as in ``saepipe.sae.topk``.
    ``x``: (n, d_model) normalized inputs. ``dead``: bool (d_hidden,) mask of dead latents, or None to
    skip AuxK; ``capacity`` (static, >= the number of dead latents, see ``aux_capacity``; default
    d_hidden) bounds the columns AuxK touches. ``aux_scale``: min(n_dead / k_aux, 1).
    ``method``: see ``rows_grad``. Same values and gradients as ``mx.value_and_grad`` of the dense
    reference (up to float32 rounding), without materialising dense gradients of unused latents.
    """
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
    total_var = mx.maximum(mx.square(x - x.mean(axis=0)).sum(), 1e-12)
    fvu = sse / total_var
    l1 = values.sum(axis=-1).mean()
    loss = fvu + l1_coef * l1 if l1_coef else fvu

    g = (-2.0 / total_var) * e  # d loss / d x_hat
    gv = decode_values_grad(g, indices, W_dec)
    if l1_coef:
        gv = gv + l1_coef / n
    gpre = mx.where(pv > 0, gv, 0.0)
    dW_dec = rows_grad(values, indices, g, d_hidden, method)
    dW_enc = rows_grad(gpre, indices, xc, d_hidden, method)
    db_enc = mx.zeros((d_hidden,), dtype=x.dtype).at[indices.reshape(-1)].add(gpre.reshape(-1))

    aux = mx.array(0.0)
    if dead is not None:
        aux, (didx, a_grad_W_dec, a_grad_W_enc, a_grad_b_enc) = _auxk(
            pre, xc, mx.stop_gradient(e), W_dec, dead, aux_scale, k_aux,
            capacity or d_hidden, aux_coef)
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
    l0 = (values > 0).sum(axis=-1).astype(mx.float32).mean()
    parts = LossParts(loss, fvu, sse / e.size, aux, l1, l0, values, indices)
    return parts, grads


def _auxk(pre, xc, e, W_dec, dead, aux_scale, k_aux, capacity, aux_coef):
    """AuxK over the dead latents only; returns (aux, (columns, dW_dec rows, dW_enc rows, db_enc))."""
    d_hidden = W_dec.shape[0]
    capacity = min(int(capacity), d_hidden)
    # The `capacity` columns with dead first (argpartition of 0 = dead, 1 = live), then the validity mask.
    didx = mx.argpartition(mx.logical_not(dead).astype(mx.int32), kth=capacity - 1)[:capacity] if capacity < d_hidden \
        else mx.arange(d_hidden, dtype=mx.uint32)
    valid = dead[didx]
    a = mx.where(valid, mx.maximum(mx.take(pre, didx, axis=1), 0.0), 0.0)  # (n, capacity)
    if capacity > k_aux:  # keep the k_aux largest per row (live columns are 0, as in the reference)
        keep = topk_indices(a, k_aux)
        a = to_dense(mx.take_along_axis(a, keep, axis=-1), keep, capacity)
    Wd = W_dec[didx]
    r = a @ Wd - e
    e_var = mx.maximum(mx.square(e - e.mean(axis=0)).sum(), 1e-12)
    aux = aux_scale * mx.square(r).sum() / e_var
    ga = (2.0 * aux_coef * aux_scale / e_var) * r  # d (aux_coef * aux) / d e_hat
    da = mx.where(a > 0, ga @ Wd.T, 0.0)  # (n, capacity)
    return aux, (didx, a.T @ ga, da.T @ xc, da.sum(axis=0))


# --------------------------------------------------------------------------------------------------
# A whole training step (same signature and math as saepipe.training.fit's compiled step)
# --------------------------------------------------------------------------------------------------
_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


def make_train_step(config: SAEConfig, d_hidden: int, k_aux: int, capacity: int = 0,
                    method: str = "dense", compile: bool = True, parts: int | None = None) -> Callable:
    """Compiled TopK-SAE step on the sparse kernels: ``value_and_grads`` + Adam + decoder unit norm.

    ``step(params, m, v, t, lr, x, mean, std, counter, aux_scale) -> (params, m, v, t, counter,
    metrics)`` with ``metrics = [loss, fvu, mse, aux, l1, l0, grad_norm, dead_fraction]``: the same
    contract as ``saepipe.training.fit._make_step`` (parallel decoder-gradient component removed, global-norm
    clipping, bias-corrected Adam, rows of W_dec renormalized, per-latent dead counters).
    ``capacity``: 0 for no AuxK, else ``aux_capacity(n_dead, d_hidden)`` for the step's dead count
    (build one step per bucket). ``method``: see ``rows_grad``. ``parts``: split the batch (and the
    parameter update) over this many per-core CPU streams with single-threaded BLAS (``None``: one
    per core on CPU, see ``saepipe.lm.forward``); a split step returns evaluated arrays.
    """
    if parts is None:
        from saepipe.lm.forward import _parallel_parts

        parts = _parallel_parts(config.batch_size)
    if parts >= 2:
        return _make_split_step(config, d_hidden, k_aux, capacity, method, compile, parts)
    clip = float(config.gradient_clip)
    threshold = int(config.dead_tokens_threshold)

    def step(params, m, v, t, lr, x, mean, std, counter, aux_scale):
        x = (x - mean) / std
        dead = counter >= threshold if capacity else None
        parts, grads = value_and_grads(
            params, x, k=config.k, dead=dead, aux_scale=aux_scale, k_aux=k_aux, capacity=capacity,
            aux_coef=config.aux_coef, l1_coef=config.l1_coefficient, tied=config.tied_weights,
            method=method)
        new_params, new_m, new_v, t, gnorm = constrained_adam(params, grads, m, v, t, lr, clip)
        counter, dead_fraction = update_dead_counter(counter, parts.indices, parts.values, threshold)
        metrics = mx.stack([parts.loss, parts.fvu, parts.mse, parts.aux, parts.l1, parts.l0, gnorm,
                            dead_fraction])
        return new_params, new_m, new_v, t, counter, metrics

    return mx.compile(step) if compile else step


def constrained_adam(params: dict, grads: dict, m: dict, v: dict, t: mx.array, lr: mx.array,
                     clip: float) -> tuple[dict, dict, dict, mx.array, mx.array]:
    """One TopK-SAE optimizer update: drop each decoder row's gradient component parallel to the row,
    clip the global gradient norm to ``clip`` (0: no clipping), bias-corrected Adam, renormalize the
    decoder rows to unit norm. Returns ``(params, m, v, t, grad_norm)``."""
    W = params["W_dec"]
    g = grads["W_dec"]
    grads = {**grads, "W_dec": g - (g * W).sum(axis=1, keepdims=True) * W}
    gnorm = mx.sqrt(sum(mx.square(gi).sum() for gi in grads.values()))
    if clip > 0:
        scale = mx.minimum(1.0, clip / (gnorm + 1e-12))
        grads = {name: gi * scale for name, gi in grads.items()}
    t = t + 1
    b1, b2 = _BETAS
    c1, c2 = 1 - b1**t, 1 - b2**t
    new_params, new_m, new_v = {}, {}, {}
    for name, p in params.items():
        update = _adam_unit_rows if name == "W_dec" else _adam
        new_params[name], new_m[name], new_v[name] = update(p, m[name], v[name], grads[name], lr, c1, c2)
    return new_params, new_m, new_v, t, gnorm


def update_dead_counter(counter: mx.array, indices: mx.array, values: mx.array,
                        threshold: int) -> tuple[mx.array, mx.array]:
    """Tokens since each latent last fired (capped at ``threshold``), and the fraction now dead.

    A latent fires on a row when it is among the row's top-k with a positive value; every row of the
    batch counts as one token."""
    fired = mx.zeros(counter.shape, dtype=mx.int32).at[indices.reshape(-1)].add(
        (values > 0).reshape(-1).astype(mx.int32))
    return _count_since_fired(counter, fired, indices.size // indices.shape[-1], threshold)


def _count_since_fired(counter: mx.array, fired: mx.array, n_rows: int,
                       threshold: int) -> tuple[mx.array, mx.array]:
    counter = mx.where(fired > 0, 0, mx.minimum(counter + n_rows, threshold))
    return counter, (counter >= threshold).astype(mx.float32).mean()


# --------------------------------------------------------------------------------------------------
# The same step split over per-core CPU streams
# --------------------------------------------------------------------------------------------------
# MLX runs its CPU elementwise, reduction, argpartition, gather and scatter kernels on one core; only
# BLAS is multi-threaded. Each row part of the batch runs forward + backward on its own stream (one
# thread each) with single-threaded BLAS, so all of the step's work uses every core. Batch-level
# statistics stay exact: the variance of x and of the residual are merged from per-part (mean, M2)
# (Chan et al.), and AuxK's gradient, linear in 1 / var(e), is scaled after the parts are summed.
# The update is split by parameter: W_enc (+ b_enc) on one stream, W_dec (+ b_dec) on the other.

def _chan_m2(means: list[mx.array], m2s: list[mx.array], counts: list[int]) -> mx.array:
    """Sum of squared deviations from the pooled mean, from per-part column means and M2 sums."""
    n = sum(counts)
    pooled = sum(c * mu for c, mu in zip(counts, means, strict=True)) / n
    between = sum(c * mx.square(mu - pooled).sum() for c, mu in zip(counts, means, strict=True))
    return mx.maximum(sum(m2s) + between, 1e-12)


def _part_forward(params, x, mean, std, *, k, tied):
    x = (x - mean) / std
    W_dec, b_dec = params["W_dec"], params["b_dec"]
    W_enc = W_dec if tied else params["W_enc"]
    xc = x - b_dec
    pre = mx.addmm(params["b_enc"], xc, W_enc.T)
    indices = topk_indices(pre, k)
    pv = mx.take_along_axis(pre, indices, axis=-1)
    values = mx.maximum(pv, 0)
    e = x - (decode_rows(values, indices, W_dec) + b_dec)
    x_mean = x.mean(axis=0)
    e_mean = e.mean(axis=0)
    sums = mx.stack([mx.square(e).sum(), values.sum(), (values > 0).sum().astype(mx.float32),
                     mx.square(x - x_mean).sum(), mx.square(e - e_mean).sum()])
    fired = mx.zeros((W_dec.shape[0],), dtype=mx.int32).at[indices.reshape(-1)].add(
        (values > 0).reshape(-1).astype(mx.int32))
    return xc, pre, indices, pv, values, e, x_mean, e_mean, sums, fired


def _part_backward(W_dec, xc, indices, pv, values, e, gscale, l1_grad, *, method):
    g = gscale * e  # d loss / d x_hat
    gv = decode_values_grad(g, indices, W_dec)
    if l1_grad is not None:  # l1_coef / (rows of the whole batch)
        gv = gv + l1_grad
    gpre = mx.where(pv > 0, gv, 0.0)
    d_hidden = W_dec.shape[0]
    dW_dec = rows_grad(values, indices, g, d_hidden, method)
    dW_enc = rows_grad(gpre, indices, xc, d_hidden, method)
    db_enc = mx.zeros((d_hidden,), dtype=xc.dtype).at[indices.reshape(-1)].add(gpre.reshape(-1))
    return dW_dec, dW_enc, db_enc, g.sum(axis=0)


def _part_auxk(W_dec, pre, xc, e, didx, valid, coef, *, k_aux):
    """AuxK of one part with the gradient scale ``coef`` (the 1 / var(e) factor applied later)."""
    capacity = didx.shape[0]
    a = mx.where(valid, mx.maximum(mx.take(pre, didx, axis=1), 0.0), 0.0)  # (n, capacity)
    if capacity > k_aux:
        keep = topk_indices(a, k_aux)
        a = to_dense(mx.take_along_axis(a, keep, axis=-1), keep, capacity)
    Wd = W_dec[didx]
    r = a @ Wd - e
    ga = coef * r
    da = mx.where(a > 0, ga @ Wd.T, 0.0)
    return mx.square(r).sum(), a.T @ ga, da.T @ xc, da.sum(axis=0)


def _adam(p, m, v, g, lr, c1, c2):
    b1, b2 = _BETAS
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * mx.square(g)
    return p - lr * (m / c1) / (mx.sqrt(v / c2) + _ADAM_EPS), m, v


def _adam_unit_rows(p, m, v, g, lr, c1, c2):
    p, m, v = _adam(p, m, v, g, lr, c1, c2)
    return p / mx.maximum(mx.linalg.norm(p, axis=1, keepdims=True), 1e-12), m, v


def _make_split_step(config: SAEConfig, d_hidden: int, k_aux: int, capacity: int, method: str,
                     compile: bool, parts: int) -> Callable:
    from saepipe.lm.forward import _cpu_streams
    from saepipe.runtime import blas_threads as _blas_threads

    b1, b2 = _BETAS
    clip = float(config.gradient_clip)
    threshold = int(config.dead_tokens_threshold)
    tied, l1_coef, aux_coef = config.tied_weights, float(config.l1_coefficient), float(config.aux_coef)
    streams = _cpu_streams(parts)

    def per_stream(fn):  # compiled functions keep the stream they were traced on: one per stream
        return [mx.compile(fn) if compile else fn for _ in streams]

    fwd = per_stream(lambda params, x, mean, std: _part_forward(params, x, mean, std, k=config.k, tied=tied))
    bwd = per_stream(lambda W_dec, xc, indices, pv, values, e, gscale, l1_grad: _part_backward(
        W_dec, xc, indices, pv, values, e, gscale, l1_grad, method=method))
    auxk = per_stream(lambda W_dec, pre, xc, e, didx, valid, coef: _part_auxk(
        W_dec, pre, xc, e, didx, valid, coef, k_aux=k_aux))
    adam = per_stream(_adam)
    adam_rows = per_stream(_adam_unit_rows)
    # parameter -> stream of its update (the two big matrices on different streams)
    owner = {"W_dec": 0, "b_dec": 0, "W_enc": 1 % parts, "b_enc": 1 % parts}

    def step(params, m, v, t, lr, x, mean, std, counter, aux_scale):
        n = x.shape[0]
        used = streams[:max(1, min(parts, n))]
        bounds = [round(i * n / len(used)) for i in range(len(used) + 1)]
        counts = [bounds[i + 1] - bounds[i] for i in range(len(used))]
        W_dec = params["W_dec"]
        W_enc = W_dec if tied else params["W_enc"]
        outs = []
        for i, s in enumerate(used):
            with mx.stream(s):
                outs.append(fwd[i](params, x[bounds[i]:bounds[i + 1]], mean, std))
        total_var = _chan_m2([o[6] for o in outs], [o[8][3] for o in outs], counts)
        gscale = -2.0 / total_var
        l1_grad = mx.array(l1_coef / n) if l1_coef else None
        if capacity:
            dead = counter >= threshold
            didx = mx.argpartition(mx.logical_not(dead).astype(mx.int32), kth=capacity - 1)[:capacity] \
                if capacity < d_hidden else mx.arange(d_hidden, dtype=mx.uint32)
            valid = dead[didx]
            aux_grad_coef = (2.0 * aux_coef) * aux_scale
        grads_p, aux_p = [], []
        for i, s in enumerate(used):
            xc, pre, indices, pv, values, e = outs[i][:6]
            with mx.stream(s):
                grads_p.append(bwd[i](W_dec, xc, indices, pv, values, e, gscale, l1_grad))
                if capacity:
                    aux_p.append(auxk[i](W_dec, pre, xc, e, didx, valid, aux_grad_coef))
        sums = sum(o[8] for o in outs)
        fvu = sums[0] / total_var
        l1 = sums[1] / n
        loss = fvu + l1_coef * l1 if l1_coef else fvu
        aux = mx.array(0.0)
        if capacity:
            e_var = _chan_m2([o[7] for o in outs], [o[8][4] for o in outs], counts)
            aux = aux_scale * sum(a[0] for a in aux_p) / e_var
            loss = loss + aux_coef * aux
        db_enc = sum(gp[2] for gp in grads_p)
        if capacity:
            db_enc = db_enc.at[didx].add(sum(a[3] for a in aux_p) / e_var)
        grads = {"b_enc": db_enc}
        with mx.stream(streams[0]):
            gW_dec = sum(gp[0] for gp in grads_p)
            if capacity:
                gW_dec = gW_dec.at[didx].add(sum(a[1] for a in aux_p) / e_var)
            grads["b_dec"] = sum(gp[3] for gp in grads_p) - db_enc @ W_enc
        with mx.stream(streams[owner["W_enc"]]):
            gW_enc = sum(gp[1] for gp in grads_p)
            if capacity:
                gW_enc = gW_enc.at[didx].add(sum(a[2] for a in aux_p) / e_var)
        if tied:
            with mx.stream(streams[0]):
                gW_dec = gW_dec + gW_enc
        else:
            grads["W_enc"] = gW_enc
        with mx.stream(streams[0]):
            grads["W_dec"] = gW_dec - (gW_dec * W_dec).sum(axis=1, keepdims=True) * W_dec
        sq = []
        for name, gi in grads.items():
            with mx.stream(streams[owner[name]]):
                sq.append(mx.square(gi).sum())
        gnorm = mx.sqrt(sum(sq))
        scale = mx.minimum(1.0, clip / (gnorm + 1e-12)) if clip > 0 else None
        t = t + 1
        c1, c2 = 1 - b1**t, 1 - b2**t
        new_params, new_m, new_v = {}, {}, {}
        for name, p in params.items():
            i = owner[name]
            with mx.stream(streams[i]):
                gi = grads[name] * scale if scale is not None else grads[name]
                fn = adam_rows[i] if name == "W_dec" else adam[i]
                new_params[name], new_m[name], new_v[name] = fn(p, m[name], v[name], gi, lr, c1, c2)
        counter, dead_fraction = _count_since_fired(counter, sum(o[9] for o in outs), n, threshold)
        metrics = mx.stack([loss, fvu, sums[0] / (n * x.shape[1]), aux, l1, sums[2] / n, gnorm,
                            dead_fraction])
        out = (new_params, new_m, new_v, t, counter, metrics)
        with _blas_threads.single_threaded():  # two single-threaded GEMMs at once beat one 2-thread GEMM
            mx.eval(out)
        return out

    return step

__all__ = [
    "LossParts",
    "TopK",
    "aux_capacity",
    "decode_rows",
    "decode_values_grad",
    "default_block",
    "make_train_step",
    "rows_grad",
    "sparse_decode",
    "to_dense",
    "topk",
    "topk_indices",
    "value_and_grads",
]
