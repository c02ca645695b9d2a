"""The analysis as Arrow tables, and the folder the dashboard reads (its data contract).

``features.parquet`` (one row per latent, dead ones too), ``examples.parquet`` (one row per context,
in display order: by latent, then "top", "q{m-1}" .. "q0", each by rank), ``token_features.parquet``
(top latents per token) and ``summary.json``. Column names and types are those of
``saepipe.dashboard.data`` (``FEATURE_COLUMNS``, ``EXAMPLE_COLUMNS``, ``TOKEN_COLUMNS``). The tables are
a pure function of the inputs, so the parquet files are byte-identical across runs; ``summary.json``
also holds the run's timings (``seconds``, ``cpu_seconds``), the only part that changes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from saepipe.runtime.files import atomic_write, atomic_write_text

FEATURES_FILE = "features.parquet"
EXAMPLES_FILE = "examples.parquet"
TOKENS_FILE = "token_features.parquet"
SUMMARY_FILE = "summary.json"


class AnalysisTables(NamedTuple):
    features: pa.Table
    examples: pa.Table
    token_features: pa.Table
    summary: dict[str, Any]


def list_array(values: Any, offsets: np.ndarray) -> pa.Array:
    """A list column from flat ``values`` (numpy or Arrow) and (rows + 1,) ``offsets``."""
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets[-1] < 2**31:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)
    return pa.LargeListArray.from_arrays(pa.array(offsets), values).cast(pa.list_(values.type))


def rows_array(matrix: np.ndarray, lengths: np.ndarray, typ: pa.DataType) -> pa.Array:
    """A list column of the first ``lengths[i]`` entries of each row of ``matrix``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    keep = np.arange(matrix.shape[1])[None, :] < lengths[:, None]
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return list_array(pa.array(matrix[keep], type=typ), offsets)


def string_rows(ids: np.ndarray, lengths: np.ndarray, strings: dict[int, str]) -> pa.Array:
    """A list<string> column of the token strings of ``ids`` (rows, like ``rows_array``)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    keep = np.arange(ids.shape[1])[None, :] < lengths[:, None]
    flat = ids[keep]
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return list_array(token_array(flat, strings), offsets)


def token_array(ids: np.ndarray, strings: dict[int, str]) -> pa.Array:
    """The strings of token ``ids`` as an Arrow string array (each distinct id looked up once)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if not len(ids):
        return pa.array([], type=pa.string())
    present = np.zeros(int(ids.max()) + 1, bool)  # ids are small (a vocabulary): no sort needed
    present[ids] = True
    uniq = np.flatnonzero(present)
    local = np.cumsum(present) - 1
    table = pa.array([strings[int(i)] for i in uniq], type=pa.string())
    return table.take(pa.array(local[ids]))


def write_parquet(tables: AnalysisTables, out_dir: str | Path) -> Path:
    """Write the three parquet files of the data contract into ``out_dir`` (each atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, table in ((FEATURES_FILE, tables.features), (EXAMPLES_FILE, tables.examples),
                        (TOKENS_FILE, tables.token_features)):
        atomic_write(out / name, lambda tmp, t=table: pq.write_table(t, tmp, compression="zstd"))
    return out


def write_summary(summary: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``summary.json`` into ``out_dir``."""
    return atomic_write_text(Path(out_dir) / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


def write_tables(tables: AnalysisTables, out_dir: str | Path) -> Path:
    """Write the four files of the data contract into ``out_dir``."""
    write_parquet(tables, out_dir)
    write_summary(tables.summary, out_dir)
    return Path(out_dir)


__all__ = ["EXAMPLES_FILE", "FEATURES_FILE", "SUMMARY_FILE", "TOKENS_FILE", "AnalysisTables", "list_array",
           "rows_array", "string_rows", "token_array", "write_parquet", "write_summary", "write_tables"]
