"""Activation sources: one interface over in-memory arrays and on-disk shard folders.

Training, normalization and evaluation read activations only through ``ActivationSource``, so an
(n, d_model) array and a shard folder written by ``extract`` take the same code path.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from saepipe.activations.shards import ShardSource


@runtime_checkable
class ActivationSource(Protocol):
    """Random-access rows of activations."""

    @property
    def n_rows(self) -> int: ...

    @property
    def d_model(self) -> int: ...

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows at the given indices as a float32 (len(rows), d_model) array, in that order."""
        ...

    def chunks(self, chunk_rows: int) -> Iterator[np.ndarray]:
        """All rows in storage order, as float32 arrays of at most ``chunk_rows`` rows."""
        ...


class ArraySource:
    """An (n, d_model) numpy or MLX array as an ``ActivationSource``."""

    def __init__(self, array: object) -> None:
        data = np.asarray(array)
        if data.ndim != 2:
            raise ValueError(f"activations must be a 2-D (n, d_model) array, got shape {data.shape}")
        if data.shape[0] == 0:
            raise ValueError("activations are empty (0 rows)")
        self._data = data

    @property
    def n_rows(self) -> int:
        return int(self._data.shape[0])

    @property
    def d_model(self) -> int:
        return int(self._data.shape[1])

    def take(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self._data[rows], dtype=np.float32)

    def check_finite(self) -> None:
        """A ValueError naming the rows that hold NaN or inf (they cannot be normalized or trained on)."""
        bad = np.flatnonzero(~np.isfinite(self._data).all(axis=1))
        if bad.size:
            raise ValueError(f"the activations hold NaN or inf in {bad.size} of {self.n_rows} rows (first: row "
                             f"{bad[0]}): fix the input, they cannot be normalized or trained on")

    def chunks(self, chunk_rows: int) -> Iterator[np.ndarray]:
        for start in range(0, self.n_rows, chunk_rows):
            yield np.asarray(self._data[start : start + chunk_rows], dtype=np.float32)


def as_source(activations: object) -> ActivationSource:
    """Accept an ActivationSource, a shard folder (str/Path) or an (n, d) array."""
    if isinstance(activations, ActivationSource):
        return activations
    if isinstance(activations, (str, Path)):
        return ShardSource(Path(activations))
    return ArraySource(activations)


def take_in_chunks(source: ActivationSource, rows: np.ndarray, chunk_rows: int) -> Iterator[np.ndarray]:
    """The given rows (any order) as float32 arrays of at most ``chunk_rows`` rows, read in sorted
    order: memory stays bounded, and a shard source reads each shard's rows in storage order."""
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    rows = np.sort(rows)
    for start in range(0, len(rows), chunk_rows):
        yield source.take(rows[start : start + chunk_rows])


__all__ = ["ActivationSource", "ArraySource", "as_source", "take_in_chunks"]

