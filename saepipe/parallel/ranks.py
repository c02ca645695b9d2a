"""This process's place in an ``mx.distributed`` group, and the few collectives saepipe needs.

Data-parallel training and split extraction run one process per rank, started by ``mlx.launch``
(ring or MPI backend, see the README). ``Ranks.world()`` is the group ``mlx.launch`` set up, or a
group of one in a plain process, where every collective below is the identity and costs nothing.

What the collectives guarantee (what makes every rank apply the identical update):

- ``sum`` (float32/int32 MLX arrays, e.g. gradients): ``mx.distributed.all_sum``; every rank gets
  the same values (a ring all-reduce reduces each segment once and sends the result around).
- ``sum_all``: several arrays in one all-reduce (float32 on the wire): a step's gradients, fired
  counts and metric parts in one message.
- ``sum64`` (small float64 vectors: batch moments, metrics, validation sums): every rank gathers
  every rank's values and adds them in rank order, in float64, so the result is the same bits on
  every rank (MLX's all_sum has no float64).
- ``gather_bytes`` / ``broadcast_bytes``: raw bytes (JSON, packed float64) from every rank / from
  rank 0, through an all-sum of a table each rank fills one row of (exact; every backend has
  all-sum, not every one all-gather).
- ``broadcast``: rank 0's arrays on every rank (an all_sum where the other ranks add zeros), e.g.
  the training state rank 0 read from its checkpoint.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

log = logging.getLogger(__name__)

LAUNCH_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
"""Environment variables that say a launcher started this process as one rank of several:
``mlx.launch`` sets ``MLX_RANK`` (ring, NCCL, JACCL); ``mpirun`` the others (OpenMPI, MPICH, PMIx)."""


class Ranks:
    """The rank of this process among ``size`` (``group`` None: a single process)."""

    def __init__(self, group: Any = None) -> None:
        self.group = group if group is not None and group.size() > 1 else None
        self.size = self.group.size() if self.group is not None else 1
        self.rank = self.group.rank() if self.group is not None else 0

    @classmethod
    def world(cls) -> Ranks:
        """The group ``mlx.launch`` (or ``mpirun``) started this process in; a group of one in a
        plain process, without asking MLX: its ``init`` would try MPI, which may start an MPI
        singleton where OpenMPI is installed."""
        if not mx.distributed.is_available() or not any(v in os.environ for v in LAUNCH_VARIABLES):
            return cls(None)
        return cls(mx.distributed.init())  # a second call returns the group the first one set up

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that writes outputs (checkpoints, logs, the SAE, manifests)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, size={self.size})"

    # ---- splitting work ---------------------------------------------------------------------
    def bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """``[start, stop)`` of ``rank``'s (default: this one's) contiguous part of ``n`` items;
        parts differ in length by at most one and cover ``range(n)`` in rank order."""
        r = self.rank if rank is None else rank
        return n * r // self.size, n * (r + 1) // self.size

    def part(self, items: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of ``items`` (all of it on a single process)."""
        if self.size == 1:
            return items
        start, stop = self.bounds(len(items))
        return items[start:stop]

    # ---- collectives ------------------------------------------------------------------------
    def sum(self, a: mx.array) -> mx.array:
        """The element-wise sum of ``a`` over the ranks (``a`` itself on a single process); usable
        inside ``mx.compile``d functions."""
        if self.group is None:
            return a
        return mx.distributed.all_sum(a, group=self.group)

    def sum_numpy(self, a: np.ndarray) -> np.ndarray:
        """``sum`` of a numpy array (float32 or int32 for the ring backend), as numpy."""
        if self.group is None:
            return a
        return np.array(mx.distributed.all_sum(mx.array(a), group=self.group))

    def sum_all(self, arrays: list[mx.array]) -> list[mx.array]:
        """``sum`` of several arrays in one all-reduce (one message instead of one per array): they
        travel as one float32 vector, so integer entries must stay below 2**24 to come back exact."""
        if self.group is None or not arrays:
            return list(arrays)
        flat = mx.concatenate([a.astype(mx.float32).reshape(-1) for a in arrays])
        total = mx.distributed.all_sum(flat, group=self.group)
        out, start = [], 0
        for a in arrays:
            out.append(total[start : start + a.size].reshape(a.shape).astype(a.dtype))
            start += a.size
        return out

    def sum_numpy_all(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """``sum_all`` for numpy arrays (returned as numpy, in their dtypes)."""
        if self.group is None:
            return list(arrays)
        flat = np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in arrays])
        total = np.array(mx.distributed.all_sum(mx.array(flat), group=self.group))
        out, start = [], 0
        for a in arrays:
            out.append(total[start : start + a.size].reshape(a.shape).astype(a.dtype, copy=False))
            start += a.size
        return out

    def _gather_fixed(self, data: bytes) -> list[bytes]:
        """Every rank's ``data`` when all have the same length: one all-sum of a (ranks, length)
        int32 table in which each rank fills its own row (exact: the other rows add zeros). An
        all-sum, not an all-gather, because every backend has it (ring, MPI, NCCL)."""
        width = -(-len(data) // 4)
        table = np.zeros((self.size, max(width, 1)), np.int32)
        table[self.rank, :width] = np.frombuffer(data.ljust(4 * width, b"\0"), np.int32)
        summed = np.array(mx.distributed.all_sum(mx.array(table), group=self.group))
        return [summed[r].tobytes()[: len(data)] for r in range(self.size)]

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order (lengths may differ)."""
        if self.group is None:
            return [bytes(data)]
        lengths = np.zeros(self.size, np.int32)
        lengths[self.rank] = len(data)
        lengths = np.array(mx.distributed.all_sum(mx.array(lengths), group=self.group))
        parts = self._gather_fixed(bytes(data).ljust(int(lengths.max()), b"\0"))
        return [part[: int(n)] for part, n in zip(parts, lengths, strict=True)]

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0's ``data`` on every rank (the others pass anything, e.g. None)."""
        if self.group is None:
            return bytes(data or b"")
        return self.gather_bytes(data if self.is_main and data is not None else b"")[0]

    def sum64(self, *values: Any) -> list[np.ndarray]:
        """Each of ``values`` (numbers or arrays, same shapes on every rank) summed over the ranks in
        float64, in rank order: the same bits on every rank. Returns float64 arrays (0-d for numbers)."""
        arrays = [np.asarray(v, dtype=np.float64) for v in values]
        if self.group is None:
            return arrays
        flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
        if flat.size == 0:
            return arrays
        parts = self._gather_fixed(flat.tobytes())
        total = np.zeros_like(flat)
        for part in parts:  # rank order, sequentially: deterministic on every rank
            total += np.frombuffer(part, np.float64)
        out, start = [], 0
        for a in arrays:
            out.append(total[start : start + a.size].reshape(a.shape))
            start += a.size
        return out

    def broadcast(self, arrays: dict[str, mx.array]) -> dict[str, mx.array]:
        """Rank 0's ``arrays`` on every rank; the others pass arrays of the same names, shapes and
        dtypes (their values are ignored)."""
        if self.group is None:
            return arrays
        out = {}
        for name in sorted(arrays):  # the same order on every rank: the calls pair up by order
            a = arrays[name]
            mine = a if self.is_main else mx.zeros_like(a)
            out[name] = mx.distributed.all_sum(mine, group=self.group)
        mx.eval(out)
        return out

    def check_same(self, what: str, values: Sequence[float]) -> None:
        """Raise when ranks hold different ``values`` (e.g. checksums of weights that must agree)."""
        if self.group is None:
            return
        mine = np.asarray(values, dtype=np.float64)
        parts = [np.frombuffer(p, np.float64) for p in self.gather_bytes(mine.tobytes())]
        if any(p.shape != mine.shape or not np.array_equal(p, parts[0], equal_nan=True) for p in parts):
            raise RuntimeError(f"ranks disagree on {what}: " + "; ".join(
                f"rank {r}: {p.tolist()}" for r, p in enumerate(parts)))


__all__ = ["LAUNCH_VARIABLES", "Ranks"]
