"""Activation shards on disk: Arrow IPC stream files plus a ``manifest.json``.

A shard folder holds ``shard-00000.arrow``, ``shard-00001.arrow``, ... (uncompressed Arrow IPC
*stream* files, one record batch of at most ``shard_rows`` rows each, readable by
``datasets.Dataset.from_file``) with columns

- ``acts``: ``fixed_size_list<float16|float32>[d_model]``, the activation row;
- ``token_id`` (int32), ``doc_id`` (int64: the prepare ``id`` of the text), ``position`` (int32).

Shards are written to a temporary name, fsynced and renamed, so a file with a final name is always
complete. ``manifest.json`` (written last) names every shard with its row count and sha256, and
carries a ``digest`` of its own content. ``ShardSource`` memory-maps the shards and serves rows as
float32 without copying whole shards.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from saepipe.runtime.files import atomic_write_bytes, file_sha256

MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:05d}.arrow"
DTYPES = {"float16": np.float16, "float32": np.float32}
META_COLUMNS = {"token_id": np.int32, "doc_id": np.int64, "position": np.int32}


class ShardInfo(NamedTuple):
    file: str
    """File name inside the shard folder."""
    rows: int
    sha256: str


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
    return ShardInfo(path.name, n, hashlib.sha256(memoryview(buf)).hexdigest())


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
    manifest = json.loads(path.read_text())
    if manifest.get("digest") != manifest_digest(manifest):
        raise ValueError(f"{path} was modified: its digest does not match its content")
    return manifest


def _open_shard(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()  # buffers stay views of the mapping


class ShardSource:
    """The shards of a folder as an ``ActivationSource`` (rows in storage order across shards).

    Shards are memory-mapped; ``take`` gathers rows per shard straight from the mapped buffers.
    ``verify=True`` checks every shard's sha256 against the manifest on open.
    """

    def __init__(self, folder: Path, *, verify: bool = False) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self._d_model = int(self.manifest["d_model"])
        self._acts: list[np.ndarray] = []
        self._tables: list[pa.Table] = []
        for entry in self.manifest["shards"]:
            path = self.folder / entry["file"]
            if not path.exists():
                raise FileNotFoundError(f"shard {path} listed in the manifest is missing")
            if verify and file_sha256(path) != entry["sha256"]:
                raise ValueError(f"shard {path} is corrupt: sha256 does not match the manifest")
            table = _open_shard(path).combine_chunks()  # one record batch per shard: no copy
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
