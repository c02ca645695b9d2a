"""Reading the ``analyze`` stage's output (the dashboard's data contract).

The folder holds ``features.parquet`` (one row per latent), ``examples.parquet`` (one row per example
context), ``token_features.parquet`` (top latents per token) and ``summary.json``. Only
``features.parquet`` with a ``feature`` column is required; every other column or file that is missing
leaves its part of the dashboard empty, and unknown columns or summary keys are ignored (summary keys
are shown as run details). Column types are cast to the contract's; a column of the wrong shape is a
:class:`ContractError` naming the file and the column.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FEATURE_COLUMNS: dict[str, pa.DataType] = {
    "feature": pa.int32(),
    "density": pa.float64(),
    "n_fired": pa.int64(),
    "mean_act": pa.float32(),
    "max_act": pa.float32(),
    "hist_edges": pa.list_(pa.float32()),
    "hist_counts": pa.list_(pa.int64()),
    "promoted_tokens": pa.list_(pa.string()),
    "promoted_values": pa.list_(pa.float32()),
    "suppressed_tokens": pa.list_(pa.string()),
    "suppressed_values": pa.list_(pa.float32()),
    "neighbors": pa.list_(pa.int32()),
    "neighbor_cos": pa.list_(pa.float32()),
}
EXAMPLE_COLUMNS: dict[str, pa.DataType] = {
    "feature": pa.int32(),
    "kind": pa.string(),
    "rank": pa.int32(),
    "split": pa.string(),
    "doc_id": pa.int64(),
    "tokens": pa.list_(pa.string()),
    "acts": pa.list_(pa.float32()),
    "center": pa.int32(),
    "max_act": pa.float32(),
}
TOKEN_COLUMNS: dict[str, pa.DataType] = {
    "token_id": pa.int32(),
    "token": pa.string(),
    "features": pa.list_(pa.int32()),
    "values": pa.list_(pa.float32()),
}
_REQUIRED = {
    "features.parquet": ("feature",),
    "examples.parquet": ("feature", "tokens", "acts"),
    "token_features.parquet": ("token", "features"),
}


class ContractError(ValueError):
    """The analysis folder does not follow the data contract."""


@dataclass
class Analysis:
    """An analysis folder read into Arrow tables, each sorted deterministically.

    ``features`` by ``feature``; ``examples`` by (feature, kind order, rank) where the kind order is
    "top", then the quantiles from the highest to q0, then any other kinds by name;
    ``token_features`` by (token_id, token). Missing files are ``None``.
    """

    path: Path
    summary: dict[str, Any]
    features: pa.Table
    examples: pa.Table | None
    token_features: pa.Table | None

    @property
    def n_features(self) -> int:
        """Latents in the SAE: ``summary["n_features"]``, else one past the largest feature id."""
        n = self.summary.get("n_features")
        ids = self.features.column("feature")
        top = int(pc.max(ids).as_py()) + 1 if len(ids) else 0
        if isinstance(n, int) and not isinstance(n, bool) and n >= top:
            return n
        return top


def _cast_table(table: pa.Table, spec: dict[str, pa.DataType], name: str) -> pa.Table:
    missing = [c for c in _REQUIRED[name] if c not in table.column_names]
    if missing:
        raise ContractError(f"{name}: missing required column(s) {missing}")
    cols, fields = [], []
    for col, typ in spec.items():
        if col not in table.column_names:
            continue
        arr = table.column(col)
        if arr.type != typ:
            try:
                arr = arr.cast(typ)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise ContractError(
                    f"{name}: column {col!r} is {arr.type}, expected {typ}: {e}"
                ) from e
        cols.append(arr)
        fields.append(pa.field(col, typ))
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


def kind_order_key(kind: str) -> tuple[int, int, str]:
    """Sort key of an example kind: "top" first, then quantiles from the highest, then the rest."""
    if kind == "top":
        return (0, 0, "")
    m = re.fullmatch(r"q(\d+)", kind)
    if m:
        return (1, -int(m.group(1)), "")
    return (2, 0, kind)


def read_summary(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ContractError(f"summary.json is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ContractError("summary.json must hold a JSON object")
    return data


def load_analysis(analysis_dir: str | Path) -> Analysis:
    """Read and validate an analysis folder (see the module docstring)."""
    root = Path(analysis_dir)
    fpath = root / "features.parquet"
    if not fpath.is_file():
        raise ContractError(f"{fpath} not found (the analyze stage writes it)")
    features = _cast_table(pq.read_table(fpath), FEATURE_COLUMNS, "features.parquet")
    features = features.filter(pc.is_valid(features.column("feature")))
    features = features.take(pc.sort_indices(features, [("feature", "ascending")]))
    ids = features.column("feature").to_numpy()
    if len(ids) and (np.any(np.diff(ids) == 0) or ids[0] < 0):
        raise ContractError("features.parquet: feature ids must be unique and >= 0")

    examples = None
    epath = root / "examples.parquet"
    if epath.is_file():
        examples = _cast_table(pq.read_table(epath), EXAMPLE_COLUMNS, "examples.parquet")
        examples = _sort_examples(examples)

    token_features = None
    tpath = root / "token_features.parquet"
    if tpath.is_file():
        token_features = _cast_table(pq.read_table(tpath), TOKEN_COLUMNS, "token_features.parquet")
        keys = [("token", "ascending")]
        if "token_id" in token_features.column_names:
            keys.insert(0, ("token_id", "ascending"))
        token_features = token_features.take(pc.sort_indices(token_features, keys))

    return Analysis(root, read_summary(root / "summary.json"), features, examples, token_features)


def _sort_examples(ex: pa.Table) -> pa.Table:
    ex = ex.filter(pc.is_valid(ex.column("feature")))
    n = ex.num_rows
    feat = ex.column("feature").to_numpy().astype(np.int64)
    if "kind" in ex.column_names:
        enc = pc.dictionary_encode(pc.fill_null(ex.column("kind"), "top")).combine_chunks()
        names = enc.dictionary.to_pylist()
        order = sorted(range(len(names)), key=lambda i: kind_order_key(names[i]))
        pos = np.empty(len(names), dtype=np.int64)
        pos[order] = np.arange(len(names))
        kind_key = pos[enc.indices.to_numpy(zero_copy_only=False)] if n else np.zeros(0, np.int64)
    else:
        kind_key = np.zeros(n, dtype=np.int64)
    if "rank" in ex.column_names:
        rank = pc.fill_null(ex.column("rank"), 0).to_numpy().astype(np.int64)
    else:
        rank = np.zeros(n, dtype=np.int64)
    # Ties (same feature, kind and rank) keep the file's order: lexsort is stable.
    order = np.lexsort((np.arange(n), rank, kind_key, feat))
    if np.array_equal(order, np.arange(n)):
        return ex  # already in display order (the analyze stage writes it so): no copy
    return ex.take(pa.array(order))


# --- one feature as a plain record (for render_feature_html and the notebook API) --------------


def _py(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def load_feature_record(analysis: Analysis | str | Path, feature: int) -> dict[str, Any]:
    """One latent's data as the plain record :func:`render_feature_html` takes.

    Keys: the ``features.parquet`` columns, ``examples`` (a list of dicts with the
    ``examples.parquet`` columns, in display order) and ``summary``. Raises ``KeyError`` when the
    latent has no row.
    """
    a = analysis if isinstance(analysis, Analysis) else load_analysis(analysis)
    ids = a.features.column("feature").to_numpy()
    i = int(np.searchsorted(ids, feature))
    if i >= len(ids) or ids[i] != feature:
        raise KeyError(f"feature {feature} is not in {a.path / 'features.parquet'}")
    record = {k: _py(v) for k, v in a.features.slice(i, 1).to_pylist()[0].items()}
    examples: list[dict[str, Any]] = []
    if a.examples is not None:
        feats = a.examples.column("feature").to_numpy()
        lo, hi = np.searchsorted(feats, feature, "left"), np.searchsorted(feats, feature, "right")
        examples = a.examples.slice(int(lo), int(hi - lo)).to_pylist()
    record["examples"] = examples
    record["summary"] = a.summary
    return record
