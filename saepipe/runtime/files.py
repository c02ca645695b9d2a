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


_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
                       "int16": "I16", "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16",
                       "uint8": "U8", "bool": "BOOL"}


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> list[bytes | memoryview]:
    """A safetensors file as pieces to write in order: the header (JSON with sorted keys, so the same
    tensors and metadata always give the same bytes; ``safetensors``' own writer orders the metadata
    by a per-process hash) and each tensor's little-endian bytes, in name order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pieces, offset = [], 0
    for name in sorted(tensors):
        a = np.require(tensors[name], requirements="C")  # keeps 0-d arrays 0-d, unlike ascontiguousarray
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        kind = _SAFETENSORS_DTYPES.get(a.dtype.name)
        if kind is None:
            raise TypeError(f"tensor {name!r} has dtype {a.dtype}, which safetensors files cannot hold")
        header[name] = {"dtype": kind, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        pieces.append(memoryview(a.reshape(-1).view(np.uint8)))
        offset += a.nbytes
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    return [len(head).to_bytes(8, "little"), head, *pieces]


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file (readable by ``safetensors.safe_open``) atomically and reproducibly:
    the same tensors and metadata give the same bytes (see ``safetensors_bytes``)."""
    pieces = safetensors_bytes(tensors, metadata)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            for piece in pieces:
                f.write(piece)

    return atomic_write(Path(path), write)


def arrays_sha256(arrays: dict[str, Any]) -> str:
    """sha256 of named arrays (name, dtype, shape and bytes, in name order): a checksum that files of
    tensors carry in their header, so a reader notices a changed or damaged file."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{a.dtype.str}:{a.shape}\n".encode())
        digest.update(memoryview(a.reshape(-1).view(np.uint8)))
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


__all__ = [
    "arrays_sha256",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "file_sha256",
    "safetensors_bytes",
    "temporary_path",
    "write_metrics_json",
    "write_safetensors",
]
