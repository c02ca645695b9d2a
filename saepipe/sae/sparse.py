"""Sparse codes in MLX: exact top-k selection and decoding from ``(values, indices)``.

A TopK code keeps k of d_hidden latents per row, so it is held as two (..., k) arrays instead of a
mostly-zero (..., d_hidden) one. These are the operations every user of such codes needs (the SAE's
``encode_topk``/``decode_topk``, the training steps, validation): they are exact, and written for
MLX on a small CPU, where only the float32 matmul is multi-threaded:

- ``topk_indices``: ``argpartition`` over all d_hidden columns costs a multiple of the encoder
  matmul; a two-stage selection (max of column blocks -> the k best blocks -> argpartition over
  their k*block entries) reads the pre-activations once and partitions ~2*sqrt(k*d_hidden) entries
  per row instead of d_hidden, and is still exact.
- ``decode_rows``: ``sum_j v_j W_dec[i_j]`` gathers the k active rows of ``W_dec`` in small row
  chunks (cache-resident) and contracts them with a batched matmul, instead of a dense masked
  matmul or one huge gather (intermediates of more than a few MB cost page faults on top).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import mlx.core as mx

DECODE_ROWS_TIMES_K = 1024
"""Rows per chunk times k in ``decode_rows``: the gathered (rows, k, d_model) block stays a few MB."""


class TopK(NamedTuple):
    values: mx.array
    """(..., k) the selected entries (as given: apply ReLU yourself when the input was not ReLU'd)."""
    indices: mx.array
    """(..., k) uint32 column indices, distinct within a row, in no particular order."""


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

    Any leading shape. Indices carry no gradient; values are differentiable w.r.t. ``pre`` (a
    take_along_axis).
    """
    flat = mx.stop_gradient(pre).reshape(-1, pre.shape[-1])
    indices = mx.stop_gradient(topk_indices(flat, k, block).reshape(*pre.shape[:-1], k))
    return TopK(mx.take_along_axis(pre, indices, axis=-1), indices)


def to_dense(values: mx.array, indices: mx.array, width: int) -> mx.array:
    """Scatter a sparse (..., k) code into a dense (..., width) array of zeros."""
    zeros = mx.zeros((*values.shape[:-1], width), dtype=values.dtype)
    return mx.put_along_axis(zeros, indices, values, axis=-1)


def row_chunks(n: int, k: int, chunk: int | None = None) -> list[tuple[int, int]]:
    """(start, end) row ranges of ``chunk`` rows (default: ``DECODE_ROWS_TIMES_K // k``) covering n."""
    size = chunk or max(1, DECODE_ROWS_TIMES_K // k)
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def decode_rows(values: mx.array, indices: mx.array, W_dec: mx.array, chunk: int | None = None) -> mx.array:
    """``sum_j values[r, j] * W_dec[indices[r, j]]`` (n, d_model), no bias: gather + batched matmul.

    Works in row chunks so the gathered (rows, k, d_model) block stays cache-resident.
    """
    n, k = values.shape
    parts = [(values[s:e, None, :] @ W_dec[indices[s:e]]).squeeze(1) for s, e in row_chunks(n, k, chunk)]
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)


__all__ = ["DECODE_ROWS_TIMES_K", "TopK", "decode_rows", "default_block", "row_chunks", "to_dense",
           "topk", "topk_indices"]
