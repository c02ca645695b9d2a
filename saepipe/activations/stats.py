"""Normalization statistics of activations (fit by ``normalize``, used by the SAE)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from saepipe.runtime.files import atomic_write, atomic_write_text


@dataclass(frozen=True)
class NormStats:
    """Per-dimension mean and standard deviation, and the mean L2 norm of the rows.

    ``x_normalized = (x - mean) / std``; ``mean_norm`` = mean over rows of ||x||_2 (for scalar
    normalization). ``n_rows`` is how many rows they were fit on.
    """

    mean: np.ndarray  # (d_model,) float64
    std: np.ndarray  # (d_model,) float64
    mean_norm: float
    n_rows: int

    def digest(self) -> str:
        """Content hash, recorded in SAE metadata so an SAE names the stats it was trained with."""
        h = hashlib.sha256()
        for a in (self.mean, self.std):
            h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
        h.update(json.dumps([self.mean_norm, self.n_rows]).encode())
        return h.hexdigest()[:16]

    def save(self, path: Path, extra: dict | None = None) -> None:
        """Write ``path`` (.safetensors) and a JSON sidecar ``path.with_suffix('.json')``."""
        path = Path(path)
        tensors = {"mean": self.mean.astype(np.float64), "std": self.std.astype(np.float64)}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
        meta = {"mean_norm": self.mean_norm, "n_rows": self.n_rows, "digest": self.digest(), **(extra or {})}
        atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> NormStats:
        """Read a file written by ``save`` (and its JSON sidecar)."""
        path = Path(path)
        tensors = load_file(str(path))
        meta = json.loads(path.with_suffix(".json").read_text())
        return cls(tensors["mean"], tensors["std"], float(meta["mean_norm"]), int(meta["n_rows"]))
