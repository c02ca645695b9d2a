"""Writing files so that a reader never sees half of one, and hashing their content.

Every output of the pipeline (prepared texts, shards and their manifest, normalization stats, the SAE
file, checkpoints, metrics) is written through ``atomic_write``: to a temporary file next to the
target, then renamed over it. A crash leaves either the old file or the new one, and DVC or a resumed
run never read a truncated file. ``durable=True`` also fsyncs the file and its folder before and
after the rename, for files that a resumed run trusts by name alone (extract's shards).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

_HASH_BLOCK = 1 << 22  # bytes read at a time when hashing: large enough to be I/O bound


def temporary_path(path: Path) -> Path:
    """The temporary name ``atomic_write`` uses for ``path``: same folder (so the rename is atomic),
    ends with ``.tmp`` (so a clean-up can recognise leftovers), unique per process."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], object], *, durable: bool = False) -> Path:
    """Call ``write(tmp)`` for a temporary file next to ``path``, then rename it to ``path``.

    On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        write(tmp)
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes | memoryview, *, durable: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (see ``atomic_write``)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), durable=durable)


def atomic_write_text(path: str | Path, text: str, *, durable: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see ``atomic_write``)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable=durable)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read block by block."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def arrays_sha256(arrays: dict[str, Any]) -> str:
    """sha256 of named arrays (name, dtype, shape and bytes, in name order): a checksum that files of
    tensors carry in their header, so a reader notices a changed or damaged file."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{a.dtype.str}:{a.shape}\n".encode())
        digest.update(memoryview(a).cast("B"))
    return digest.hexdigest()


def write_metrics_json(path: Path, metrics: dict[str, Any]) -> Path:
    """Write a metrics dict for ``dvc metrics``: NaN/inf become null (DVC and strict JSON readers
    reject them), numpy/MLX scalars become floats."""

    def safe(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: safe(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [safe(v) for v in value]
        if hasattr(value, "dtype"):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    return atomic_write_text(path, json.dumps(safe(metrics), indent=2) + "\n")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` survive a power loss (the folder's entry is data too)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["arrays_sha256", "atomic_write", "atomic_write_bytes", "atomic_write_text", "file_sha256", "temporary_path",
           "write_metrics_json"]
