"""The encode pass: every row's TopK code (values and latent indices), written to a scratch file.

``Encoder`` is the SAE's encoder as training runs it on a CPU: inputs normalized as the SAE does,
``pre = (x_n - b_dec) @ W_enc.T`` as one MLX matmul (OpenBLAS, every core), then the exact
multi-threaded top-k of ``saepipe.training.cpu_kernels.topk_rows`` (which adds ``b_enc``). ReLU:
a kept latent whose value is <= 0 does not fire (its value is stored as 0).

``encode_sources`` streams the rows of each split chunk by chunk and appends the codes, token ids
and document ids to memory-mapped files in a scratch folder (``Codes``): only one chunk's
activations and pre-activations are ever in memory, whatever the number of rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np

from saepipe.analysis.rows import RowSource
from saepipe.runtime.memory import reuse_freed_memory
from saepipe.training import cpu_kernels as ck


class Encoder:
    """``encode(x)`` -> (values (n, k) float32 >= 0, indices (n, k) int32): the SAE's TopK code."""

    def __init__(self, sae: Any) -> None:
        self.sae = sae
        self.k = int(sae.k)
        self.d_hidden = int(sae.d_hidden)
        self.b_enc = np.ascontiguousarray(np.asarray(sae.b_enc, dtype=np.float32))
        self.lanes = ck.lanes_for(self.d_hidden, self.k)
        self._no_columns = np.empty(0, np.int32)

    def pre_activations(self, x: np.ndarray) -> np.ndarray:
        """(x_n - b_dec) @ W_enc.T as float32 numpy (b_enc not added: the top-k adds it)."""
        xm = mx.array(np.ascontiguousarray(x, dtype=np.float32))
        pre = (self.sae.normalize(xm) - self.sae.b_dec) @ self.sae.W_encoder.T
        mx.eval(pre)
        return np.asarray(pre)

    def encode(self, x: np.ndarray, values: np.ndarray | None = None,
               indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Codes of the rows of ``x`` (n, d_model), written into ``values``/``indices`` when given."""
        n = len(x)
        values = np.empty((n, self.k), np.float32) if values is None else values
        indices = np.empty((n, self.k), np.int32) if indices is None else indices
        if n == 0:
            return values, indices
        pre = self.pre_activations(x)
        ck.topk_rows(pre, self.b_enc, self.k, self.lanes, values, indices, self._no_columns,
                     np.empty((n, 0), np.float32))
        np.maximum(values, 0.0, out=values)  # ReLU: a kept latent at <= 0 does not fire
        return values, indices


class Split(NamedTuple):
    name: str
    start: int
    """First row of the split in the codes."""
    stop: int


class Codes(NamedTuple):
    """The code of every row (memory-mapped arrays in the scratch folder), splits one after another."""

    values: np.ndarray
    """(n, k) float32: activation of each kept latent (0: did not fire)."""
    indices: np.ndarray
    """(n, k) int32: the kept latents."""
    token_id: np.ndarray
    """(n,) int32."""
    doc_id: np.ndarray
    """(n,) int64."""
    splits: tuple[Split, ...]
    d_hidden: int

    @property
    def n_rows(self) -> int:
        return int(self.values.shape[0])

    def split_starts(self) -> np.ndarray:
        """First row of each split, then the total: (n_splits + 1,) int64."""
        return np.array([s.start for s in self.splits] + [self.n_rows], dtype=np.int64)


def scratch_array(folder: Path, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A new array backed by a file in ``folder`` (page cache, not process memory)."""
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    mm = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
    return np.asarray(mm)  # a plain ndarray view of the mapping (numba takes it as is)


def encode_sources(sources: Sequence[RowSource], encoder: Encoder, scratch: Path, chunk_rows: int,
                   progress: Any = None) -> Codes:
    """Encode every row of ``sources`` (in order) into ``Codes`` files under ``scratch``.

    ``progress(rows_done)`` is called after each chunk when given.
    """
    n = sum(int(s.n_rows) for s in sources)
    k = encoder.k
    values = scratch_array(scratch, "values", (n, k), np.float32)
    indices = scratch_array(scratch, "indices", (n, k), np.int32)
    token_id = scratch_array(scratch, "token_id", (n,), np.int32)
    doc_id = scratch_array(scratch, "doc_id", (n,), np.int64)
    splits, row = [], 0
    with reuse_freed_memory():  # each chunk's (rows, d_hidden) matmul output reuses the last one's pages
        for source in sources:
            start = row
            row = _encode_split(source, encoder, chunk_rows, row, (values, indices, token_id, doc_id), progress)
            splits.append(Split(source.split, start, row))
    return Codes(values, indices, token_id, doc_id, tuple(splits), encoder.d_hidden)


def _encode_split(source: RowSource, encoder: Encoder, chunk_rows: int, row: int, out: tuple[np.ndarray, ...],
                  progress: Any) -> int:
    """Encode one split's rows into ``out`` from ``row`` on; returns the row after its last."""
    values, indices, token_id, doc_id = out
    start = row
    for chunk in source.chunks(chunk_rows):
        m = len(chunk.acts)
        if row + m > len(values):
            raise ValueError(f"split {source.split!r} served more rows than its n_rows")
        encoder.encode(chunk.acts, values[row : row + m], indices[row : row + m])
        token_id[row : row + m] = chunk.token_id
        doc_id[row : row + m] = chunk.doc_id
        row += m
        if progress is not None:
            progress(row)
    if row - start != source.n_rows:
        raise ValueError(f"split {source.split!r} served {row - start} rows, expected {source.n_rows}")
    return row


__all__ = ["Codes", "Encoder", "Split", "encode_sources", "scratch_array"]
