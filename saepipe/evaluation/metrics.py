"""SAE evaluation metrics, each defined once, as streaming float64 accumulators.

Every accumulator has ``update(batch...)`` (returns self), ``merge(other)`` (a new accumulator equal
to having seen both streams) and ``result()``. Results do not depend on how the rows were split into
batches (up to float64 rounding).

Notation: x is an activation row (d_model), x_hat its SAE reconstruction, N the number of rows over
the whole eval set, z the latent code of a row (d_hidden).

Reconstruction (``ReconstructionStats``):

- MSE = sum_rows ||x - x_hat||^2 / (N * d_model)                       (mean over elements)
- FVU = sum_rows ||x - x_hat||^2 / sum_rows ||x - mean(x)||^2, mean(x) over the whole eval set
- explained_variance = 1 - FVU
- cosine = (1/N) sum_rows x . x_hat / max(||x|| ||x_hat||, eps)          (0 when either is 0)
- rel_bias (relative reconstruction bias, Rajamanoharan et al. 2024 "Gated SAEs", the shrinkage
  measure also reported by Gao et al. 2024): gamma = argmin_g E||x_hat / g - x||^2
  = sum ||x_hat||^2 / sum x_hat . x.  gamma = 1: unbiased; gamma < 1: shrinkage (too small).

Sparsity (``SparsityStats``), a latent is active on a token when its code value is non-zero:

- L0 = (1/N) sum_rows #{j : z_j != 0}
- density_j = #{rows where z_j != 0} / N
- dead_fraction = #{j : density_j = 0} / d_hidden   (never fired on the whole eval set)
- ``density_histogram``: histogram of log10(density_j) over the latents that fired.

Spliced model (``SplicedLossStats``), p = softmax(logits) of the next token:

- CE_v = mean over scored positions t of -log p_v(token_{t+1})   for v in clean / spliced (SAE
  reconstruction substituted) / zero_ablated (component set to 0) / mean_ablated (component set to
  its eval-set mean)
- ce_loss_score = (CE_zero - CE_spliced) / (CE_zero - CE_clean); ce_loss_score_mean_ablated uses
  CE_mean in place of CE_zero. 1: as good as the clean model; 0: as bad as ablating.
- KL_v = mean over scored positions of KL(p_clean || p_v) = sum_w p_clean(w) (log p_clean(w) - log p_v(w))
- kl_score = 1 - KL_spliced / KL_zero; kl_score_mean_ablated uses KL_mean.

Scored positions are the rows extraction stores (``saepipe.activations.extract.make_batches``'s ``keep``: inside
the text, not padding, and with skip_special_tokens not BOS/special). KL is averaged over all of them;
CE also needs a next token, so ``next_token_mask`` drops the last position of each text.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import numpy as np

from saepipe.lm import fastmath

COSINE_NORM_FLOOR = 1e-12
"""Floor of ||x|| ||x_hat|| in the cosine: a zero row or reconstruction gives cosine 0, not NaN."""


def _f64(a: object) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _ratio(num: float, den: float) -> float:
    """num / den, NaN when the denominator is 0 (the metric is undefined)."""
    return float(num / den) if den != 0 else float("nan")


# ---------------------------------------------------------------------------------------- masks


def next_token_mask(positions: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(B, T) bool: scored positions that also have a next token inside the text (for CE)."""
    has_next = np.arange(positions.shape[1])[None, :] + 1 < np.asarray(lengths)[:, None]
    return positions & has_next


# ------------------------------------------------------------------------------ reconstruction


class ReconstructionMetrics(NamedTuple):
    mse: float
    fvu: float
    explained_variance: float
    cosine: float
    rel_bias: float
    n_rows: int


class ReconstructionStats:
    """Streaming MSE / FVU / explained variance / cosine / relative bias over (x, x_hat) batches.

    The total variance sum ||x - mean(x)||^2 is tracked per dimension as a running mean and sum of
    squared deviations (Chan et al.'s parallel update) in float64, so a large mean does not cancel
    the variance away and any split into batches gives the one-shot value.
    """

    def __init__(self) -> None:
        self.n_rows = 0
        self.mean: np.ndarray | None = None  # (d,) running mean of x
        self.m2: np.ndarray | None = None  # (d,) sum of squared deviations from the running mean
        self.sse = 0.0  # sum ||x - x_hat||^2
        self.sum_cos = 0.0
        self.sum_dot = 0.0  # sum x_hat . x
        self.sum_hat2 = 0.0  # sum ||x_hat||^2

    def update(self, x: object, x_hat: object) -> ReconstructionStats:
        """Add a batch of rows: ``x`` and ``x_hat`` are (n, d) arrays (numpy or MLX)."""
        x, x_hat = _f64(x), _f64(x_hat)
        if x.ndim != 2 or x.shape != x_hat.shape:
            raise ValueError(f"x and x_hat must be equal (n, d) arrays, got {x.shape} and {x_hat.shape}")
        if x.shape[0] == 0:
            return self
        err = x - x_hat
        dot = np.einsum("nd,nd->n", x, x_hat)
        norms = np.linalg.norm(x, axis=1) * np.linalg.norm(x_hat, axis=1)
        batch_mean = x.mean(axis=0)
        batch = ReconstructionStats()
        batch.n_rows = x.shape[0]
        batch.mean = batch_mean
        batch.m2 = ((x - batch_mean) ** 2).sum(axis=0)
        batch.sse = float(np.einsum("nd,nd->", err, err))
        batch.sum_cos = float((dot / np.maximum(norms, COSINE_NORM_FLOOR)).sum())
        batch.sum_dot = float(dot.sum())
        batch.sum_hat2 = float(np.einsum("nd,nd->", x_hat, x_hat))
        self._absorb(batch)
        return self

    def merge(self, other: ReconstructionStats) -> ReconstructionStats:
        """A new accumulator holding both streams."""
        out = ReconstructionStats()
        out._absorb(self)
        out._absorb(other)
        return out

    def _absorb(self, other: ReconstructionStats) -> None:
        if other.n_rows == 0:
            return
        if self.n_rows == 0:
            self.mean, self.m2 = other.mean.copy(), other.m2.copy()
        else:
            if other.mean.shape != self.mean.shape:
                raise ValueError(f"d_model mismatch: {self.mean.shape[0]} vs {other.mean.shape[0]}")
            n = self.n_rows + other.n_rows
            delta = other.mean - self.mean
            self.m2 = self.m2 + other.m2 + delta**2 * (self.n_rows * other.n_rows / n)
            self.mean = self.mean + delta * (other.n_rows / n)
        self.n_rows += other.n_rows
        self.sse += other.sse
        self.sum_cos += other.sum_cos
        self.sum_dot += other.sum_dot
        self.sum_hat2 += other.sum_hat2

    def result(self) -> ReconstructionMetrics:
        if self.n_rows == 0:
            raise ValueError("no rows were seen: cannot compute reconstruction metrics")
        d = self.mean.shape[0]
        fvu = _ratio(self.sse, float(self.m2.sum()))
        return ReconstructionMetrics(
            mse=self.sse / (self.n_rows * d),
            fvu=fvu,
            explained_variance=1.0 - fvu,
            cosine=self.sum_cos / self.n_rows,
            rel_bias=_ratio(self.sum_hat2, self.sum_dot),
            n_rows=self.n_rows,
        )


def reconstruction_metrics(x: object, x_hat: object) -> ReconstructionMetrics:
    """One-shot ``ReconstructionStats`` on a single (n, d) batch."""
    return ReconstructionStats().update(x, x_hat).result()


# ------------------------------------------------------------------------------------ sparsity


class SparsityMetrics(NamedTuple):
    l0: float
    dead_fraction: float
    density: np.ndarray
    """(d_hidden,) float64: fraction of tokens each latent fired on."""
    n_tokens: int


class SparsityStats:
    """Streaming L0, per-latent firing counts, density and dead fraction."""

    def __init__(self, d_hidden: int) -> None:
        if d_hidden < 1:
            raise ValueError(f"d_hidden must be >= 1, got {d_hidden}")
        self.d_hidden = d_hidden
        self.counts = np.zeros(d_hidden, dtype=np.int64)
        self.n_tokens = 0
        self.n_active = 0

    def update(self, codes: object) -> SparsityStats:
        """Add dense latent codes, an (n, d_hidden) array; non-zero entries are active."""
        active = np.asarray(codes) != 0
        if active.ndim != 2 or active.shape[1] != self.d_hidden:
            raise ValueError(f"codes must be (n, {self.d_hidden}), got shape {active.shape}")
        self.counts += active.sum(axis=0)
        self.n_tokens += active.shape[0]
        self.n_active += int(active.sum())
        return self

    def update_topk(self, values: object, indices: object) -> SparsityStats:
        """Add sparse codes: (n, k) ``values`` at (n, k) latent ``indices`` (distinct per row)."""
        values, indices = np.asarray(values), np.asarray(indices)
        if values.shape != indices.shape or values.ndim != 2:
            raise ValueError(f"values and indices must be equal (n, k) arrays, got {values.shape} and {indices.shape}")
        fired = indices[values != 0].astype(np.int64)
        if fired.size and (fired.min() < 0 or fired.max() >= self.d_hidden):
            raise ValueError(f"latent index out of range 0..{self.d_hidden - 1}")
        self.counts += np.bincount(fired, minlength=self.d_hidden)
        self.n_tokens += values.shape[0]
        self.n_active += int(fired.size)
        return self

    def merge(self, other: SparsityStats) -> SparsityStats:
        if other.d_hidden != self.d_hidden:
            raise ValueError(f"d_hidden mismatch: {self.d_hidden} vs {other.d_hidden}")
        out = SparsityStats(self.d_hidden)
        out.counts = self.counts + other.counts
        out.n_tokens = self.n_tokens + other.n_tokens
        out.n_active = self.n_active + other.n_active
        return out

    def result(self) -> SparsityMetrics:
        if self.n_tokens == 0:
            raise ValueError("no tokens were seen: cannot compute sparsity metrics")
        return SparsityMetrics(
            l0=self.n_active / self.n_tokens,
            dead_fraction=float((self.counts == 0).mean()),
            density=self.counts / self.n_tokens,
            n_tokens=self.n_tokens,
        )


class DensityHistogram(NamedTuple):
    edges: np.ndarray
    """Bin edges in log10(density)."""
    counts: np.ndarray
    """Latents per bin (only latents that fired)."""
    n_dead: int
    """Latents with density 0 (log10 undefined; reported apart)."""


def density_histogram(density: np.ndarray, bins: int = 50, low: float | None = None) -> DensityHistogram:
    """Histogram of log10(density) of the live latents over [``low``, 0] (default ``low``: the
    smallest seen, rounded down); densities below ``low`` are counted in the first bin."""
    density = np.asarray(density, dtype=np.float64)
    live = density[density > 0]
    logd = np.log10(live)
    lo = low if low is not None else (float(np.floor(logd.min())) if live.size else -1.0)
    lo = min(lo, -1e-9)
    counts, edges = np.histogram(np.clip(logd, lo, 0.0), bins=bins, range=(lo, 0.0))
    return DensityHistogram(edges, counts, int((density == 0).sum()))


# ------------------------------------------------------------------------------ spliced model


def token_cross_entropy(logits: mx.array, targets: mx.array, lse: mx.array | None = None) -> mx.array:
    """Per-row CE = logsumexp(z) - z[target], for (..., V) logits and (...) target ids.

    ``lse``: logsumexp(logits) if already computed (it is shared with ``token_kl``).
    """
    lse = mx.logsumexp(logits, axis=-1) if lse is None else lse
    picked = mx.take_along_axis(logits, targets[..., None].astype(mx.int32), axis=-1)[..., 0]
    return lse - picked


def token_kl(
    logits_ref: mx.array,
    logits: mx.array,
    *,
    p_ref: mx.array | None = None,
    lse_ref: mx.array | None = None,
    lse: mx.array | None = None,
) -> mx.array:
    """Per-row KL(softmax(z_ref) || softmax(z)) = sum_w p_ref(w) (z_ref(w) - z(w)) - (lse_ref - lse).

    Written on the logit difference so equal logits give exactly 0 and close ones lose no precision;
    ``p_ref``, ``lse_ref``, ``lse`` may be passed in when already computed.
    """
    lse_ref = mx.logsumexp(logits_ref, axis=-1) if lse_ref is None else lse_ref
    lse = mx.logsumexp(logits, axis=-1) if lse is None else lse
    p_ref = mx.exp(logits_ref - lse_ref[..., None]) if p_ref is None else p_ref
    return (p_ref * (logits_ref - logits)).sum(axis=-1) - (lse_ref - lse)


class _MaskedSum:
    """float64 sum and count of a (B, T) per-token quantity over a mask."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, values: object, mask: np.ndarray) -> None:
        self.total += float(_f64(values)[mask].sum())
        self.count += int(mask.sum())

    def merge(self, other: _MaskedSum) -> _MaskedSum:
        out = _MaskedSum()
        out.total, out.count = self.total + other.total, self.count + other.count
        return out

    @property
    def mean(self) -> float:
        return _ratio(self.total, float(self.count))


class SplicedMetrics(NamedTuple):
    ce_clean: float
    ce_spliced: float
    ce_zero_ablated: float
    ce_mean_ablated: float
    ce_loss_score: float
    ce_loss_score_mean_ablated: float
    kl_spliced: float
    kl_zero_ablated: float
    kl_mean_ablated: float
    kl_score: float
    kl_score_mean_ablated: float
    n_ce_tokens: int
    n_kl_tokens: int


VARIANTS: tuple[str, ...] = ("clean", "spliced", "zero_ablated", "mean_ablated")


class SplicedLossStats:
    """Streaming CE of the clean / spliced / ablated models and KL of each from the clean one."""

    def __init__(self) -> None:
        self.ce = {v: _MaskedSum() for v in VARIANTS}
        self.kl = {v: _MaskedSum() for v in VARIANTS[1:]}

    def update(
        self,
        tokens: object,
        ce_mask: np.ndarray,
        kl_mask: np.ndarray,
        *,
        clean: mx.array,
        spliced: mx.array,
        zero_ablated: mx.array,
        mean_ablated: mx.array,
    ) -> SplicedLossStats:
        """Add a batch: (B, T) ``tokens``, masks of scored positions, (B, T, V) logits per variant.

        CE at position t uses token t+1 as target (``ce_mask`` must be False at the last column);
        KL at t compares the variant's next-token distribution with the clean one.
        """
        tokens = np.asarray(tokens)
        ce_mask, kl_mask = np.asarray(ce_mask, dtype=bool), np.asarray(kl_mask, dtype=bool)
        if ce_mask.shape != tokens.shape or kl_mask.shape != tokens.shape:
            raise ValueError(f"masks must have the tokens' shape {tokens.shape}")
        if ce_mask[:, -1].any():
            raise ValueError("ce_mask is True at the last position, which has no next token")
        # Only scored rows go through the vocabulary-wide ops (padding can be a large share).
        rows = np.flatnonzero(ce_mask | kl_mask)
        if rows.size == 0:
            return self
        take = mx.array(rows.astype(np.int32))
        targets = mx.array(np.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1).ravel()[rows])
        ce_rows, kl_rows = ce_mask.ravel()[rows], kl_mask.ravel()[rows]
        logits = {"clean": clean, "spliced": spliced, "zero_ablated": zero_ablated,
                  "mean_ablated": mean_ablated}
        z = {k: v.reshape(-1, v.shape[-1])[take].astype(mx.float32) for k, v in logits.items()}
        lse_c, p_c = fastmath.log_softmax_parts(z["clean"])  # MLX's CPU exp is slow; equal to float32 rounding
        ce = token_cross_entropy(z["clean"], targets, lse_c)
        mx.eval(ce, p_c, lse_c)
        self.ce["clean"].update(np.array(ce), ce_rows)
        for name in VARIANTS[1:]:
            lse = fastmath.logsumexp(z[name])
            ce = token_cross_entropy(z[name], targets, lse)
            kl = token_kl(z["clean"], z[name], p_ref=p_c, lse_ref=lse_c, lse=lse)
            mx.eval(ce, kl)
            self.ce[name].update(np.array(ce), ce_rows)
            self.kl[name].update(np.array(kl), kl_rows)
        return self

    def merge(self, other: SplicedLossStats) -> SplicedLossStats:
        out = SplicedLossStats()
        out.ce = {v: self.ce[v].merge(other.ce[v]) for v in self.ce}
        out.kl = {v: self.kl[v].merge(other.kl[v]) for v in self.kl}
        return out

    def result(self) -> SplicedMetrics:
        if self.ce["clean"].count == 0:
            raise ValueError("no scored next-token positions were seen: cannot compute CE metrics")
        ce = {v: s.mean for v, s in self.ce.items()}
        kl = {v: s.mean for v, s in self.kl.items()}
        return SplicedMetrics(
            ce_clean=ce["clean"],
            ce_spliced=ce["spliced"],
            ce_zero_ablated=ce["zero_ablated"],
            ce_mean_ablated=ce["mean_ablated"],
            ce_loss_score=_ratio(ce["zero_ablated"] - ce["spliced"], ce["zero_ablated"] - ce["clean"]),
            ce_loss_score_mean_ablated=_ratio(ce["mean_ablated"] - ce["spliced"],
                                              ce["mean_ablated"] - ce["clean"]),
            kl_spliced=kl["spliced"],
            kl_zero_ablated=kl["zero_ablated"],
            kl_mean_ablated=kl["mean_ablated"],
            kl_score=1.0 - _ratio(kl["spliced"], kl["zero_ablated"]),
            kl_score_mean_ablated=1.0 - _ratio(kl["spliced"], kl["mean_ablated"]),
            n_ce_tokens=self.ce["clean"].count,
            n_kl_tokens=self.kl["spliced"].count,
        )


__all__ = [
    "VARIANTS",
    "DensityHistogram",
    "ReconstructionMetrics",
    "ReconstructionStats",
    "SparsityMetrics",
    "SparsityStats",
    "SplicedLossStats",
    "SplicedMetrics",
    "density_histogram",
    "next_token_mask",
    "reconstruction_metrics",
    "token_cross_entropy",
    "token_kl",
]
