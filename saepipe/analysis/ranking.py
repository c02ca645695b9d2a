"""The k largest entries of each row of a matrix, sorted: the multi-threaded exact top-k of training."""

from __future__ import annotations

import numpy as np

from saepipe.training import cpu_kernels as ck


def top_per_row(matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(columns (n, k) int32, values (n, k) float32) of the k largest entries of each row, largest
    first (ties: the smaller column first). k is capped at the number of columns."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    n, w = matrix.shape
    k = min(int(k), w)
    values = np.empty((n, k), np.float32)
    columns = np.empty((n, k), np.int32)
    if n == 0 or k == 0:
        return columns, values
    ck.topk_rows(matrix, np.zeros(w, np.float32), k, ck.lanes_for(w, k), values, columns,
                 np.empty(0, np.int32), np.empty((n, 0), np.float32))
    order = np.lexsort((columns, -values), axis=-1)
    return np.take_along_axis(columns, order, 1), np.take_along_axis(values, order, 1)


__all__ = ["top_per_row"]
