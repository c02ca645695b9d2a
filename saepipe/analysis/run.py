"""``analyze``: everything the dashboard shows about an SAE's latents, from one pass over token rows.

Phases (each timed, see ``summary["seconds"]``):

1. ``encode``: every row's TopK code into a scratch file (``saepipe.analysis.codes``);
2. ``statistics``: per latent firings, sum, max; firings grouped by latent and sorted; histograms
   (``saepipe.analysis.latents``);
3. ``contexts``: top contexts and quantile samples, and their token windows (``saepipe.analysis.contexts``);
4. ``tokens``: top latents per vocabulary token (``saepipe.analysis.tokens``);
5. ``logits``: promoted/suppressed tokens of each decoder direction (``saepipe.analysis.logits``);
6. ``neighbors``: nearest latents by decoder cosine (``saepipe.analysis.neighbors``);
7. ``tables``: token strings and the Arrow tables (``saepipe.analysis.writer``).

The scratch folder (codes and keys: ~16 bytes per row and kept latent) is removed at the end. Memory
holds one chunk of rows and per-latent / per-token tables, whatever the number of rows.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from saepipe.analysis.codes import Codes, Encoder, encode_sources
from saepipe.analysis.config import AnalysisConfig
from saepipe.analysis.contexts import Selection, Windows, select_contexts, windows
from saepipe.analysis.directions import Unembedding, decoder_directions
from saepipe.analysis.latents import LatentTotals, group_by_latent, histograms, latent_totals
from saepipe.analysis.logits import LogitEffects, logit_effects
from saepipe.analysis.neighbors import nearest_latents
from saepipe.analysis.rows import RowSource
from saepipe.analysis.tokens import TokenFeatures, TokenStrings, token_features
from saepipe.analysis.writer import (
    AnalysisTables,
    list_array,
    rows_array,
    string_rows,
    token_array,
    write_parquet,
    write_summary,
)

PHASES = ("encode", "statistics", "contexts", "tokens", "logits", "neighbors", "tables")


class _Timer:
    """Wall and CPU seconds (all threads) of each phase."""

    def __init__(self, report: Callable[[str], None] | None) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.report = report
        self._t, self._c = time.perf_counter(), time.process_time()

    def lap(self, phase: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.seconds[phase] = round(now - self._t, 3)
        self.cpu_seconds[phase] = round(cpu - self._c, 3)
        self._t, self._c = now, cpu
        if self.report is not None:
            self.report(f"analyze: {phase} {self.seconds[phase]:.1f} s (cpu {self.cpu_seconds[phase]:.1f} s)")


def analyze_rows(sources: Sequence[RowSource], sae: Any, model: Any, config: AnalysisConfig, *,
                 features: Sequence[int] | None = None, scratch_dir: str | Path | None = None,
                 report: Callable[[str], None] | None = None) -> AnalysisTables:
    """Analyze the latents of ``sae`` over the rows of ``sources`` (read in order).

    ``model``: the ``LoadedModel`` (or mlx-lm module with ``tokenizer``) whose activations these are:
    its tokenizer decodes tokens, its unembedding gives the logit effects. ``features``: compute
    contexts, logit effects and neighbours for these latents only (None: all); statistics and the
    token table always cover every latent. ``scratch_dir``: parent of the scratch folder (default:
    the system's temporary folder). ``report``: called with a line per finished phase.
    """
    if not sources:
        raise ValueError("analyze needs at least one row source")
    for s in sources:
        if s.d_model != sae.d_model:
            raise ValueError(f"split {s.split!r} has d_model {s.d_model}, the SAE reads {sae.d_model}")
    chosen = np.arange(sae.d_hidden) if features is None else np.unique(np.asarray(features, dtype=np.int64))
    if len(chosen) and (chosen[0] < 0 or chosen[-1] >= sae.d_hidden):
        raise ValueError(f"features must be latent ids in 0..{sae.d_hidden - 1}")
    timer = _Timer(report)
    if scratch_dir is not None:
        Path(scratch_dir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="saepipe-analyze-", dir=scratch_dir))
    try:
        codes = encode_sources(sources, Encoder(sae), scratch, config.chunk_rows)
        if codes.n_rows == 0:
            raise ValueError("the sources hold no rows")
        timer.lap("encode")
        totals = latent_totals(codes)
        grouped = group_by_latent(codes, totals, scratch)
        hist = histograms(grouped, totals.maxes, config.histogram_bins)
        timer.lap("statistics")
        sel = select_contexts(grouped, codes, chosen, config.top_n, config.quantiles, config.per_quantile)
        win = windows(codes, sel, config.window_before, config.window_after)
        del grouped
        timer.lap("contexts")
        vocab = int(getattr(getattr(model, "info", None), "vocab_size", 0) or 0)
        tokfeat = token_features(codes, vocab, config.token_top)
        timer.lap("tokens")
        directions = decoder_directions(sae)
        effects = logit_effects(Unembedding(model), directions[chosen], config.logit_top)
        timer.lap("logits")
        near = nearest_latents(directions, chosen, config.neighbors)
        timer.lap("neighbors")
        strings = _strings(model, win, effects, tokfeat)
        tables = AnalysisTables(
            _features_table(totals, codes.n_rows, hist, chosen, effects, near, strings),
            _examples_table(codes, sel, win, config.quantiles, strings),
            _token_table(tokfeat, strings),
            _summary(sae, model, config, codes, totals),
        )
        del codes
        timer.lap("tables")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    tables.summary["seconds"] = dict(timer.seconds)
    tables.summary["cpu_seconds"] = dict(timer.cpu_seconds)
    return tables


def analyze(sources: Sequence[RowSource], sae: Any, model: Any, config: AnalysisConfig, out_dir: str | Path, *,
            scratch_dir: str | Path | None = None, report: Callable[[str], None] | None = None) -> AnalysisTables:
    """``analyze_rows`` over every latent, written to ``out_dir`` (the dashboard's data contract)."""
    t0, c0 = time.perf_counter(), time.process_time()
    tables = analyze_rows(sources, sae, model, config, scratch_dir=scratch_dir, report=report)
    t1, c1 = time.perf_counter(), time.process_time()
    write_parquet(tables, out_dir)
    seconds, cpu = tables.summary["seconds"], tables.summary["cpu_seconds"]
    seconds["write"], cpu["write"] = round(time.perf_counter() - t1, 3), round(time.process_time() - c1, 3)
    seconds["total"], cpu["total"] = round(time.perf_counter() - t0, 3), round(time.process_time() - c0, 3)
    write_summary(tables.summary, out_dir)
    if report is not None:
        report(f"analyze: write {seconds['write']:.1f} s; total {seconds['total']:.1f} s (cpu {cpu['total']:.1f} s)")
    return tables


# --- tables -------------------------------------------------------------------------------------------


def _strings(model: Any, win: Windows, effects: LogitEffects, tokfeat: TokenFeatures) -> dict[int, str]:
    """Every token id the tables show, decoded once."""
    parts = [win.token_id, effects.promoted.reshape(-1), effects.suppressed.reshape(-1), tokfeat.token_id]
    top = max((int(p.max()) for p in parts if len(p)), default=-1)
    present = np.zeros(top + 1, bool)  # token ids are small (a vocabulary): no sort needed
    for p in parts:
        present[p] = True
    ids = np.flatnonzero(present).tolist()
    return dict(zip(ids, TokenStrings(model.tokenizer).strings(ids), strict=True))


def _features_table(totals: LatentTotals, n_rows: int, hist: tuple[np.ndarray, np.ndarray], chosen: np.ndarray,
                    effects: LogitEffects, near: tuple[np.ndarray, np.ndarray], strings: dict[int, str]) -> pa.Table:
    H = len(totals.n_fired)
    fired = totals.n_fired
    mean = np.where(fired > 0, totals.sums / np.maximum(fired, 1), 0.0).astype(np.float32)
    edges, counts = hist
    alive = (fired > 0).astype(np.int64)

    def per_latent(matrix: np.ndarray, fill: Any) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``matrix`` (one per chosen latent) spread over every latent; others get length 0."""
        full = np.full((H, matrix.shape[1]), fill, dtype=matrix.dtype)
        full[chosen] = matrix
        lengths = np.zeros(H, np.int64)
        lengths[chosen] = matrix.shape[1]
        return full, lengths

    prom, plen = per_latent(effects.promoted, 0)
    prom_v, _ = per_latent(effects.promoted_values, 0.0)
    sup, slen = per_latent(effects.suppressed, 0)
    sup_v, _ = per_latent(effects.suppressed_values, 0.0)
    nb, nlen = per_latent(near[0], 0)
    nb_c, _ = per_latent(near[1], 0.0)
    return pa.table({
        "feature": pa.array(np.arange(H, dtype=np.int32)),
        "density": pa.array(fired / float(n_rows), type=pa.float64()),
        "n_fired": pa.array(fired.astype(np.int64)),
        "mean_act": pa.array(mean),
        "max_act": pa.array(totals.maxes.astype(np.float32)),
        "hist_edges": rows_array(edges, alive * edges.shape[1], pa.float32()),
        "hist_counts": rows_array(counts, alive * counts.shape[1], pa.int64()),
        "promoted_tokens": string_rows(prom, plen, strings),
        "promoted_values": rows_array(prom_v, plen, pa.float32()),
        "suppressed_tokens": string_rows(sup, slen, strings),
        "suppressed_values": rows_array(sup_v, slen, pa.float32()),
        "neighbors": rows_array(nb, nlen, pa.int32()),
        "neighbor_cos": rows_array(nb_c, nlen, pa.float32()),
    })


def _examples_table(codes: Codes, sel: Selection, win: Windows, quantiles: int, strings: dict[int, str]) -> pa.Table:
    kinds = pa.array(["top", *[f"q{q}" for q in range(quantiles)]], type=pa.string())
    starts = codes.split_starts()
    split_names = pa.array([s.name for s in codes.splits], type=pa.string())
    split_of = np.searchsorted(starts, sel.row, side="right") - 1
    return pa.table({
        "feature": pa.array(sel.feature.astype(np.int32)),
        "kind": kinds.take(pa.array(sel.kind.astype(np.int64) + 1)),
        "rank": pa.array(sel.rank.astype(np.int32)),
        "split": split_names.take(pa.array(split_of.astype(np.int64))),
        "doc_id": pa.array(np.asarray(codes.doc_id)[sel.row].astype(np.int64) if len(sel.row) else
                           np.zeros(0, np.int64)),
        "tokens": list_array(token_array(win.token_id, strings), win.offsets),
        "acts": list_array(pa.array(win.acts, type=pa.float32()), win.offsets),
        "center": pa.array(win.center.astype(np.int32)),
        "max_act": pa.array(sel.value.astype(np.float32)),
    })


def _token_table(tf: TokenFeatures, strings: dict[int, str]) -> pa.Table:
    return pa.table({
        "token_id": pa.array(tf.token_id.astype(np.int32)),
        "token": token_array(tf.token_id, strings) if len(tf.token_id) else pa.array([], type=pa.string()),
        "features": list_array(pa.array(tf.features.astype(np.int32)), tf.offsets),
        "values": list_array(pa.array(tf.values.astype(np.float32)), tf.offsets),
    })


def _summary(sae: Any, model: Any, config: AnalysisConfig, codes: Codes, totals: LatentTotals) -> dict[str, Any]:
    meta = sae.metadata
    info = getattr(model, "info", None)
    return {
        "n_features": int(sae.d_hidden),
        "n_tokens": int(codes.n_rows),
        "model": str(getattr(info, "model_id", None) or meta.get("model_name") or "unknown"),
        "site": {"layer": meta.get("layer"), "component": meta.get("component")},
        "k": int(sae.k),
        "dead": int((totals.n_fired == 0).sum()),
        "top_n": config.top_n,
        "quantiles": config.quantiles,
        "per_quantile": config.per_quantile,
        "window": config.window,
        "window_before": config.window_before,
        "window_after": config.window_after,
        "histogram_bins": config.histogram_bins,
        "splits": {s.name: s.stop - s.start for s in codes.splits},
    }


__all__ = ["PHASES", "analyze", "analyze_rows"]
