"""Fit normalization statistics (per-dimension mean/std, mean row norm) by streaming activations.

Each chunk is reduced in float64 to ``Moments`` (count, mean, M2 = sum of squared deviations, sum
of row L2 norms); chunks merge with Chan et al.'s parallel formula, which is exact up to rounding
and independent of the order chunks arrive in. With several ranks (``fit_stats(..., ranks=)``)
each rank reduces its share of the chunks and every rank merges all chunks' moments in chunk
order: the same bits on every rank, and as one process when ``rows`` are given.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from saepipe.activations.config import check_chunk_rows
from saepipe.activations.shards import ShardSource, check_manifest
from saepipe.activations.sources import as_source, take_in_chunks
from saepipe.activations.stats import NormStats
from saepipe.parallel.ranks import Ranks

STATS_FILE = "stats.safetensors"

MIN_STD = 1e-8
"""Floor of a fitted std: a constant dimension must not make normalization divide by 0."""


class Moments(NamedTuple):
    count: int
    mean: np.ndarray
    """(d,) float64 mean."""
    m2: np.ndarray
    """(d,) float64 sum of squared deviations from the mean."""
    norm_sum: float
    """Sum over rows of the row's L2 norm."""


BLOCK_ROWS = 8192
"""Rows converted to float64 at a time (bounds memory to ~2 x 8192 x d_model x 8 bytes)."""


def chunk_moments(x: np.ndarray) -> Moments:
    """Moments of one (n, d) chunk, computed in float64 block by block."""
    if np.ndim(x) != 2:
        raise ValueError(f"a chunk must be a 2-D (n, d) array, got shape {np.shape(x)}")
    total = Moments(0, np.zeros(x.shape[1]), np.zeros(x.shape[1]), 0.0)
    for start in range(0, len(x), BLOCK_ROWS):
        block = np.asarray(x[start : start + BLOCK_ROWS], dtype=np.float64)
        mean = block.mean(axis=0)
        dev = block - mean
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))
        total = merge_moments(total, Moments(len(block), mean, np.einsum("ij,ij->j", dev, dev), float(norms.sum())))
    return total


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s pairwise merge of two sets of moments."""
    if a.count == 0:
        return b
    if b.count == 0:
        return a
    n = a.count + b.count
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / n)
    m2 = a.m2 + b.m2 + delta * delta * (a.count * b.count / n)
    return Moments(n, mean, m2, a.norm_sum + b.norm_sum)


def reduce_moments(chunks: Iterable[np.ndarray]) -> Moments:
    """Merge the moments of every chunk."""
    total: Moments | None = None
    for chunk in chunks:
        m = chunk_moments(chunk)
        total = m if total is None else merge_moments(total, m)
    if total is None or total.count == 0:
        raise ValueError("no activation rows to fit normalization statistics on")
    return total


def to_stats(m: Moments, min_std: float = MIN_STD) -> NormStats:
    """Population std (ddof=0), floored at ``min_std`` so constant dimensions do not divide by 0."""
    std = np.maximum(np.sqrt(m.m2 / m.count), min_std)
    return NormStats(m.mean, std, m.norm_sum / m.count, m.count)


def fit_stats(activations: Any, chunk_rows: int = 65536, rows: np.ndarray | None = None,
              ranks: Ranks | None = None) -> NormStats:
    """Normalization statistics of an ``ActivationSource`` / shard folder / (n, d) array; of the
    rows with indices ``rows`` only when given (e.g. the training rows of a split). ``ranks``
    (several): each rank reads a contiguous share of the chunks and all merge every chunk's moments
    in order (identical to one process for given ``rows``; without, chunks are ``chunk_rows`` rows
    of the whole source instead of per shard, equal up to rounding). NaN or inf in the rows is an
    error that blames the input."""
    chunk_rows = check_chunk_rows(chunk_rows)
    source = as_source(activations)
    if ranks is not None and ranks.distributed:
        moments = _ranked_moments(source, np.arange(source.n_rows) if rows is None else rows, chunk_rows, ranks)
    else:
        chunks = source.chunks(chunk_rows) if rows is None else take_in_chunks(source, rows, chunk_rows)
        moments = reduce_moments(chunks)
    if not (np.isfinite(moments.mean).all() and np.isfinite(moments.m2).all() and math.isfinite(moments.norm_sum)):
        bad = int((~np.isfinite(moments.mean)).sum())
        raise ValueError(f"the activations hold non-finite values (NaN or inf; {bad} of {len(moments.mean)} "
                         "dimensions affected): they cannot be normalized or trained on. Check the model and "
                         "the extract stage (extract.dtype float16 overflows above 65504)")
    return to_stats(moments)


def _ranked_moments(source: Any, rows: np.ndarray, chunk_rows: int, ranks: Ranks) -> Moments:
    """``reduce_moments`` of ``take_in_chunks(source, rows, chunk_rows)`` with the chunks split over
    the ranks; every rank returns the same moments (all chunks' moments merged in chunk order)."""
    rows = np.sort(rows)
    starts = range(0, len(rows), chunk_rows)
    first, stop = ranks.bounds(len(starts))
    d = source.d_model
    mine = [chunk_moments(source.take(rows[s : s + chunk_rows])) for s in starts[first:stop]]
    packed = np.array([[m.count, m.norm_sum, *m.mean, *m.m2] for m in mine], dtype=np.float64).reshape(-1, 2 + 2 * d)
    every = [np.frombuffer(b, np.float64).reshape(-1, 2 + 2 * d) for b in ranks.gather_bytes(packed.tobytes())]
    moments = [Moments(round(p[0]), p[2 : 2 + d].copy(), p[2 + d :].copy(), float(p[1]))
               for part in every for p in part]
    total: Moments | None = None
    for m in moments:  # as reduce_moments: merged one after the other in chunk order
        total = m if total is None else merge_moments(total, m)
    if total is None or total.count == 0:
        raise ValueError("no activation rows to fit normalization statistics on")
    return total


def normalize(acts_dir: Path, out: Path, chunk_rows: int = 65536, *, layer: int | None = None,
              component: str | None = None) -> NormStats:
    """Fit on a shard folder (checked against its manifest, and against ``layer``/``component`` and the
    train split when given); write ``out/stats.safetensors`` + ``stats.json`` naming the manifest."""
    source = ShardSource(Path(acts_dir))
    check_manifest(source.manifest, Path(acts_dir), layer=layer, component=component, split="train")
    stats = fit_stats(source, chunk_rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m = source.manifest
    stats.save(out / STATS_FILE, extra={
        "manifest_digest": m["digest"], "site": m.get("site"), "model_hash": m.get("model_hash"),
        "split": m.get("split"), "d_model": source.d_model,
    })
    return stats


def read_stats_meta(out: Path) -> dict[str, Any]:
    """The JSON sidecar of a stats file (digest, manifest digest, ...)."""
    return json.loads((Path(out) / STATS_FILE).with_suffix(".json").read_text())
