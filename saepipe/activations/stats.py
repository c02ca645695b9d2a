"""Normalization statistics of activations (fit by ``normalize``, used by the SAE)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from saepipe.runtime.files import atomic_write_text, write_safetensors


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
        write_safetensors(path, tensors)
        meta = {"mean_norm": self.mean_norm, "n_rows": self.n_rows, "digest": self.digest(), **(extra or {})}
        atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> NormStats:
        """Read a file written by ``save`` (and its JSON sidecar); the sidecar's digest must match the
        tensors (a file changed or damaged since, or a sidecar of other stats, is an error naming it)."""
        path = Path(path)
        sidecar = path.with_suffix(".json")
        for p in (path, sidecar):
            if not p.is_file():
                raise FileNotFoundError(f"normalization stats file not found: {p} (run the normalize stage)")
        try:
            tensors = load_file(str(path))
            meta = json.loads(sidecar.read_text())
            stats = cls(np.asarray(tensors["mean"], dtype=np.float64), np.asarray(tensors["std"], dtype=np.float64),
                        float(meta["mean_norm"]), int(meta["n_rows"]))
        except Exception as err:  # safetensors, JSON and key errors alike: the files are not normalize's
            raise ValueError(f"{path} (with {sidecar.name}) is not readable normalization stats ({err}): "
                             "rerun normalize") from err
        if stats.mean.ndim != 1 or stats.mean.shape != stats.std.shape:
            raise ValueError(f"{path}: mean {stats.mean.shape} and std {stats.std.shape} must be equal-length vectors")
        if meta.get("digest") not in (None, stats.digest()):
            raise ValueError(f"{path} does not match the digest in {sidecar.name} (changed or damaged since "
                             "normalize wrote it): rerun normalize")
        if not (np.isfinite(stats.mean).all() and np.isfinite(stats.std).all() and (stats.std > 0).all()):
            raise ValueError(f"{path} holds non-finite or non-positive statistics: rerun normalize (and check "
                             "the activations for NaN/inf)")
        return stats
