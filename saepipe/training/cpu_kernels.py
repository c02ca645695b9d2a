"""Multi-threaded CPU kernels (numba) for the sparse parts of a TopK-SAE training step.

MLX on CPU runs argpartition, gather, scatter, elementwise ops and Adam on one core, so there a
TopK step costs several times its one dense encoder matmul. These kernels do the sparse work in the shape it
really has, on every core, reading each big array about once:

- ``topk_rows``: per row, maxima of strided column groups, a threshold from them, then a
  branch-free selection among the few candidates at or above it: one vectorized read of
  (n, d_hidden), exact.
- ``decode_residual``: ``e = x - (b_dec + sum_j v_j W_dec[i_j])`` row by row (decoder rows
  prefetched ahead: the row gathers are bound by memory latency; four rows per sweep of the
  accumulator, so it is loaded and stored once per four).
- ``latent_grads``: the value gradients ``g . W_dec[j]`` and the weight gradients of the active
  latents only. The (row, slot) pairs are grouped by latent first (``group_by_latent``, a counting
  sort), so each latent's gradient row is summed in cache and written once, with streaming stores
  (no scatter races, no dense (n, d_hidden) code); two passes, one (n, d) table gathered in each;
  the decoder's parallel component is removed and squared norms are taken on the way. Four pairs
  per sweep of the accumulator row, as in the decode.
- ``adam_rows``: bias-corrected Adam over rows in place, decoder rows renormalized in the same pass.

All kernels work on float32 C-contiguous numpy arrays (some are zero-copy views of MLX arrays) and
write into arrays they are given; hot loops sum in float32, as the reference's MLX matmuls do.
``saepipe.training.cpu_step`` assembles them into a training step. What each choice gained is in
docs/performance.md.
"""

from __future__ import annotations

import math
import os
import platform
from typing import NamedTuple

# numba's OpenMP workers spin after each parallel region by default, stealing the cores from the
# OpenBLAS matmul that follows (AuxK's matmuls ran markedly slower). Read when libgomp loads, i.e. at
# the first parallel kernel call, so setting it here (before numba) is early enough.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")

CACHE_LINE = 64
"""Bytes per cache line: the alignment streaming stores need and row gathers like."""

_LINE = CACHE_LINE // 4  # float32s per cache line


def aligned_empty(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """An uninitialised array whose data starts on a cache line (numpy and MLX align less).

    With d_model * 4 a multiple of 64 every row then starts on a line too; vector loads of
    misaligned rows straddle lines and make the kernels' row gathers slower, and the streaming
    stores of ``_write_row`` need aligned rows (``streamable``)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(size + CACHE_LINE, np.uint8)
    start = -raw.ctypes.data % CACHE_LINE
    return raw[start:start + size].view(dtype).reshape(shape)


@intrinsic
def _prefetch(typingctx, arr, index):
    """Hint the CPU to fetch the cache line holding ``arr[index]`` (1-D array): LLVM's prefetch
    (read, keep in all cache levels). Numba has no such function; random row gathers need it, as
    the hardware prefetcher cannot guess the next row."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        array_type, index_type = signature.args
        array = context.make_array(array_type)(context, builder, args[0])
        i = context.cast(builder, args[1], index_type, types.intp)
        pointer = cgutils.get_item_pointer(context, builder, array_type, array, [i], wraparound=False)
        i32 = ir.IntType(32)
        declared = ir.FunctionType(ir.VoidType(), [pointer.type, i32, i32, i32])
        function = cgutils.get_or_insert_function(builder.module, declared, "llvm.prefetch.p0")
        builder.call(function, [pointer, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(arr, index), codegen


@intrinsic
def _stream16(typingctx, dst, src, index):
    """``dst[index:index + 16] = src[index:index + 16]`` with a non-temporal (streaming) store:
    the line goes to memory without being read first or evicting cached data. ``dst + index``
    must be 64-byte aligned. Follow a run of them with ``_store_fence()``."""
    if not all(isinstance(a, types.Array) and a.ndim == 1 for a in (dst, src)):
        return None

    def codegen(context, builder, signature, args):
        dst_type, src_type, index_type = signature.args
        i = context.cast(builder, args[2], index_type, types.intp)
        pointers = [cgutils.get_item_pointer(context, builder, t, context.make_array(t)(context, builder, a),
                                             [i], wraparound=False)
                    for t, a in ((dst_type, args[0]), (src_type, args[1]))]
        vector = ir.VectorType(ir.FloatType(), 16).as_pointer()
        values = builder.load(builder.bitcast(pointers[1], vector), align=4)
        store = builder.store(values, builder.bitcast(pointers[0], vector), align=64)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))
        return context.get_dummy_value()

    return types.void(dst, src, index), codegen


@intrinsic
def _store_fence(typingctx):
    """Streaming stores before it are visible to other threads after it (``sfence`` on x86, a
    full fence elsewhere)."""

    def codegen(context, builder, signature, args):
        if _X86:
            declared = ir.FunctionType(ir.VoidType(), [])
            builder.call(cgutils.get_or_insert_function(builder.module, declared, "llvm.x86.sse.sfence"), [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


def streamable(*arrays: np.ndarray) -> bool:
    """Whether every row of each (C-contiguous float32) array starts on a 64-byte line, as the
    streaming stores of ``_write_row`` require (a misaligned one faults)."""
    return all(a.dtype == np.float32 and a.flags.c_contiguous and a.ctypes.data % CACHE_LINE == 0
               and (a.shape[-1] * 4) % CACHE_LINE == 0 for a in arrays)


@nb.njit(inline="always")
def _write_row(dst, src, stream):
    """``dst[:] = src``; with ``stream`` (dst 64-byte aligned, a multiple of 16 long) as streaming
    stores, for output rows nothing reads soon: no read-for-ownership, no eviction of the tables
    being gathered."""
    if stream:
        for c in range(0, dst.size, 16):
            _stream16(dst, src, c)
    else:
        for c in range(dst.size):
            dst[c] = src[c]


@nb.njit(inline="always")
def _prefetch_row(row):
    for c in range(0, row.size, _LINE):
        _prefetch(row, c)


def lanes_for(width: int, k: int) -> int:
    """Slices per row in ``topk_rows`` (each column group takes one column of every slice):
    ~sqrt(width / k) balances its scalar stages."""
    return max(1, min(width // max(k, 1), round(math.sqrt(width / max(k, 1)))))


@nb.njit(inline="always")
def _count_ge(a, t):
    c = 0
    for i in range(a.size):
        c += a[i] >= t
    return c


@nb.njit(inline="always")
def _bisect_top_k(values, lo, hi, k):
    """Narrow [lo, hi] (with >= k entries of ``values`` >= lo) for the k largest: returns (lo, hi)
    with fewer than k entries >= hi and the entries in [lo, hi) all equal to lo (adjacent floats:
    ties), or lo == hi with exactly k entries >= it. Bisection on the value with vectorized
    counts: no sorting, few branches."""
    while lo < hi:
        mid = np.float32(0.5) * (lo + hi)
        if not lo < mid < hi:
            break
        count = _count_ge(values, mid)
        if count > k:
            lo = mid
        elif count < k:
            hi = mid
        else:
            return mid, mid
    return lo, hi


@nb.njit(inline="always")
def _take_top(vals, cols, m, k, out_v, out_c):
    """The k largest of ``vals[:m]`` (with ``cols``) into ``out_v[:k]``/``out_c[:k]`` (m >= k,
    no NaNs; the outputs hold >= m + 1 entries): thresholds from ``_bisect_top_k``, then
    branch-free compaction of the entries >= hi, then of ties in [lo, hi) up to k. Unlike a
    quickselect this has no data-dependent branches to mispredict."""
    cand = vals[:m]
    lo, hi = cand.min(), cand.max()
    if _count_ge(cand, hi) >= k:  # >= k ties at the maximum
        lo = hi
    lo, hi = _bisect_top_k(cand, lo, hi, k)
    j = 0
    for i in range(m):
        out_v[j] = cand[i]
        out_c[j] = cols[i]
        j += cand[i] >= hi
    for i in range(m):
        out_v[j] = cand[i]
        out_c[j] = cols[i]
        j += (cand[i] >= lo) & (cand[i] < hi) & (j < k)


@nb.njit(inline="always")
def _group_threshold(gm, k):
    """A value t with between k and 1.25k entries of ``gm`` >= t when one exists (bisection on the
    value range with vectorized counts; branch-light, unlike a quickselect). Always >= k entries."""
    lo, hi = gm.min(), gm.max()
    for _ in range(64):
        mid = np.float32(0.5) * (lo + hi)
        if not lo < mid < hi:
            break
        count = _count_ge(gm, mid)
        if count < k:
            hi = mid
        else:
            lo = mid
            if count <= k + k // 4:
                break
    return lo


@nb.njit(inline="always", fastmath=True)
def _group_maxima(row, bias, lanes, g, gm):
    """``gm[c] = max_i row[i*g + c] + bias[i*g + c]`` for c < g: an elementwise max of slices.
    Written over slice views so LLVM sees contiguous, non-overlapping loops and vectorizes the
    max (compare + blend on whole registers) instead of computing scalar maxima element by element."""
    for c in range(g):
        gm[c] = row[c] + bias[c]
    for i in range(1, lanes):
        r, b = row[i * g:(i + 1) * g], bias[i * g:(i + 1) * g]
        for c in range(g):
            gm[c] = max(gm[c], r[c] + b[c])


_TINY = np.float32(1e-38)  # "count >= _TINY": the positive entries (anything smaller counts as 0)

_PARTS = 16  # row blocks of the kernels that also sum columns (one float64 partial row each)


@nb.njit(parallel=True, cache=True, fastmath={"reassoc", "nsz"}, boundscheck=False)
def standardize(x, mean, std, b_dec, xn_out, xc_out):
    """``xn = (x - mean) / std`` and ``xc = xn - b_dec`` in float32 (IEEE: divisions exact, only
    the sums reassociated). Returns xn's float64 column sums and sum of squares (for its variance)."""
    n, d = x.shape
    parts = max(1, min(_PARTS, n))
    sums, squares = np.zeros((parts, d)), np.zeros(parts)
    for q in nb.prange(parts):
        total = 0.0
        for r in range(q * n // parts, (q + 1) * n // parts):
            row_sq = np.float32(0.0)
            for c in range(d):
                v = (x[r, c] - mean[c]) / std[c]
                xn_out[r, c] = v
                xc_out[r, c] = v - b_dec[c]
                sums[q, c] += v
                row_sq += v * v
            total += row_sq
        squares[q] = total
    return sums.sum(axis=0), squares.sum()


@nb.njit(parallel=True, cache=True, fastmath=False, boundscheck=False)
def topk_rows(pre, bias, k, lanes, out_values, out_indices, columns, out_columns):
    """The k largest entries of each row of ``pre + bias`` (n, w) + (w,): values and int32 column
    indices (n, k). (Adding the bias here saves a pass over the (n, w) pre-activations.) Also
    ``out_columns[r, i] = max(pre[r, c] + bias[c], 0)`` for ``c = columns[i]`` (AuxK's dead
    latents; pass empty arrays for none), read while the row is in cache.

    Exactly k per row, distinct columns, in no particular order. Per row, viewed as ``lanes``
    consecutive slices of ``g = w // lanes`` columns (group c = columns c, g + c, 2g + c, ...):
    (1) group maxima ``gm[c] = max_i row[i*g + c]``, an elementwise max of slices (vectorized,
    bound by memory bandwidth); (2) a threshold t with >= k (and about <= 1.25k) group maxima >= t;
    (3) the entries >= t of the groups whose maximum is >= t and of the tail columns beyond
    ``lanes * g`` (branch-free compaction); (4) the k largest of those few (``_take_top``).
    Exact: those groups hold >= k entries >= t, and every entry > t lies in one of them.
    """
    n, w = pre.shape
    g = w // lanes
    if g < k:
        g, lanes = w, 1
    body = g * lanes
    chunk = 16
    for ch in nb.prange((n + chunk - 1) // chunk):
        gm = np.empty(g, np.float32)
        groups = np.empty(g, np.int32)
        cand_v = np.empty(w, np.float32)
        cand_c = np.empty(w, np.int32)
        top_v = np.empty(w + 1, np.float32)
        top_c = np.empty(w + 1, np.int32)
        for r in range(ch * chunk, min(n, (ch + 1) * chunk)):
            row = pre[r]
            _group_maxima(row, bias, lanes, g, gm)
            t = _group_threshold(gm, k)
            n_groups = 0
            for c in range(g):
                groups[n_groups] = c
                n_groups += gm[c] >= t
            m = 0
            for i in range(lanes):  # slice by slice: the selected groups' columns in increasing order
                row_i, bias_i = row[i * g:(i + 1) * g], bias[i * g:(i + 1) * g]
                for q in range(n_groups):
                    c = groups[q]
                    v = row_i[c] + bias_i[c]
                    cand_v[m] = v
                    cand_c[m] = i * g + c
                    m += v >= t
            for col in range(body, w):
                v = row[col] + bias[col]
                cand_v[m] = v
                cand_c[m] = col
                m += v >= t
            if m < k:  # only with NaNs in the row: any k distinct columns (training stops on the NaN)
                for j in range(k):
                    top_v[j] = row[j] + bias[j]
                    top_c[j] = j
            else:
                _take_top(cand_v, cand_c, m, k, top_v, top_c)
            for j in range(k):
                out_values[r, j] = top_v[j]
                out_indices[r, j] = top_c[j]
            for i in range(columns.size):
                col = columns[i]
                out_columns[r, i] = max(row[col] + bias[col], 0.0)


@nb.njit(parallel=True, cache=True, fastmath=True, boundscheck=False)
def decode_residual(x, b_dec, W_dec, indices, pre_values, e_out, sse_rows):
    """Per row r: ``e = x - (b_dec + sum_j relu(pv_j) W_dec[i_j])`` and ``sse_rows[r] = |e|^2``.
    Returns e's float64 column sums."""
    n, d = x.shape
    k = indices.shape[1]
    flat = indices.ravel()
    parts = max(1, min(_PARTS, n))
    sums = np.zeros((parts, d))
    for q in nb.prange(parts):
        for r in range(q * n // parts, (q + 1) * n // parts):
            acc = e_out[r]
            for c in range(d):
                acc[c] = b_dec[c]
            j = 0
            while j + 4 <= k:  # four rows per sweep: one load and store of acc for four rows
                for ahead in range(r * k + j + 4, min(r * k + j + 8, flat.size)):
                    _prefetch_row(W_dec[flat[ahead]])  # the next sweep's rows (maybe the next token's)
                zero = np.float32(0.0)
                v1, v2 = max(pre_values[r, j], zero), max(pre_values[r, j + 1], zero)
                v3, v4 = max(pre_values[r, j + 2], zero), max(pre_values[r, j + 3], zero)
                w1, w2 = W_dec[indices[r, j]], W_dec[indices[r, j + 1]]
                w3, w4 = W_dec[indices[r, j + 2]], W_dec[indices[r, j + 3]]
                for c in range(d):
                    acc[c] += v1 * w1[c] + v2 * w2[c] + v3 * w3[c] + v4 * w4[c]
                j += 4
            for tail in range(j, k):
                v = pre_values[r, tail]
                if v > 0:
                    w = W_dec[indices[r, tail]]
                    for c in range(d):
                        acc[c] += v * w[c]
            s = np.float32(0.0)
            for c in range(d):
                acc[c] = x[r, c] - acc[c]
                s += acc[c] * acc[c]
                sums[q, c] += acc[c]
            sse_rows[r] = s
    return sums.sum(axis=0)


@nb.njit(cache=True, boundscheck=False)
def group_by_latent(indices, width):
    """Counting sort of the flat (row, slot) positions of ``indices`` (n, k) by latent.

    Returns ``(offsets, order, rows)``: the positions of latent j are
    ``order[offsets[j]:offsets[j + 1]]``, in increasing order (so sums over them are
    deterministic), and ``rows[i] = order[i] // k`` (their rows, so no kernel divides).
    """
    n, k = indices.shape
    counts = np.zeros(width + 1, np.int64)
    for r in range(n):
        for s in range(k):
            counts[indices[r, s] + 1] += 1
    offsets = np.cumsum(counts)
    fill = offsets[:-1].copy()
    order = np.empty(n * k, np.int64)
    rows = np.empty(n * k, np.int32)
    for r in range(n):
        for s in range(k):
            j = indices[r, s]
            order[fill[j]] = r * k + s
            rows[fill[j]] = r
            fill[j] += 1
    return offsets, order, rows


@nb.njit(inline="always")
def _remove_parallel(g, w):
    """``g -= (g . w) w`` in place (w a unit row); returns ``|g|^2`` after."""
    par = np.float32(0.0)  # float32 sums in the hot loops: float64 ones halve the vector width
    for c in range(g.size):
        par += g[c] * w[c]
    sq = np.float32(0.0)
    for c in range(g.size):
        g[c] -= par * w[c]
        sq += g[c] * g[c]
    return sq


_LATENT_CHUNK = 64  # latents per parallel work item in the gradient passes (one set of temporaries each)


class LatentGrads(NamedTuple):
    """Outputs of ``latent_grads``, written in place (one row or entry per latent unless noted)."""

    dW_dec: np.ndarray
    """(h, d) decoder gradient, its component along ``W_dec[j]`` removed (tied: encoder part included)."""
    dW_enc: np.ndarray
    """(h, d) encoder gradient (not written when tied: pass ``dW_dec``)."""
    db_enc: np.ndarray
    """(h,) float32 encoder bias gradient."""
    fired: np.ndarray
    """(h,) int64 positive activations of the latent in the batch."""
    sq_dec: np.ndarray
    """(h,) float32 squared norm of the latent's ``dW_dec`` row."""
    sq_enc: np.ndarray
    """(h,) float32 squared norm of its ``dW_enc`` row (0 when tied)."""
    gpre: np.ndarray
    """(n, k) float32 pre-activation gradient of each (row, slot) of the code."""


def latent_grads(groups: tuple, pre_values: np.ndarray, e: np.ndarray, xc: np.ndarray, gscale: np.float32,
                 l1_grad: np.float32, W_dec: np.ndarray, tied: bool, aux: tuple, out: LatentGrads) -> None:
    """Pre-activation and weight gradients of the active latents, one latent row at a time.

    ``groups``: ``group_by_latent``'s (offsets, order, rows). ``gpre[r, s] = [pv > 0] (gscale * e[r] .
    W_dec[j] + l1_grad)`` for latent j's (row, slot) pairs, ``dW_dec[j] = gscale * sum relu(pv) e[r]``
    and ``dW_enc[j] = sum gpre xc[r]`` over those pairs, plus latent j's AuxK rows: ``aux`` is
    ``(slot, dW_dec rows, dW_enc rows, db_enc entries)`` with ``slot[j]`` the AuxK row of latent j
    (-1: none). With ``tied`` the encoder gradient is added to the decoder's. Then the decoder
    gradient's component along ``W_dec[j]`` is removed. Output rows are written with streaming
    stores when ``streamable(out.dW_dec, out.dW_enc)``.

    Two passes (two kernels), the first gathering rows of ``e`` only, the second rows of ``xc``: one
    (n, d) table at a time stays in the last-level cache (gathering from both at once was slower).
    """
    stream = streamable(out.dW_dec, out.dW_enc)
    slot, aux_dW_dec, aux_dW_enc, aux_db_enc = aux
    decoder_grads(groups, pre_values, e, gscale, l1_grad, W_dec, slot, aux_dW_dec, not tied, stream,
                  out.gpre, out.dW_dec, out.fired, out.sq_dec)
    encoder_grads(groups, out.gpre, xc, W_dec, slot, aux_dW_enc, aux_db_enc, tied, stream,
                  out.dW_dec, out.dW_enc, out.db_enc, out.sq_dec, out.sq_enc)


@nb.njit(inline="always")
def _largest_group(offsets):
    most = 0
    for j in range(offsets.size - 1):
        most = max(most, offsets[j + 1] - offsets[j])
    return most


@nb.njit(parallel=True, cache=True, fastmath=True, boundscheck=False)
def decoder_grads(groups, pre_values, e, gscale, l1_grad, W_dec, aux_slot, aux_dW_dec, project, stream,
                  gpre, dW_dec, fired, sq_dec):
    """Pass 1 of ``latent_grads``: ``gpre`` (written while ``e[r]`` is in cache for the decoder
    sum), ``dW_dec`` rows with their AuxK rows, ``fired``; with ``project`` (untied: the row is
    complete) the component along ``W_dec[j]`` is removed and ``sq_dec`` set here."""
    offsets, order, rows = groups
    width, d = W_dec.shape
    values, gpre_flat = pre_values.ravel(), gpre.ravel()  # indexed by flat (row, slot) position
    most = _largest_group(offsets)
    for q in nb.prange((width + _LATENT_CHUNK - 1) // _LATENT_CHUNK):
        ta = np.empty(d, np.float32)
        live = np.empty(most, np.int64)  # positions (into order) of the latent's positive pairs
        for j in range(q * _LATENT_CHUNK, min(width, (q + 1) * _LATENT_CHUNK)):
            w = W_dec[j]
            for c in range(d):
                ta[c] = 0.0
            nf = 0
            for p in range(offsets[j], offsets[j + 1]):
                live[nf] = p
                nf += values[order[p]] > 0
                gpre_flat[order[p]] = 0.0  # overwritten below where positive
            i = 0
            while i + 4 <= nf:  # four pairs per sweep: one load and store of ta for four rows
                p1, p2, p3, p4 = live[i], live[i + 1], live[i + 2], live[i + 3]
                v1, v2, v3, v4 = values[order[p1]], values[order[p2]], values[order[p3]], values[order[p4]]
                e1, e2, e3, e4 = e[rows[p1]], e[rows[p2]], e[rows[p3]], e[rows[p4]]
                d1 = d2 = d3 = d4 = np.float32(0.0)
                for c in range(d):
                    ta[c] += v1 * e1[c] + v2 * e2[c] + v3 * e3[c] + v4 * e4[c]
                    d1 += w[c] * e1[c]
                    d2 += w[c] * e2[c]
                    d3 += w[c] * e3[c]
                    d4 += w[c] * e4[c]
                gpre_flat[order[p1]] = gscale * d1 + l1_grad
                gpre_flat[order[p2]] = gscale * d2 + l1_grad
                gpre_flat[order[p3]] = gscale * d3 + l1_grad
                gpre_flat[order[p4]] = gscale * d4 + l1_grad
                i += 4
            for tail in range(i, nf):
                p = live[tail]
                v, er = values[order[p]], e[rows[p]]
                dot = np.float32(0.0)
                for c in range(d):
                    ta[c] += v * er[c]
                    dot += w[c] * er[c]
                gpre_flat[order[p]] = gscale * dot + l1_grad
            for c in range(d):
                ta[c] *= gscale
            slot = aux_slot[j]
            if slot >= 0:
                for c in range(d):
                    ta[c] += aux_dW_dec[slot, c]
            if project:
                sq_dec[j] = _remove_parallel(ta, w)
            fired[j] = nf
            _write_row(dW_dec[j], ta, stream)
        _store_fence()


@nb.njit(parallel=True, cache=True, fastmath=True, boundscheck=False)
def encoder_grads(groups, gpre, xc, W_dec, aux_slot, aux_dW_enc, aux_db_enc, tied, stream,
                  dW_dec, dW_enc, db_enc, sq_dec, sq_enc):
    """Pass 2 of ``latent_grads``: ``dW_enc`` rows (tied: added to ``dW_dec`` and projected there),
    their AuxK rows, ``db_enc``, ``sq_enc`` (and ``sq_dec`` when tied)."""
    offsets, order, rows = groups
    width, d = W_dec.shape
    gpre_flat = gpre.ravel()
    most = _largest_group(offsets)
    for q in nb.prange((width + _LATENT_CHUNK - 1) // _LATENT_CHUNK):
        tb = np.empty(d, np.float32)
        live = np.empty(most, np.int64)  # positions of the pairs with a gradient
        for j in range(q * _LATENT_CHUNK, min(width, (q + 1) * _LATENT_CHUNK)):
            for c in range(d):
                tb[c] = 0.0
            sb = 0.0
            m = 0
            for p in range(offsets[j], offsets[j + 1]):
                gp = gpre_flat[order[p]]  # 0 where the activation is not positive
                live[m] = p
                m += gp != 0
                sb += gp
            i = 0
            while i + 4 <= m:
                p1, p2, p3, p4 = live[i], live[i + 1], live[i + 2], live[i + 3]
                g1, g2 = gpre_flat[order[p1]], gpre_flat[order[p2]]
                g3, g4 = gpre_flat[order[p3]], gpre_flat[order[p4]]
                x1, x2, x3, x4 = xc[rows[p1]], xc[rows[p2]], xc[rows[p3]], xc[rows[p4]]
                for c in range(d):
                    tb[c] += g1 * x1[c] + g2 * x2[c] + g3 * x3[c] + g4 * x4[c]
                i += 4
            for tail in range(i, m):
                p = live[tail]
                gp, xr = gpre_flat[order[p]], xc[rows[p]]
                for c in range(d):
                    tb[c] += gp * xr[c]
            slot = aux_slot[j]
            if slot >= 0:
                for c in range(d):
                    tb[c] += aux_dW_enc[slot, c]
                sb += aux_db_enc[slot]
            db_enc[j] = sb
            if tied:
                ta = dW_dec[j]
                for c in range(d):
                    ta[c] += tb[c]
                sq_dec[j] = _remove_parallel(ta, W_dec[j])
                sq_enc[j] = 0.0
            else:
                qb = np.float32(0.0)
                for c in range(d):
                    qb += tb[c] * tb[c]
                sq_enc[j] = qb
                _write_row(dW_enc[j], tb, stream)
        _store_fence()


@nb.njit(parallel=True, cache=True, fastmath=True, boundscheck=False)
def adam_rows(p, m, v, g, lr, c1, c2, scale, beta1, beta2, eps, unit_rows, norm_floor):
    """Bias-corrected Adam on the rows of ``p`` in place with gradient ``scale * g``; with
    ``unit_rows`` each updated row is renormalized to unit L2 norm (divided by at least ``norm_floor``).
    The constants are arguments (float32), not globals: numba freezes globals into its cache."""
    rows, d = p.shape
    one = np.float32(1.0)
    rest1, rest2 = one - beta1, one - beta2  # all float32, as the reference (a literal 1 would make float64)
    for r in nb.prange(rows):
        pr, mr, vr, gr = p[r], m[r], v[r], g[r]
        nrm = np.float32(0.0)
        for c in range(d):
            gc = scale * gr[c]
            mc = beta1 * mr[c] + rest1 * gc
            vc = beta2 * vr[c] + rest2 * gc * gc
            mr[c] = mc
            vr[c] = vc
            pc = pr[c] - lr * (mc / c1) / (np.sqrt(vc / c2) + eps)
            pr[c] = pc
            nrm += pc * pc
        if unit_rows:
            inv = one / max(np.sqrt(nrm), norm_floor)
            for c in range(d):
                pr[c] *= inv


@nb.njit(parallel=True, cache=True, boundscheck=False)
def keep_top_k(a, k):
    """Zero all but the k largest entries of each row of the non-negative ``a`` (n, w), in place
    (ties: leftmost kept). Rows with <= k positive entries are left as they are (zeros are zeros).
    The threshold comes from ``_bisect_top_k``.
    """
    n, w = a.shape
    for r in nb.prange(n):
        row = a[r]
        if _count_ge(row, _TINY) <= k:  # at most k positive entries
            continue
        lo, hi = _bisect_top_k(row, np.float32(0.0), row.max(), k)
        quota_hi = min(_count_ge(row, hi), k)  # the leftmost of the entries >= hi ...
        quota_lo = k - quota_hi  # ... then of those in [lo, hi) (equal to lo)
        for c in range(w):
            v = row[c]
            if v >= hi:
                if quota_hi > 0:
                    quota_hi -= 1
                    continue
            elif v >= lo and quota_lo > 0:
                quota_lo -= 1
                continue
            row[c] = 0.0


@nb.njit(parallel=True, cache=True, fastmath=True, boundscheck=False)
def zero_where_not_positive(out, a):
    """``out[a <= 0] = 0`` in place (``out`` and ``a`` of one shape); returns the float64 column
    sums of the result."""
    n, w = out.shape
    parts = max(1, min(_PARTS, n))
    sums = np.zeros((parts, w))
    for q in nb.prange(parts):
        for r in range(q * n // parts, (q + 1) * n // parts):
            for c in range(w):
                if not a[r, c] > 0:
                    out[r, c] = 0.0
                sums[q, c] += out[r, c]
    return sums.sum(axis=0)


@nb.njit(parallel=True, cache=True, fastmath=True, boundscheck=False)
def subtract_sum_sq_scale(r, e, scale):
    """In place ``r = scale * (r - e)``; returns ``sum (r - e)^2`` (before scaling) in float64."""
    n, d = r.shape
    total = 0.0
    for i in nb.prange(n):
        s = 0.0
        for c in range(d):
            t = r[i, c] - e[i, c]
            s += t * t
            r[i, c] = scale * t
        total += s
    return total


__all__ = ["CACHE_LINE", "LatentGrads", "adam_rows", "aligned_empty", "decode_residual", "decoder_grads",
           "encoder_grads", "group_by_latent", "keep_top_k", "latent_grads", "standardize", "streamable", "subtract_sum_sq_scale",
           "topk_rows", "zero_where_not_positive"]
