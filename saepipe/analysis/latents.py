"""Per-latent statistics from the codes, and the codes grouped by latent (numba, every core).

``latent_totals``: how often each latent fires, the sum and the maximum of its activations.
``group_by_latent``: every firing as a 64-bit key, the keys of each latent contiguous and sorted
(ascending by activation, then descending by row), in a scratch file: top contexts, quantile
samples and histograms all read a latent's sorted run of keys. A key is
``(float32 bits of the activation) << 32 | (0xFFFFFFFF - row)``: positive floats order like their
bits, so sorting the keys sorts by activation, and among equal activations the smaller row comes
last (i.e. first when read from the strongest end).
``histograms``: per latent, counts in ``bins`` equal bins from 0 to its maximum.

Rows are split into ``PARTS`` fixed ranges processed in parallel, so the results (float sums
included) do not depend on the number of threads.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

import numba as nb
import numpy as np

from saepipe.analysis.codes import Codes, scratch_array

PARTS = 16
"""Row ranges of the parallel passes (fixed: results do not depend on the thread count)."""

MAX_ROWS = 0xFFFFFFFF
"""Rows a key can address (the low 32 bits of a key)."""


class LatentTotals(NamedTuple):
    n_fired: np.ndarray
    """(d_hidden,) int64."""
    sums: np.ndarray
    """(d_hidden,) float64 sum of the activations where it fires."""
    maxes: np.ndarray
    """(d_hidden,) float32 largest activation (0 when it never fires)."""
    part_counts: np.ndarray
    """(PARTS, d_hidden) int64 firings per row range (where ``group_by_latent`` writes)."""


@nb.njit(parallel=True, cache=True, boundscheck=False)
def _totals(values, indices, width, parts):
    n, k = values.shape
    counts = np.zeros((parts, width), np.int64)
    sums = np.zeros((parts, width), np.float64)
    maxes = np.zeros((parts, width), np.float32)
    for p in nb.prange(parts):
        for r in range(p * n // parts, (p + 1) * n // parts):
            for s in range(k):
                v = values[r, s]
                if v > 0:
                    j = indices[r, s]
                    counts[p, j] += 1
                    sums[p, j] += v
                    if v > maxes[p, j]:
                        maxes[p, j] = v
    return counts, sums, maxes


def latent_totals(codes: Codes) -> LatentTotals:
    counts, sums, maxes = _totals(codes.values, codes.indices, codes.d_hidden, PARTS)
    return LatentTotals(counts.sum(axis=0), sums.sum(axis=0), maxes.max(axis=0), counts)


@nb.njit(parallel=True, cache=True, boundscheck=False)
def _scatter_keys(values, bits, indices, cursors, keys):
    n, k = values.shape
    parts = cursors.shape[0]
    for p in nb.prange(parts):
        cur = cursors[p]
        for r in range(p * n // parts, (p + 1) * n // parts):
            inv = np.uint64(0xFFFFFFFF - r)
            for s in range(k):
                if values[r, s] > 0:
                    j = indices[r, s]
                    keys[cur[j]] = (np.uint64(bits[r, s]) << np.uint64(32)) | inv
                    cur[j] += 1


@nb.njit(parallel=True, cache=True, boundscheck=False)
def _sort_runs(keys, offsets):
    for j in nb.prange(len(offsets) - 1):
        keys[offsets[j] : offsets[j + 1]].sort()


class Grouped(NamedTuple):
    keys: np.ndarray
    """(total firings,) uint64 keys (see the module docstring), latent by latent."""
    offsets: np.ndarray
    """(d_hidden + 1,) int64: latent j's keys are ``keys[offsets[j]:offsets[j + 1]]``."""


def group_by_latent(codes: Codes, totals: LatentTotals, scratch: Path) -> Grouped:
    """Every firing as a key, grouped by latent and sorted (see the module docstring)."""
    if sys.byteorder != "little":
        raise RuntimeError("the analysis keys assume a little-endian CPU")
    if codes.n_rows > MAX_ROWS:
        raise ValueError(f"{codes.n_rows} rows: at most {MAX_ROWS} can be analyzed at once")
    offsets = np.zeros(codes.d_hidden + 1, np.int64)
    np.cumsum(totals.n_fired, out=offsets[1:])
    pc = totals.part_counts
    cursors = offsets[:-1][None, :] + np.cumsum(pc, axis=0) - pc  # where each row range starts writing
    keys = scratch_array(scratch, "keys", (int(offsets[-1]),), np.uint64)
    if len(keys):
        _scatter_keys(codes.values, codes.values.view(np.uint32), codes.indices,
                      np.ascontiguousarray(cursors), keys)
        _sort_runs(keys, offsets)
    return Grouped(keys, offsets)


@nb.njit(parallel=True, cache=True, boundscheck=False)
def _histograms(key_floats, offsets, maxes, bins, counts):
    for j in nb.prange(len(offsets) - 1):
        m = maxes[j]
        if m <= 0:
            continue
        scale = bins / np.float64(m)
        for i in range(offsets[j], offsets[j + 1]):
            b = int(np.float64(key_floats[2 * i + 1]) * scale)
            counts[j, min(b, bins - 1)] += 1


def histograms(grouped: Grouped, maxes: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(edges (d_hidden, bins + 1) float32, counts (d_hidden, bins) int64): bins of equal width from
    0 to each latent's maximum; activation v falls in bin ``min(floor(v * bins / max), bins - 1)``
    (in float64). Latents that never fire have all-zero counts."""
    counts = np.zeros((len(maxes), bins), np.int64)
    if len(grouped.keys):
        _histograms(grouped.keys.view(np.float32), grouped.offsets, maxes, bins, counts)
    grid = np.arange(bins + 1, dtype=np.float64) / bins
    edges = (maxes.astype(np.float64)[:, None] * grid[None, :]).astype(np.float32)
    edges[:, -1] = maxes
    return edges, counts


__all__ = ["PARTS", "Grouped", "LatentTotals", "group_by_latent", "histograms", "latent_totals"]
