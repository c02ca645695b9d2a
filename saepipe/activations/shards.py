"""Activation shards on disk: Arrow IPC stream files plus a ``manifest.json``.

A shard folder holds ``shard-00000.arrow``, ``shard-00001.arrow``, ... (uncompressed Arrow IPC
*stream* files, one record batch of at most ``shard_rows`` rows each, readable by
``datasets.Dataset.from_file``) with columns

- ``acts``: ``fixed_size_list<float16|float32>[d_model]``, the activation row;
- ``token_id`` (int32), ``doc_id`` (int64: the prepare ``id`` of the text), ``position`` (int32).

Shards are written to a temporary name, fsynced and renamed, so a file with a final name is always
complete. ``manifest.json`` (written last) names every shard with its row count, size, sha256 and a
sampled sha256, and carries a ``digest`` of its own content. ``ShardSource`` memory-maps the shards
and serves rows as float32 without copying whole shards.

Every reader checks what it opens against the manifest (``verify_shards``), so a shard flipped,
truncated or swapped for another extraction's is an error naming it even when a stage runs outside
DVC: the size of every shard always, then, by default (``verify="auto"``), the full sha256 when the
folder holds at most ``FULL_HASH_BYTES`` (reading that much costs ~1 s per 300 MB), else the sampled
sha256 (``SAMPLE_BLOCKS`` blocks of ``SAMPLE_BYTES`` spread over the file, plus its size: catches
truncation, swapped files and damage in the sampled blocks, not every flipped byte; DVC's own hashes
cover the rest under ``dvc repro``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from saepipe.runtime.files import atomic_write_bytes, file_sha256

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:05d}.arrow"
DTYPES = {"float16": np.float16, "float32": np.float32}
META_COLUMNS = {"token_id": np.int32, "doc_id": np.int64, "position": np.int32}


FULL_HASH_BYTES = 1 << 30
"""Shard folders up to this many bytes are verified with a full sha256 by default; larger ones sampled."""

SAMPLE_BLOCKS = 16
SAMPLE_BYTES = 1 << 16
"""The sampled hash reads ``SAMPLE_BLOCKS`` blocks of ``SAMPLE_BYTES`` bytes, evenly spread over the file."""

VERIFY_MODES = ("auto", "full", "sampled", "size", "none")


class ShardInfo(NamedTuple):
    file: str
    """File name inside the shard folder."""
    rows: int
    sha256: str
    bytes: int | None = None
    """File size (None in manifests written before saepipe recorded it)."""
    sample_sha256: str | None = None
    """``sampled_sha256`` of the file (None in older manifests)."""


def sampled_sha256(data: bytes | memoryview | np.ndarray) -> str:
    """sha256 of a buffer's size and ``SAMPLE_BLOCKS`` evenly spread blocks of ``SAMPLE_BYTES`` bytes."""
    view = memoryview(data).cast("B")
    size = len(view)
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    if size <= SAMPLE_BLOCKS * SAMPLE_BYTES:
        digest.update(view)
    else:
        for offset in np.linspace(0, size - SAMPLE_BYTES, SAMPLE_BLOCKS).astype(np.int64):
            digest.update(view[int(offset) : int(offset) + SAMPLE_BYTES])
    return digest.hexdigest()


def _file_sampled_sha256(path: Path) -> str:
    size = path.stat().st_size
    if size == 0:
        return sampled_sha256(b"")
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        return sampled_sha256(mapped)
    finally:
        del mapped


def shard_schema(d_model: int, dtype: str) -> pa.Schema:
    """The Arrow schema of a shard."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown shard dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema(
        [("acts", pa.list_(value, d_model)), ("token_id", pa.int32()),
         ("doc_id", pa.int64()), ("position", pa.int32())]
    )


def write_shard(
    path: Path, acts: np.ndarray, token_id: np.ndarray, doc_id: np.ndarray, position: np.ndarray,
    dtype: str = "float16",
) -> ShardInfo:
    """Write one shard atomically; ``acts`` is (n, d_model) and is cast to ``dtype``."""
    n, d = acts.shape
    schema = shard_schema(d, dtype)
    values = pa.array(np.ascontiguousarray(acts, dtype=DTYPES[dtype]).reshape(-1))
    batch = pa.record_batch(
        [pa.FixedSizeListArray.from_arrays(values, d),
         *(pa.array(np.asarray(col, dtype=META_COLUMNS[name]))
           for name, col in (("token_id", token_id), ("doc_id", doc_id), ("position", position)))],
        schema=schema,
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch)
    buf = sink.getvalue()
    atomic_write_bytes(path, memoryview(buf), durable=True)
    return ShardInfo(path.name, n, hashlib.sha256(memoryview(buf)).hexdigest(), buf.size,
                     sampled_sha256(memoryview(buf)))


class ShardWriter:
    """Buffers rows (at most one shard in memory) and writes full shards as they fill.

    ``on_shard(info)`` is called after each shard is safely on disk (extract records progress there).
    """

    def __init__(self, folder: Path, d_model: int, *, dtype: str = "float16",
                 shard_rows: int = 65536, first_index: int = 0, on_shard: Any = None) -> None:
        if shard_rows <= 0:
            raise ValueError(f"shard_rows must be positive, got {shard_rows}")
        shard_schema(d_model, dtype)  # validates dtype
        self.folder, self.d_model, self.dtype, self.shard_rows = Path(folder), d_model, dtype, shard_rows
        self.index, self.on_shard = first_index, on_shard
        self.written: list[ShardInfo] = []
        self._acts = np.empty((shard_rows, d_model), dtype=DTYPES[dtype])
        self._meta = {name: np.empty(shard_rows, dtype=t) for name, t in META_COLUMNS.items()}
        self._fill = 0

    def add(self, acts: np.ndarray, token_id: np.ndarray, doc_id: np.ndarray, position: np.ndarray) -> None:
        """Append rows; full shards are written immediately."""
        if acts.ndim != 2 or acts.shape[1] != self.d_model:
            raise ValueError(f"rows must be (n, {self.d_model}), got shape {acts.shape}")
        cols = {"token_id": token_id, "doc_id": doc_id, "position": position}
        start = 0
        while start < len(acts):
            take = min(len(acts) - start, self.shard_rows - self._fill)
            self._acts[self._fill : self._fill + take] = acts[start : start + take]
            for name, col in cols.items():
                self._meta[name][self._fill : self._fill + take] = col[start : start + take]
            self._fill += take
            start += take
            if self._fill == self.shard_rows:
                self._flush()

    def _flush(self) -> None:
        n = self._fill
        info = write_shard(self.folder / SHARD_PATTERN.format(self.index), self._acts[:n],
                           self._meta["token_id"][:n], self._meta["doc_id"][:n],
                           self._meta["position"][:n], self.dtype)
        self.index += 1
        self._fill = 0
        self.written.append(info)
        if self.on_shard is not None:
            self.on_shard(info)

    def close(self) -> list[ShardInfo]:
        """Write the last (partial) shard, if any; return the shards this writer wrote."""
        if self._fill:
            self._flush()
        return self.written


def manifest_digest(manifest: dict[str, Any]) -> str:
    """Content hash of a manifest (every field except ``digest`` itself)."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``manifest.json`` atomically with its ``digest``; return the manifest written."""
    manifest = {**manifest, "digest": manifest_digest(manifest)}
    atomic_write_bytes(Path(folder) / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(), durable=True)
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    """Read and check a shard folder's manifest (its digest must match its content)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: not a shard folder, or extract did not finish (rerun it to resume)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): rerun extract") from err
    if not isinstance(manifest, dict) or manifest.get("digest") != manifest_digest(manifest):
        raise ValueError(f"{path} was modified: its digest does not match its content (rerun extract)")
    return manifest


def verify_shards(folder: Path, manifest: dict[str, Any], mode: str = "auto") -> str:
    """Check every shard file of ``manifest`` against it; return the check made (see the module docstring).

    ``mode``: "auto", "full" (sha256 of every byte), "sampled" (size + sampled sha256; shards of older
    manifests without one get the full hash), "size" or "none". A mismatch is a ValueError naming the file.
    """
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {mode!r}")
    if mode == "none":
        return mode
    entries = [ShardInfo(**e) for e in manifest.get("shards", [])]
    sizes = {}
    for info in entries:
        path = Path(folder) / info.file
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} listed in the manifest is missing: rerun extract")
        sizes[info.file] = path.stat().st_size
        if info.bytes is not None and sizes[info.file] != info.bytes:
            raise ValueError(f"shard {path} has {sizes[info.file]} bytes, the manifest says {info.bytes} "
                             "(truncated or replaced): rerun extract")
    if mode == "auto":
        mode = "full" if sum(sizes.values()) <= FULL_HASH_BYTES else "sampled"
    if mode == "size":
        return mode
    for info in entries:
        path = Path(folder) / info.file
        if mode == "sampled" and info.sample_sha256 is not None:
            ok = _file_sampled_sha256(path) == info.sample_sha256
        else:
            ok = file_sha256(path) == info.sha256
        if not ok:
            raise ValueError(f"shard {path} is corrupt: its {'sampled ' if mode == 'sampled' else ''}sha256 "
                             "does not match the manifest (changed or damaged since extract wrote it): rerun extract")
    return mode


def check_manifest(manifest: dict[str, Any], folder: Path, *, layer: int | None = None,
                   component: str | None = None, split: str | None = None) -> None:
    """The manifest describes the activations asked for (site, split); else a ValueError saying so."""
    for key, want in (("layer", layer), ("component", component), ("split", split)):
        have = manifest.get(key)
        if want is not None and have is not None and have != want:
            raise ValueError(f"{folder} holds activations with {key}={have!r}, but {key}={want!r} is asked for "
                             "(params changed since extract ran, or the wrong folder): rerun extract")


def _open_shard(path: Path) -> pa.Table:
    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all()  # buffers stay views of the mapping
    except (pa.ArrowException, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"shard {path} cannot be read ({err}): truncated or damaged; rerun extract") from err


class ShardSource:
    """The shards of a folder as an ``ActivationSource`` (rows in storage order across shards).

    Shards are memory-mapped; ``take`` gathers rows per shard straight from the mapped buffers.
    ``verify`` checks the shards against the manifest on open (``verify_shards``; True = "full",
    False = "none"); ``verified`` says which check was made.
    """

    def __init__(self, folder: Path, *, verify: bool | str = "auto") -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self._d_model = int(self.manifest["d_model"])
        self._acts: list[np.ndarray] = []
        self._tables: list[pa.Table] = []
        mode = {True: "full", False: "none"}.get(verify, verify) if isinstance(verify, bool) else verify
        self.verified = verify_shards(self.folder, self.manifest, mode)
        if self.verified != "none":
            log.info("%s: %d shards checked against the manifest (%s)", self.folder, len(self.manifest["shards"]),
                     {"full": "full sha256", "sampled": "size + sampled sha256", "size": "sizes"}[self.verified])
        for entry in self.manifest["shards"]:
            path = self.folder / entry["file"]
            if not path.exists():
                raise FileNotFoundError(f"shard {path} listed in the manifest is missing: rerun extract")
            table = _open_shard(path).combine_chunks()  # one record batch per shard: no copy
            dtypes = [self.manifest["dtype"]] if self.manifest.get("dtype") in DTYPES else list(DTYPES)
            if not any(table.schema.equals(shard_schema(self._d_model, d)) for d in dtypes):
                raise ValueError(f"shard {path} has the schema {table.schema.to_string(show_schema_metadata=False)!r}"
                                 f", not that of d_model={self._d_model} {'/'.join(dtypes)} activations "
                                 "(another extraction's file?): rerun extract")
            if table.num_rows != entry["rows"]:
                raise ValueError(f"shard {path} has {table.num_rows} rows, manifest says {entry['rows']}")
            self._tables.append(table)
            self._acts.append(self._acts_view(table))
        self._offsets = np.cumsum([0] + [len(a) for a in self._acts])
        if self.n_rows == 0:
            raise ValueError(f"shard folder {self.folder} holds no rows")

    def _acts_view(self, table: pa.Table) -> np.ndarray:
        column = table.column("acts").chunk(0)
        if column.type.list_size != self._d_model:
            raise ValueError(f"shard acts have width {column.type.list_size}, manifest says {self._d_model}")
        flat = column.values.slice(column.offset * self._d_model, len(column) * self._d_model)
        return flat.to_numpy(zero_copy_only=True).reshape(len(column), self._d_model)

    @property
    def n_rows(self) -> int:
        return int(self._offsets[-1])

    @property
    def d_model(self) -> int:
        return self._d_model

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows at global indices ``rows`` as float32 (len(rows), d_model), in the order given."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise IndexError(f"row indices must be in 0..{self.n_rows - 1}")
        shard = np.searchsorted(self._offsets, rows, side="right") - 1
        present = np.unique(shard)
        if len(present) == 1:  # one shard: a single gather, no scatter
            s = int(present[0])
            return np.take(self._acts[s], rows - self._offsets[s], axis=0).astype(np.float32, copy=False)
        # gather in storage dtype (half the bytes to move for float16), cast once at the end
        out = np.empty((rows.size, self._d_model), dtype=self._acts[0].dtype)
        for s in present:
            where = np.nonzero(shard == s)[0]
            out[where] = np.take(self._acts[s], rows[where] - self._offsets[s], axis=0)
        return out.astype(np.float32, copy=False)

    def chunks(self, chunk_rows: int) -> Iterator[np.ndarray]:
        """All rows in storage order, float32, at most ``chunk_rows`` rows each (never across shards)."""
        if chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
        for acts in self._acts:
            for start in range(0, len(acts), chunk_rows):
                yield np.asarray(acts[start : start + chunk_rows], dtype=np.float32)

    def chunks_with_meta(self, chunk_rows: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """``chunks`` with each chunk's metadata columns (``token_id``, ``doc_id``, ``position``):
        views of the memory-mapped shards, so no whole column is ever read into memory."""
        if chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
        for acts, table in zip(self._acts, self._tables, strict=True):
            meta = {name: table.column(name).chunk(0).to_numpy() for name in META_COLUMNS}
            for start in range(0, len(acts), chunk_rows):
                stop = start + chunk_rows
                yield (np.asarray(acts[start:stop], dtype=np.float32),
                       {name: col[start:stop] for name, col in meta.items()})

    def shard_arrays(self) -> list[np.ndarray]:
        """The memory-mapped (rows, d_model) arrays of each shard, in storage dtype."""
        return list(self._acts)

    def column(self, name: str) -> np.ndarray:
        """A per-row metadata column (``token_id``, ``doc_id`` or ``position``) over all shards."""
        if name not in META_COLUMNS:
            raise KeyError(f"unknown column {name!r}; valid: {', '.join(META_COLUMNS)}")
        return np.concatenate([t.column(name).to_numpy() for t in self._tables])

    @property
    def token_ids(self) -> np.ndarray:
        """Token id of every row (int32)."""
        return self.column("token_id")

    @property
    def doc_ids(self) -> np.ndarray:
        """Prepare ``id`` of the text each row came from (int64)."""
        return self.column("doc_id")

    @property
    def positions(self) -> np.ndarray:
        """Position of every row's token in its text (0 = first token, usually BOS)."""
        return self.column("position")
