"""Which contexts each latent shows, and the token windows around them (numba, every core).

Selection reads a latent's sorted run of keys (``saepipe.analysis.latents.group_by_latent``):

- **top**: from the strongest firing down, the first ``top_n`` whose document is not already
  shown (at most one context per text), ranks 0.. by activation (ties: the earlier row first);
- **quantiles**: the latent's firings ranked by activation (ascending) split into ``quantiles``
  bins of equal count (bin q holds ranks ``[q n / m, (q + 1) n / m)``, q0 the weakest); from each,
  ``per_quantile`` firings at evenly spaced ranks (the middles of equal sub-ranges of the bin),
  minus any already shown as a top context; rank 0 is the strongest sample of its bin.

A window is the rows ``[row - before, row + after]`` of the firing's document and split (shorter at
a text's start or end), with the token id of each row and this latent's activation on it (0 where
it is not among the row's kept latents or does not fire).
"""

from __future__ import annotations

from typing import NamedTuple

import numba as nb
import numpy as np

from saepipe.analysis.codes import Codes
from saepipe.analysis.latents import Grouped


class Selection(NamedTuple):
    """Selected firings, as flat arrays in display order: per latent, top by rank, then the quantile
    bins from the highest to q0, each by rank."""

    feature: np.ndarray
    """(E,) int32 latent."""
    kind: np.ndarray
    """(E,) int8: -1 for "top", q for quantile bin q."""
    rank: np.ndarray
    """(E,) int32."""
    row: np.ndarray
    """(E,) int64 row of the firing (the window's center)."""
    value: np.ndarray
    """(E,) float32 activation there."""


@nb.njit(inline="always")
def _key_row(key):
    return np.int64(0xFFFFFFFF - (key & np.uint64(0xFFFFFFFF)))


@nb.njit(parallel=True, cache=True, boundscheck=False)
def _select(keys, offsets, doc_id, features, top_n, quantiles, per_q, top_rows, q_rows):
    """Per selected latent: the rows of its top contexts ``top_rows[f, :]`` and quantile samples
    ``q_rows[f, q, :]``, each packed from slot 0 (-1 after the last)."""
    for f in nb.prange(len(features)):
        j = features[f]
        lo, hi = offsets[j], offsets[j + 1]
        n = hi - lo
        docs = np.empty(max(top_n, 1), np.int64)
        got = 0
        i = hi - 1
        while i >= lo and got < top_n:
            row = _key_row(keys[i])
            d = doc_id[row]
            seen = False
            for t in range(got):
                if docs[t] == d:
                    seen = True
                    break
            if not seen:
                docs[got] = d
                top_rows[f, got] = row
                got += 1
            i -= 1
        for q in range(quantiles):
            qlo = lo + q * n // quantiles
            size = lo + (q + 1) * n // quantiles - qlo
            m = min(per_q, size)
            c = 0
            for t in range(m - 1, -1, -1):  # strongest sample first
                pos = qlo + ((2 * t + 1) * size) // (2 * m)
                row = _key_row(keys[pos])
                shown = False
                for u in range(got):
                    if top_rows[f, u] == row:
                        shown = True
                        break
                if not shown:
                    q_rows[f, q, c] = row
                    c += 1


def select_contexts(grouped: Grouped, codes: Codes, features: np.ndarray, top_n: int, quantiles: int,
                    per_quantile: int) -> Selection:
    """Top contexts and quantile samples of ``features`` (ascending latent ids)."""
    features = np.ascontiguousarray(features, dtype=np.int64)
    F = len(features)
    top_rows = np.full((F, top_n), -1, np.int64)
    q_rows = np.full((F, quantiles, per_quantile), -1, np.int64)
    if F and len(grouped.keys):
        _select(grouped.keys, grouped.offsets, codes.doc_id, features, top_n, quantiles, per_quantile,
                top_rows, q_rows)
    # Flatten in display order: kind slot 0 = top, then quantile bins from the highest down.
    n_slots = top_n + quantiles * per_quantile
    rows = np.concatenate([top_rows, q_rows[:, ::-1, :].reshape(F, -1)], axis=1)
    kind = np.concatenate([np.full(top_n, -1), np.repeat(np.arange(quantiles)[::-1], per_quantile)]).astype(np.int8)
    rank = np.concatenate([np.arange(top_n), np.tile(np.arange(per_quantile), quantiles)]).astype(np.int32)
    # Ranks within a quantile bin count only the samples kept (samples shown as top are dropped).
    keep = rows >= 0
    feat = np.repeat(features.astype(np.int32), n_slots).reshape(F, n_slots)
    kinds = np.broadcast_to(kind, (F, n_slots))
    ranks = np.broadcast_to(rank, (F, n_slots))
    out_rows = rows[keep]
    values = _row_values(codes, feat[keep], out_rows)
    return Selection(feat[keep], kinds[keep].copy(), ranks[keep].copy(), out_rows, values)


@nb.njit(parallel=True, cache=True, boundscheck=False)
def _lookup(values, indices, features, rows, out):
    k = values.shape[1]
    for e in nb.prange(len(rows)):
        r, j = rows[e], features[e]
        a = np.float32(0.0)
        for s in range(k):
            if indices[r, s] == j:
                a = values[r, s]
                break
        out[e] = a


def _row_values(codes: Codes, features: np.ndarray, rows: np.ndarray) -> np.ndarray:
    out = np.zeros(len(rows), np.float32)
    if len(rows):
        _lookup(codes.values, codes.indices, np.ascontiguousarray(features, np.int32),
                np.ascontiguousarray(rows, np.int64), out)
    return out


@nb.njit(parallel=True, cache=True, boundscheck=False)
def _bounds(rows, doc_id, split_starts, before, after, starts, lens):
    for e in nb.prange(len(rows)):
        r = rows[e]
        s = np.searchsorted(split_starts, r, side="right") - 1
        lo_limit, hi_limit = max(split_starts[s], r - before), min(split_starts[s + 1] - 1, r + after)
        d = doc_id[r]
        a = r
        while a > lo_limit and doc_id[a - 1] == d:
            a -= 1
        b = r
        while b < hi_limit and doc_id[b + 1] == d:
            b += 1
        starts[e] = a
        lens[e] = b - a + 1


@nb.njit(parallel=True, cache=True, boundscheck=False)
def _fill(values, indices, token_id, features, starts, lens, offsets, tok_out, act_out):
    k = values.shape[1]
    for e in nb.prange(len(starts)):
        j = features[e]
        o = offsets[e]
        for t in range(lens[e]):
            r = starts[e] + t
            tok_out[o + t] = token_id[r]
            a = np.float32(0.0)
            for s in range(k):
                if indices[r, s] == j:
                    a = values[r, s]
                    break
            act_out[o + t] = a


class Windows(NamedTuple):
    offsets: np.ndarray
    """(E + 1,) int64: example e's tokens are ``[offsets[e], offsets[e + 1])`` of the flat arrays."""
    token_id: np.ndarray
    """(T,) int32."""
    acts: np.ndarray
    """(T,) float32: the example's latent on each token."""
    center: np.ndarray
    """(E,) int32 index of the firing in its window."""


def windows(codes: Codes, sel: Selection, before: int, after: int) -> Windows:
    """The token window around each selected firing (see the module docstring)."""
    E = len(sel.row)
    starts = np.zeros(E, np.int64)
    lens = np.zeros(E, np.int64)
    if E:
        _bounds(sel.row, codes.doc_id, codes.split_starts(), before, after, starts, lens)
    offsets = np.zeros(E + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    tok = np.zeros(int(offsets[-1]), np.int32)
    acts = np.zeros(int(offsets[-1]), np.float32)
    if E:
        _fill(codes.values, codes.indices, codes.token_id, sel.feature, starts, lens, offsets, tok, acts)
    return Windows(offsets, tok, acts, (sel.row - starts).astype(np.int32))


__all__ = ["Selection", "Windows", "select_contexts", "windows"]
