"""Evaluate a trained SAE on held-out texts: reconstruction, sparsity and spliced-model loss.

For each batch of eval texts the model runs once with the SAE's site captured (giving the clean
logits and the activations x), then three more times with the site's output replaced, at the scored
positions only, by the SAE reconstruction x_hat, by 0 and by the eval-set mean of x. Reconstruction
metrics come from the same x and x_hat that are spliced in, in the original activation space.
A first, early-stopped pass (blocks 0..layer only) computes the eval-set mean for mean ablation.
Definitions are in ``saepipe.evaluation.metrics``.

Speed (the metrics do not depend on it): the scored texts are regrouped by length (little padding),
the early-stopped pass keeps the residual stream around the site so the clean and the three edited
passes resume from it instead of rerunning blocks 0..layer-1, and the edited passes are ``Replace``
edits, which ``forward`` splits over per-core streams.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from saepipe.activations.config import ExtractConfig
from saepipe.activations.extract import make_batches
from saepipe.evaluation.config import EvaluateConfig
from saepipe.evaluation.metrics import (
    ReconstructionMetrics,
    ReconstructionStats,
    SparsityMetrics,
    SparsityStats,
    SplicedLossStats,
    SplicedMetrics,
    next_token_mask,
)
from saepipe.lm import tokens as tok
from saepipe.lm.forward import Replace, forward
from saepipe.lm.sites import Site, check_site
from saepipe.runtime.memory import reuse_freed_memory

log = logging.getLogger(__name__)


class TokenBatch(NamedTuple):
    tokens: np.ndarray
    """(B, T) int32 ids, right-padded."""
    lengths: np.ndarray
    """(B,) tokens of each text (the rest is padding)."""
    mask: np.ndarray
    """(B, T) bool: the scored positions (activation rows), after the ``max_tokens`` cut."""


class EvalResult(NamedTuple):
    site: Site
    reconstruction: ReconstructionMetrics
    sparsity: SparsityMetrics
    spliced: SplicedMetrics

    def to_dict(self) -> dict[str, float | int | str]:
        """Flat JSON-ready scalars (the per-latent density array is left out)."""
        out: dict[str, float | int | str] = {"layer": self.site.layer, "component": self.site.component}
        out.update({k: _num(v) for k, v in self.reconstruction._asdict().items()})
        out.update({k: _num(v) for k, v in self.sparsity._asdict().items() if k != "density"})
        out.update({k: _num(v) for k, v in self.spliced._asdict().items()})
        return out


def _num(v: Any) -> float | int:
    return int(v) if isinstance(v, (int, np.integer)) else float(v)


def token_batches(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    context_length: int,
    batch_size: int,
    max_tokens: int,
    skip_special_tokens: bool,
) -> Iterator[TokenBatch]:
    """Extraction's batches (``saepipe.activations.extract.make_batches``: same tokenization, truncation, padding
    and kept positions) with text lengths, stopping after exactly ``max_tokens`` scored positions."""
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 (CE needs a next token), got {context_length}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    cfg = ExtractConfig(context_length=context_length, batch_size=batch_size,
                        skip_special_tokens=skip_special_tokens)
    left = max_tokens
    for batch in make_batches(tokenizer, np.arange(len(texts)), texts, cfg):  # file order: no sort window
        # Keep the first `left` scored positions in row-major order; later ones never affect them.
        mask = batch.keep & (np.cumsum(batch.keep.ravel()).reshape(batch.keep.shape) <= left)
        left -= int(mask.sum())
        if mask.any():
            yield TokenBatch(batch.tokens, batch.lengths, mask)
        if left == 0:
            return


def _sae_reconstruct(sae: Any, x: mx.array, sparsity: SparsityStats | None) -> tuple[mx.array, SparsityStats]:
    """x_hat for (n, d_model) rows in the original activation space; codes go into ``sparsity``.

    Uses the sparse ``encode_topk``/``decode_topk`` of a ``TopKSAE`` when present, else dense
    ``encode``/``decode`` (any SAE-like object).
    """
    if hasattr(sae, "encode_topk") and hasattr(sae, "decode_topk"):
        values, indices = sae.encode_topk(x)
        x_hat = sae.decode_topk(values, indices)
        mx.eval(x_hat, values, indices)
        sparsity = sparsity or SparsityStats(int(sae.d_hidden))
        return x_hat, sparsity.update_topk(np.array(values), np.array(indices))
    codes = sae.encode(x)
    x_hat = sae.decode(codes)
    mx.eval(x_hat, codes)
    sparsity = sparsity or SparsityStats(int(codes.shape[-1]))
    return x_hat, sparsity.update(np.array(codes))


def length_sorted(batches: Sequence[TokenBatch], batch_size: int, pad_id: int) -> list[TokenBatch]:
    """The same scored texts and positions regrouped into batches of similar length.

    Each text with a scored position is cut after the position that the last scored one predicts
    (the model is causal, so nothing later changes it; CE masks stay the same) and texts are sorted
    by that width (stable): padding nearly vanishes. Metrics are sums over the scored positions, so
    only the float rounding of their order changes.
    """
    rows = []  # (tokens, mask) per text, trimmed
    for b in batches:
        for tokens, mask, length in zip(b.tokens, b.mask, b.lengths, strict=True):
            scored = np.flatnonzero(mask)
            if scored.size:
                width = min(int(length), int(scored[-1]) + 2)
                rows.append((tokens[:width], mask[:width]))
    rows.sort(key=lambda r: len(r[0]))
    out = []
    for i in range(0, len(rows), batch_size):
        token_rows, mask_rows = zip(*rows[i : i + batch_size], strict=True)
        out.append(TokenBatch(tok.pad_right(token_rows, pad_id), tok.lengths(token_rows),
                              tok.pad_right(mask_rows, False, dtype=bool)))
    return out


class _Prefix(NamedTuple):
    """What the early-stopped pass of a batch leaves for the full passes."""

    x: mx.array
    """(B, T, d_model) site output."""
    before: mx.array | None
    """Residual stream entering the site's block (None for block 0: the embedding)."""
    after: mx.array
    """Residual stream leaving the site's block (clean)."""


def _prefixes(model: Any, batches: Sequence[TokenBatch], site: Site) -> tuple[list[_Prefix], np.ndarray]:
    """Blocks 0..layer once per batch (kept for the clean and edited passes, which resume from them)
    and the float64 mean of the site's output over all scored positions."""
    before_site, after_site = Site(site.layer - 1, "output"), Site(site.layer, "output")
    capture = {site, after_site} | ({before_site} if site.layer > 0 else set())
    prefixes, total, count = [], None, 0
    for b in tqdm(batches, desc="eval prefix", unit="batch", leave=False):
        acts = forward(model, mx.array(b.tokens), stop_layer=site.layer, capture=tuple(capture)).activations
        mx.eval(acts)
        prefixes.append(_Prefix(acts[site], acts.get(before_site), acts[after_site]))
        rows = np.asarray(acts[site].astype(mx.float32))[b.mask].astype(np.float64)
        total = rows.sum(axis=0) if total is None else total + rows.sum(axis=0)
        count += rows.shape[0]
    return prefixes, total / count


def evaluate_sae(
    loaded_model: Any,
    sae: Any,
    texts: Sequence[str],
    *,
    layer: int,
    component: str,
    max_tokens: int,
    batch_size: int,
    context_length: int,
    skip_special_tokens: bool,
    fast: bool = True,
) -> EvalResult:
    """Score ``sae`` at (layer, component) of ``loaded_model`` on up to ``max_tokens`` scored
    positions of ``texts`` (the eval split): reconstruction, sparsity, CE/KL of the spliced model.

    ``sae``: a ``TopKSAE`` (or any object with ``encode``/``decode`` on (n, d_model) rows and
    dense codes), mapping activations to reconstructions in the original activation space.
    ``fast``: regroup texts by length (``length_sorted``) and resume the clean and edited passes
    from the residual stream around the site instead of rerunning the blocks before it; False
    runs every pass from the embedding on file-order batches (same metrics up to float rounding).
    """
    checked = EvaluateConfig(max_tokens=max_tokens, batch_size=batch_size)  # errors name evaluate.<key>
    max_tokens, batch_size = checked.max_tokens, checked.batch_size
    model, tokenizer = loaded_model.model, loaded_model.tokenizer
    site = check_site(layer, component, len(model.model.layers))
    d_model = int(loaded_model.info.d_model)
    if getattr(sae, "d_model", d_model) != d_model:
        raise ValueError(f"the SAE reads d_model={sae.d_model} activations, the model has d_model={d_model}")
    batches = list(token_batches(tokenizer, texts, context_length=context_length, batch_size=batch_size,
                                 max_tokens=max_tokens, skip_special_tokens=skip_special_tokens))
    if not batches:
        raise ValueError("no scored tokens in the eval texts (empty texts, or only special tokens)")
    n_tokens = sum(int(b.mask.sum()) for b in batches)
    if n_tokens < max_tokens:
        log.warning("eval texts give %d scored tokens, fewer than max_tokens=%d", n_tokens, max_tokens)
    if fast:
        batches = length_sorted(batches, batch_size, tok.pad_id(tokenizer))
    with reuse_freed_memory():  # the (batch, seq, vocab) logits are reused, not page-faulted in anew
        prefixes, mean = _prefixes(model, batches, site)
        recon, sparsity, spliced = _score(model, sae, site, batches, prefixes, mean, fast)
    result = EvalResult(site, recon.result(), sparsity.result(), spliced.result())
    log.info("evaluate %s on %d tokens: fvu=%.4f l0=%.1f ce_loss_score=%.4f", site.name, n_tokens,
             result.reconstruction.fvu, result.sparsity.l0, result.spliced.ce_loss_score)
    return result


def _score(model: Any, sae: Any, site: Site, batches: Sequence[TokenBatch], prefixes: Sequence[_Prefix],
           mean: np.ndarray, fast: bool) -> tuple[ReconstructionStats, SparsityStats, SplicedLossStats]:
    """Reconstruction, sparsity and spliced-model loss stats over ``batches`` (see evaluate_sae)."""
    mean_value = mx.array(mean.astype(np.float32))
    recon, spliced, sparsity = ReconstructionStats(), SplicedLossStats(), None
    for b, prefix in tqdm(zip(batches, prefixes, strict=True), total=len(batches), desc="evaluate",
                          unit="batch"):
        tokens = mx.array(b.tokens)
        n_layers = len(model.model.layers)
        if not fast:
            resume: dict[str, Any] = {}
            clean = forward(model, tokens, capture=(site,))
            acts = clean.activations[site]
        else:
            resume = {"start_layer": site.layer, "start_residual": prefix.before}
            if site.layer + 1 < n_layers:
                clean = forward(model, tokens, start_layer=site.layer + 1, start_residual=prefix.after)
            else:
                clean = forward(model, tokens, **resume)
            acts = prefix.x
        mx.eval(clean.logits, acts)
        x_full = np.array(acts.astype(mx.float32))
        x = x_full[b.mask]
        x_hat, sparsity = _sae_reconstruct(sae, mx.array(x), sparsity)
        x_hat = np.array(x_hat.astype(mx.float32))
        recon.update(x, x_hat)

        x_full[b.mask] = x_hat
        where = mx.array(b.mask)[..., None]
        replacements = {
            "spliced": mx.array(x_full),
            "zero_ablated": mx.zeros((acts.shape[-1],)),
            "mean_ablated": mean_value,
        }
        # The straightforward path edits with plain functions: one stream, as before Replace existed.
        make_edit = Replace if fast else _replace_at
        logits = {
            name: forward(model, tokens, edit={site: make_edit(where, value)}, **resume).logits
            for name, value in replacements.items()
        }
        spliced.update(b.tokens, next_token_mask(b.mask, b.lengths), b.mask, clean=clean.logits, **logits)
    return recon, sparsity, spliced


def _replace_at(where: mx.array, value: mx.array):
    """Edit function: ``value`` at the scored positions, the original output elsewhere (a plain
    function, so ``forward`` runs it on one stream)."""
    return lambda out: mx.where(where, value.astype(out.dtype), out)


# ---------------------------------------------------------------------------------- health


def _train_losses(train_summary: dict[str, Any], loss_curve: Any) -> tuple[float | None, float | None, str]:
    """(start, end, where from) of the training loss: the per-step curve (means of its first and
    last 10% of points), else the per-epoch ``history`` of the train summary, else explicit
    ``initial_loss``/``final_loss`` keys; (None, None, reason) when none of these is there."""
    if loss_curve is not None:
        values = np.asarray(loss_curve.values if hasattr(loss_curve, "values") else loss_curve, dtype=float)
        if values.size >= 2:
            n = max(1, values.size // 10)
            return float(values[:n].mean()), float(values[-n:].mean()), "per-step loss curve"
    history = [h for h in train_summary.get("history") or [] if "train/loss" in h]
    if len(history) >= 2:
        return float(history[0]["train/loss"]), float(history[-1]["train/loss"]), "per-epoch history"
    if "initial_loss" in train_summary and "final_loss" in train_summary:
        return float(train_summary["initial_loss"]), float(train_summary["final_loss"]), "summary"
    return None, None, "no training loss curve or history found"


def health_checks(
    metrics: dict[str, Any], train_summary: dict[str, Any], k: int, loss_curve: Any = None
) -> dict[str, dict]:
    """The seed's sanity checks, each ``{"ok": bool, "value": ..., "expected": str}``: training
    loss decreased, L0 within 10% of k, dead latents < 20%, no NaN/inf metric, and the run was long
    enough for its schedule (``schedule_ok``: train recorded no ``warnings``, see
    ``saepipe.training.fit.schedule_warnings``).

    ``loss_curve``: the per-step training loss (a ``plots.Series`` or array), preferred to the
    per-epoch ``history`` of ``train_summary`` (train's metrics.json). Unknown counts as failed.
    """
    start, end, source = _train_losses(train_summary, loss_curve)
    l0, dead = float(metrics["l0"]), float(metrics["dead_fraction"])
    numbers = {key: v for key, v in {**metrics, **train_summary}.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    bad = sorted(key for key, v in numbers.items() if not math.isfinite(v))
    if start is not None and not (math.isfinite(start) and math.isfinite(end)):
        bad.append("training loss")
    return {
        "loss_decreased": {
            "ok": start is not None and end < start,
            "value": None if start is None else {"start": start, "end": end},
            "expected": f"final training loss < initial ({source})",
        },
        "l0_near_k": {"ok": abs(l0 - k) <= 0.1 * k, "value": l0, "expected": f"|L0 - k| <= 10% of k={k}"},
        "dead_below_20pct": {"ok": dead < 0.2, "value": dead, "expected": "dead_fraction < 0.2"},
        "no_nan": {"ok": not bad, "value": bad, "expected": "every metric finite"},
        "schedule_ok": _schedule_check(train_summary),
    }


def _schedule_check(train_summary: dict[str, Any]) -> dict[str, Any]:
    warnings = train_summary.get("warnings")
    expected = "a run long enough for its settings (train's warnings empty)"
    if not isinstance(warnings, list):
        return {"ok": False, "value": "not recorded by train", "expected": expected}
    return {"ok": not warnings, "value": warnings, "expected": expected}


__all__ = ["EvalResult", "TokenBatch", "evaluate_sae", "health_checks", "length_sorted",
           "token_batches"]
