"""The TopK-SAE training step on a CPU: MLX for the encoder matmul, ``saepipe.training.cpu_kernels`` for the rest.

Same loss, gradients and update as the reference step (``saepipe.training.reference``; the update,
dead counters and AuxK are ``saepipe.training.state``'s), organised for a CPU where only the matmul
is multi-threaded in MLX:

1. ``x = (x - mean) / std``, ``xc = x - b_dec`` (a kernel), then MLX (OpenBLAS, all cores):
   ``pre = xc @ W_enc.T`` (``b_enc`` is added by the top-k kernel).
2. numba kernels on zero-copy views of those arrays: top-k, sparse decode and residual, value
   gradients, AuxK over the dead latents only (small dense matmuls), weight gradients of the active
   latents, global-norm clipping, Adam with the decoder rows renormalized, dead counters.

The step is stateful: ``CpuStep`` owns its parameters and Adam moments as MLX arrays that the
kernels update in place through numpy views (copying the whole state each step would cost more
than the top-k), and hands out copies with ``state()``. Those arrays and the big per-step
buffers start on a cache line (``cpu_kernels.aligned_empty``): the row gathers run faster on
aligned rows.

Data-parallel (``ranks`` with several ranks; see ``saepipe.training.state``): ``x`` is this rank's
part of the global batch. Three exchanges a step make every rank's update the one-process update
of the whole batch: the column sums and sum of squares of the normalized rows (the global variance
FVU divides by, and the global row count) before the gradients; the residual's column sums and
squared error (AuxK's variance, the FVU) before AuxK; and one all-reduce of the gradient buffers
of ``latent_grads``, ``db_enc``, ``db_dec``, the fired counts and the AuxK loss before
``adam_rows``, whose global norm (for clipping) is taken from the summed gradients.
"""

from __future__ import annotations

import mlx.core as mx  # saepipe/__init__ (imported first) has loaded the fast BLAS
import numpy as np

from saepipe.parallel.ranks import Ranks
from saepipe.sae.config import SAEConfig
from saepipe.training import cpu_kernels as ck
from saepipe.training.cpu_kernels import CACHE_LINE, aligned_empty
from saepipe.training.state import (
    ADAM_BETAS,
    ADAM_EPS,
    ROW_NORM_FLOOR,
    VARIANCE_FLOOR,
    AuxK,
    TrainState,
    clip_scale,
    count_since_fired,
    counter_cap,
    dead_fraction,
)


def available() -> bool:
    """Whether this step applies: MLX computes on the CPU (on a GPU the MLX kernels are the fast path)."""
    return mx.default_device() == mx.cpu


def aligned_mlx_copy(a: mx.array) -> tuple[mx.array, np.ndarray]:
    """A private, cache-line-aligned copy of ``a`` as an MLX array and a numpy view of the same
    memory: the kernels update the view in place and MLX's matmul reads the array."""
    values = np.asarray(a)
    pad = CACHE_LINE // values.itemsize
    flat = mx.array(np.zeros(values.size + pad, values.dtype))
    mx.eval(flat)
    start = (-np.asarray(flat).ctypes.data % CACHE_LINE) // values.itemsize
    owned = flat[start:start + values.size].reshape(values.shape)  # a view: MLX slices share memory
    mx.eval(owned)
    view = np.asarray(owned)
    view[...] = values
    return owned, view


class CpuStep:
    """Stateful TopK-SAE training step (see the module docstring).

    ``step(lr, x, mean, std, n_dead)`` runs one update on the batch ``x`` (n, d_model) and returns
    the ``METRICS`` of ``saepipe.training.state`` (float64 numpy): a ``StepRunner``. ``n_dead``: dead
    latents before the step (AuxK runs when ``AuxK.active(n_dead)``). ``ranks``: see the module
    docstring (default: a single process).
    """

    def __init__(self, config: SAEConfig, d_hidden: int, k_aux: int, state: TrainState,
                 ranks: Ranks | None = None) -> None:
        self.config, self.d_hidden, self.k_aux = config, d_hidden, k_aux
        self.ranks = ranks or Ranks()
        self.auxk = AuxK(k_aux, config.aux_coef)
        self.lanes = ck.lanes_for(d_hidden, config.k)
        self.load(state)

    # ---- state ------------------------------------------------------------------------------
    def load(self, state: TrainState) -> None:
        """Take private copies of ``state`` (the caller's arrays are never written)."""
        self._mx, self._np = {}, {}
        for group in ("params", "m", "v"):
            owned = {name: aligned_mlx_copy(a) for name, a in getattr(state, group).items()}
            self._mx[group] = {name: pair[0] for name, pair in owned.items()}
            self._np[group] = {name: pair[1] for name, pair in owned.items()}
        self.t = float(np.asarray(state.t))
        self.counter = np.array(state.counter, dtype=np.int64)
        self._xc: tuple[mx.array, np.ndarray] | None = None  # the matmul's input, reused across steps

    def _centered_input(self, shape: tuple[int, int]) -> tuple[mx.array, np.ndarray]:
        """An aligned (n, d) buffer the kernels write and MLX's matmul reads (no copy per step)."""
        if self._xc is None or self._xc[1].shape != shape:
            self._xc = aligned_mlx_copy(mx.zeros(shape, mx.float32))
        return self._xc

    def state(self) -> TrainState:
        """Copies of the current parameters, Adam moments, step count and dead counters."""
        copy = {group: {name: mx.array(a) for name, a in arrays.items()} for group, arrays in self._np.items()}
        return TrainState(copy["params"], copy["m"], copy["v"], mx.array(self.t, dtype=mx.float32),
                         mx.array(self.counter.astype(np.int32)))

    # ---- one step ---------------------------------------------------------------------------
    def step(self, lr: float, x: mx.array, mean: mx.array, std: mx.array, n_dead: int) -> np.ndarray:
        cfg, p = self.config, self._np["params"]
        W_dec, b_dec, b_enc = p["W_dec"], p["b_dec"], p["b_enc"]
        tied = cfg.tied_weights
        W_enc = W_dec if tied else p["W_enc"]
        x = np.asarray(x, dtype=np.float32)
        n, d = x.shape
        xn = aligned_empty((n, d))
        xc_mx, xc = self._centered_input((n, d))
        x_sums, x_squares = ck.standardize(x, np.asarray(mean, np.float32), np.asarray(std, np.float32),
                                           b_dec, xn, xc)
        ranks, n_total = self.ranks, n
        if ranks.distributed:  # the global batch's moments and size
            x_sums, x_squares, total = ranks.sum64(x_sums, x_squares, n)
            x_squares, n_total = float(x_squares), round(float(total))
        live = self._mx["params"]
        pre = xc_mx @ (live["W_dec"] if tied else live["W_enc"]).T  # b_enc: added by top-k
        mx.eval(pre)
        pre = np.asarray(pre)
        k = cfg.k

        aux_on = self.auxk.active(n_dead)
        dead = np.flatnonzero(self.counter >= cfg.dead_tokens_threshold).astype(np.int32) if aux_on \
            else np.empty(0, np.int32)
        pv = np.empty((n, k), np.float32)
        idx = np.empty((n, k), np.int32)
        a = np.empty((n, dead.size), np.float32)  # dead latents' ReLU pre-activations, for AuxK
        ck.topk_rows(pre, b_enc, k, self.lanes, pv, idx, dead, a)
        total_var = max(x_squares - float(x_sums @ x_sums) / n_total, VARIANCE_FLOOR)  # sum |x - mean|^2
        gscale = np.float32(-2.0 / total_var)
        l1_coef = float(cfg.l1_coefficient)
        e = aligned_empty((n, d))
        sse_rows = np.empty(n, np.float32)
        e_sums = ck.decode_residual(xn, b_dec, W_dec, idx, pv, e, sse_rows)
        sse = float(sse_rows.sum(dtype=np.float64))
        l1_sum, l0_sum = float(np.maximum(pv, 0).sum(dtype=np.float64)), float((pv > 0).sum())
        all_e_sums = e_sums
        if ranks.distributed:  # the global residual's moments (and the code's sums, for the metrics)
            all_e_sums, sse, l1_sum, l0_sum = ranks.sum64(e_sums, sse, l1_sum, l0_sum)
            sse, l1_sum, l0_sum = float(sse), float(l1_sum), float(l0_sum)

        aux, aux_parts = 0.0, None
        if aux_on:
            e_var = max(sse - float(all_e_sums @ all_e_sums) / n_total, VARIANCE_FLOOR)
            aux, aux_parts = self._auxk(dead, a, xc, e, e_var, W_dec, self.auxk.scale(n_dead))

        grads = self._latent_grads(idx, pv, e, xc, gscale, np.float32(l1_coef / n_total), W_dec, aux_parts)
        dW_dec, dW_enc, db_enc, fired, sq = grads
        db_dec = gscale * e_sums.astype(np.float32) - db_enc @ W_enc
        if ranks.distributed:  # this rank's shares of the gradients (and AuxK) -> the global batch's
            dW_dec, dW_enc, db_enc, db_dec, fired, aux, sq = self._sum_grads(dW_dec, dW_enc, db_enc, db_dec,
                                                                             fired, aux)
        gnorm = float(np.sqrt(sq + float(db_enc @ db_enc) + float(db_dec @ db_dec)))
        scale = clip_scale(gnorm, float(cfg.gradient_clip))
        self._adam(lr, scale, {"W_dec": dW_dec, "W_enc": dW_enc, "b_enc": db_enc, "b_dec": db_dec})

        threshold = int(cfg.dead_tokens_threshold)
        self.counter = count_since_fired(self.counter, fired, n_total, counter_cap(cfg))
        fvu = sse / total_var
        l1 = l1_sum / n_total
        loss = fvu + l1_coef * l1 + cfg.aux_coef * aux
        return np.array([loss, fvu, sse / (n_total * d), aux, l1, l0_sum / n_total, gnorm,
                         dead_fraction(self.counter, threshold)])

    def _sum_grads(self, dW_dec, dW_enc, db_enc, db_dec, fired, aux):
        """The gradients, fired counts and AuxK loss summed over the ranks (one all-reduce), and the
        summed weight gradients' squared norm (what ``latent_grads`` returns for one process's)."""
        parts = [dW_dec, db_enc, db_dec.astype(np.float32), fired, np.array([aux], np.float32)]
        if dW_enc is not None:
            parts.append(dW_enc)
        summed = self.ranks.sum_numpy_all(parts)
        dW_dec, db_enc, db_dec, fired, aux_sum = summed[:5]
        dW_enc = summed[5] if dW_enc is not None else None
        sq = sum(float(np.einsum("ij,ij->i", g, g).sum(dtype=np.float64)) for g in (dW_dec, dW_enc) if g is not None)
        return dW_dec, dW_enc, db_enc, db_dec, fired, float(aux_sum[0]), sq

    def _auxk(self, dead, a, xc, e, e_var, W_dec, aux_scale):
        """AuxK over the dead latents: loss and its gradient rows (columns, dW_dec, dW_enc, db_enc).

        Dense over the dead columns only: ``a`` (n, n_dead) holds their ReLU pre-activations; all
        but each row's k_aux largest are zeroed here (live latents count as 0, as in the reference)."""
        ck.keep_top_k(a, self.k_aux)
        Wd = W_dec[dead]
        r = a @ Wd  # becomes d (aux_coef * aux) / d e_hat, from aux = aux_scale * |a Wd - e|^2 / var(e):
        aux_sse = ck.subtract_sum_sq_scale(r, e, np.float32(self.auxk.residual_grad_scale(aux_scale, e_var)))
        aux = AuxK.loss(aux_sse, e_var, aux_scale)
        da = r @ Wd.T
        da_sums = ck.zero_where_not_positive(da, a)
        return aux, (dead, a.T @ r, da.T @ xc, da_sums.astype(np.float32))

    def _latent_grads(self, idx, pv, e, xc, gscale, l1_grad, W_dec, aux_parts):
        """Gradients of the active latents (``cpu_kernels.latent_grads``) with AuxK's rows added."""
        h, d = W_dec.shape
        slot = np.full(h, -1, np.int64)
        if aux_parts is None:
            aux_dec = aux_enc = np.zeros((1, d), np.float32)
            aux_b = np.zeros(1, np.float32)
        else:
            dead, aux_dec, aux_enc, aux_b = aux_parts
            slot[dead] = np.arange(dead.size)
        tied = self.config.tied_weights
        dW_dec = aligned_empty((h, d))
        out = ck.LatentGrads(dW_dec=dW_dec, dW_enc=dW_dec if tied else aligned_empty((h, d)),
                             db_enc=np.empty(h, np.float32), fired=np.empty(h, np.int64),
                             sq_dec=np.empty(h, np.float32), sq_enc=np.empty(h, np.float32),
                             gpre=np.empty(idx.shape, np.float32))
        ck.latent_grads(ck.group_by_latent(idx, h), pv, e, xc, gscale, l1_grad, W_dec, tied,
                        (slot, aux_dec, aux_enc, aux_b), out)
        sq = float(out.sq_dec.sum(dtype=np.float64) + out.sq_enc.sum(dtype=np.float64))
        return out.dW_dec, (None if tied else out.dW_enc), out.db_enc, out.fired, sq

    def _adam(self, lr: float, scale: float, grads: dict[str, np.ndarray | None]) -> None:
        self.t += 1
        b1, b2 = ADAM_BETAS
        c1, c2 = np.float32(1 - b1**self.t), np.float32(1 - b2**self.t)
        f32 = np.float32
        for name, p in self._np["params"].items():
            g = grads[name]
            rows = p if p.ndim == 2 else p.reshape(1, -1)
            as_rows = (lambda a, like=rows: a.reshape(like.shape))  # noqa: E731
            ck.adam_rows(rows, as_rows(self._np["m"][name]), as_rows(self._np["v"][name]), as_rows(g),
                         f32(lr), c1, c2, f32(scale), f32(b1), f32(b2), f32(ADAM_EPS), name == "W_dec", f32(ROW_NORM_FLOOR))


__all__ = ["CpuStep", "aligned_mlx_copy", "available"]
