"""``build_site``: the offline feature dashboard, a static site written from an analysis folder.

Layout of ``out_dir`` (every file is rewritten on each build; stale data files are removed)::

    index.html              search, sort, density histogram, paginated table of all latents
    feature.html            one template for every latent: feature.html#123
    assets/                 dashboard.css, common.js, index.js, feature.js (copied from the package)
    data/meta.js            summary.json plus the site's layout (block size, which files exist)
    data/index.js           compact columns for the index: id, density, fired, mean, max, top tokens
    data/features-0003.js   latents 3*B .. 4*B-1: statistics, histogram, logits, neighbours, contexts
    data/tokens.js          the token strings of token_features (loaded when a search needs them)
    data/tokfeat-0000.js    token rows 0 .. T-1: top latents and activations per token

Pages load data with ``<script src>`` (``fetch`` of local files is blocked under ``file://``), so the
site works when opened straight from disk, and from any static server. The output is a pure function
of the input: the same analysis gives byte-identical files (DVC caches the stage's output).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from saepipe.dashboard.data import Analysis, ContractError, load_analysis
from saepipe.dashboard.jsdata import b64, js_call, round_sig

FORMAT_VERSION = 1
DEFAULT_BLOCK_SIZE = 64
DEFAULT_TOKEN_BLOCK = 512
INDEX_TOP_TOKENS = 3
# Significant digits of the floats on feature pages (about float32's precision, so the pages show the
# same 3-digit values as the notebook view, which formats the exact numbers), and in the index.
DIGITS = 7
INDEX_DIGITS = 4
ASSETS = ("common.js", "index.js", "feature.js")
CSS = ("components.css", "site.css")  # concatenated into assets/dashboard.css
PAGES = ("index.html", "feature.html")


@dataclass(frozen=True)
class SiteInfo:
    """What :func:`build_site` wrote."""

    out_dir: Path
    n_features: int
    n_blocks: int
    n_token_rows: int
    bytes_written: int
    seconds: float

    @property
    def index(self) -> Path:
        return self.out_dir / "index.html"

    def feature_page(self, feature: int) -> str:
        """``file://`` URL of one latent's page."""
        return f"{(self.out_dir / 'feature.html').resolve().as_uri()}#{int(feature)}"


def block_name(block: int) -> str:
    return f"features-{block:04d}.js"


def token_block_name(block: int) -> str:
    return f"tokfeat-{block:04d}.js"


def block_of(feature: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    return int(feature) // int(block_size)


def _list_col(table: pa.Table, name: str) -> tuple[np.ndarray, pa.Array] | None:
    """(offsets, flat values) of a list column, nulls as empty lists; None when absent."""
    if name not in table.column_names:
        return None
    arr = table.column(name).combine_chunks()
    lens = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lens, dtype=np.int64)])
    return offsets, pc.list_flatten(arr)


class _Lists:
    """A list column flattened once, sliced per row as Python lists (strings) or rounded floats."""

    def __init__(self, table: pa.Table, name: str, kind: str, digits: int = DIGITS):
        got = _list_col(table, name)
        self.present = got is not None
        if got is None:
            return
        self.offsets, flat = got
        if kind == "str":
            self.values: list[Any] = pc.fill_null(flat, "").to_pylist()
        elif kind == "int":
            self.values = (
                pc.fill_null(flat, 0).to_numpy(zero_copy_only=False).astype(np.int64).tolist()
            )
        else:
            self.values = round_sig(
                pc.fill_null(flat, np.nan).to_numpy(zero_copy_only=False), digits
            )

    def row(self, i: int) -> list[Any]:
        return self.values[self.offsets[i] : self.offsets[i + 1]]


def _scalar_col(table: pa.Table, name: str, kind: str) -> list[Any] | None:
    if name not in table.column_names:
        return None
    col = table.column(name)
    if kind == "int":
        return [None if v is None else int(v) for v in col.to_pylist()]
    return round_sig(pc.fill_null(col, np.nan).to_numpy(zero_copy_only=False), DIGITS)


class _Examples:
    """The examples table flattened: per-row token ids (global dictionary) and activations."""

    def __init__(self, ex: pa.Table):
        self.n_rows = ex.num_rows
        self.feature = ex.column("feature").to_numpy().astype(np.int64)
        tok = _list_col(ex, "tokens")
        act = _list_col(ex, "acts")
        assert tok is not None and act is not None
        self.offsets, flat_tok = tok
        act_offsets, flat_act = act
        if not np.array_equal(self.offsets, act_offsets):
            bad = int(np.flatnonzero(np.diff(self.offsets) != np.diff(act_offsets))[0])
            raise ContractError(
                f"examples.parquet: row {bad} (feature {int(self.feature[bad])}) has "
                f"{int(np.diff(self.offsets)[bad])} tokens but {int(np.diff(act_offsets)[bad])} acts"
            )
        enc = pc.dictionary_encode(pc.fill_null(flat_tok, ""))
        if isinstance(enc, pa.ChunkedArray):
            enc = enc.combine_chunks()
        self.tok = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        self.dictionary = enc.dictionary
        acts = pc.fill_null(flat_act, 0.0).to_numpy(zero_copy_only=False).astype(np.float32)
        self.acts = np.nan_to_num(acts, nan=0.0, posinf=0.0, neginf=0.0)
        self.lens = np.diff(self.offsets)

        def enc_col(name: str, default: str) -> tuple[list[str], np.ndarray]:
            if name not in ex.column_names:
                return [default], np.zeros(self.n_rows, dtype=np.int64)
            e = pc.dictionary_encode(pc.fill_null(ex.column(name), default)).combine_chunks()
            names = e.dictionary.to_pylist()
            # Codes in sorted-name order, so they do not depend on the rows' order.
            order = sorted(range(len(names)), key=lambda i: names[i])
            remap = np.empty(len(names), dtype=np.int64)
            remap[order] = np.arange(len(names))
            codes = e.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            return [names[i] for i in order], remap[codes] if len(codes) else codes

        self.kinds, self.kind = enc_col("kind", "top")
        self.splits, self.split = enc_col("split", "")

        def int_col(name: str, default: int = 0) -> np.ndarray:
            if name not in ex.column_names:
                return np.full(self.n_rows, default, dtype=np.int64)
            return pc.fill_null(ex.column(name), default).to_numpy().astype(np.int64)

        self.rank = int_col("rank")
        self.doc = int_col("doc_id", -1)
        if "center" in ex.column_names:
            center = int_col("center", -1)
        else:
            center = np.full(self.n_rows, -1, dtype=np.int64)
        # A missing or out-of-window center is the window's argmax.
        bad = (center < 0) | (center >= self.lens)
        for r in np.flatnonzero(bad & (self.lens > 0)):
            a = self.acts[self.offsets[r] : self.offsets[r + 1]]
            center[r] = int(np.argmax(a))
        self.center = np.where(self.lens > 0, center, 0)
        if "max_act" in ex.column_names:
            self.max_act = pc.fill_null(ex.column("max_act"), np.nan).to_numpy().astype(np.float64)
        else:
            self.max_act = np.full(self.n_rows, np.nan)
        missing = ~np.isfinite(self.max_act) & (self.lens > 0)
        for r in np.flatnonzero(missing):
            self.max_act[r] = float(self.acts[self.offsets[r] + self.center[r]])

    def py_lists(self) -> dict[str, list[Any]]:
        """Per-row columns as Python lists (built once), keyed as in the block files."""
        if not hasattr(self, "_py"):
            self._py = {
                "k": self.kind.tolist(),
                "r": self.rank.tolist(),
                "s": self.split.tolist(),
                "doc": self.doc.tolist(),
                "c": self.center.tolist(),
                "m": round_sig(self.max_act, DIGITS),
                "len": self.lens.tolist(),
            }
        return self._py

    def rows_of(self, lo_feature: int, hi_feature: int) -> tuple[int, int]:
        """Row range of features in [lo_feature, hi_feature)."""
        lo = int(np.searchsorted(self.feature, lo_feature, "left"))
        hi = int(np.searchsorted(self.feature, hi_feature, "left"))
        return lo, hi

    def center_tokens(self) -> np.ndarray:
        """Global token id at each row's center (-1 for empty windows)."""
        idx = self.offsets[:-1] + self.center
        out = np.full(self.n_rows, -1, dtype=np.int64)
        ok = self.lens > 0
        out[ok] = self.tok[idx[ok]]
        return out


def _block_payload(
    cols: dict[str, Any],
    ex: _Examples | None,
    top: list[list[str]],
    frow_lo: int,
    frow_hi: int,
    block: int,
    block_size: int,
) -> dict[str, Any]:
    ids = cols["ids"]
    feats: list[dict[str, Any]] = []
    ex_lo, ex_hi = ex.rows_of(block * block_size, (block + 1) * block_size) if ex else (0, 0)
    strings: list[str] = []
    local = np.zeros(0, dtype=np.int64)
    if ex is not None and ex_hi > ex_lo:
        t0, t1 = int(ex.offsets[ex_lo]), int(ex.offsets[ex_hi])
        uniq, local = np.unique(ex.tok[t0:t1], return_inverse=True)
        strings = ex.dictionary.take(pa.array(uniq)).to_pylist()
        local = local.reshape(-1)
    tok_dtype = "<u2" if len(strings) <= 65536 else "<u4"
    for r in range(frow_lo, frow_hi):
        fid = int(ids[r])
        rec: dict[str, Any] = {"id": fid}
        for key, name in (("d", "density"), ("mean", "mean_act"), ("max", "max_act")):
            if cols[name] is not None:
                rec[key] = cols[name][r]
        if cols["n_fired"] is not None:
            rec["n"] = cols["n_fired"][r]
        for key, name in (
            ("he", "hist_edges"),
            ("hc", "hist_counts"),
            ("pt", "promoted_tokens"),
            ("pv", "promoted_values"),
            ("st", "suppressed_tokens"),
            ("sv", "suppressed_values"),
            ("nb", "neighbors"),
            ("nc", "neighbor_cos"),
        ):
            lists = cols[name]
            if lists.present:
                rec[key] = lists.row(r)
        rec["tt"] = top[r]
        if "nb" in rec:
            # Each neighbour's first top token, so its link says what it is.
            rows = np.searchsorted(ids, rec["nb"]) if rec["nb"] else np.zeros(0, np.int64)
            rec["nbt"] = [
                (top[p][0] if top[p] else None) if p < len(ids) and ids[p] == nb else None
                for p, nb in zip(rows.tolist(), rec["nb"], strict=True)
            ]
        if ex is not None:
            lo, hi = ex.rows_of(fid, fid + 1)
            if hi > lo:
                t0, t1 = int(ex.offsets[lo]), int(ex.offsets[hi])
                base = int(ex.offsets[ex_lo])
                lists = ex.py_lists()
                rec["ex"] = {key: col[lo:hi] for key, col in lists.items()}
                rec["ex"]["t"] = b64(local[t0 - base : t1 - base], tok_dtype)
                # Activations, sparse: positions (into this latent's tokens, all its windows
                # concatenated) and float32 values of the non-zero ones.
                acts = ex.acts[t0:t1]
                nz = np.flatnonzero(acts)
                wide = t1 - t0 > 65535
                rec["ex"]["ai"] = b64(nz, "<u4" if wide else "<u2")
                rec["ex"]["aiw"] = 4 if wide else 2
                rec["ex"]["av"] = b64(acts[nz], "<f4")
        feats.append(rec)
    return {
        "v": FORMAT_VERSION,
        "block": block,
        "size": block_size,
        "strings": strings,
        "tokWidth": 2 if tok_dtype == "<u2" else 4,
        "kinds": ex.kinds if ex is not None else [],
        "splits": ex.splits if ex is not None else [],
        "features": feats,
    }


def iter_blocks(
    a: Analysis, block_size: int = DEFAULT_BLOCK_SIZE
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(block number, payload) for every block of ``block_size`` latents that has at least one latent.

    Block ``b`` holds latents ``b*block_size .. (b+1)*block_size - 1`` (by id, so a page finds a
    latent's file from its id alone).
    """
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    cols = _feature_columns(a)
    ex = _Examples(a.examples) if a.examples is not None else None
    yield from _iter_blocks(a, cols, ex, block_size, _top_tokens(cols, ex))


def _feature_columns(a: Analysis) -> dict[str, Any]:
    f = a.features
    return {
        "ids": f.column("feature").to_numpy().astype(np.int64),
        "density": _scalar_col(f, "density", "float"),
        "n_fired": _scalar_col(f, "n_fired", "int"),
        "mean_act": _scalar_col(f, "mean_act", "float"),
        "max_act": _scalar_col(f, "max_act", "float"),
        "hist_edges": _Lists(f, "hist_edges", "float"),
        "hist_counts": _Lists(f, "hist_counts", "int"),
        "promoted_tokens": _Lists(f, "promoted_tokens", "str"),
        "promoted_values": _Lists(f, "promoted_values", "float"),
        "suppressed_tokens": _Lists(f, "suppressed_tokens", "str"),
        "suppressed_values": _Lists(f, "suppressed_values", "float"),
        "neighbors": _Lists(f, "neighbors", "int"),
        "neighbor_cos": _Lists(f, "neighbor_cos", "float"),
    }


def _iter_blocks(
    a: Analysis, cols: dict[str, Any], ex: _Examples | None, block_size: int, top: list[list[str]]
) -> Iterator[tuple[int, dict[str, Any]]]:
    ids = cols["ids"]
    if not len(ids):
        return
    blocks = np.unique(ids // block_size)
    for b in blocks.tolist():
        lo = int(np.searchsorted(ids, b * block_size, "left"))
        hi = int(np.searchsorted(ids, (b + 1) * block_size, "left"))
        yield b, _block_payload(cols, ex, top, lo, hi, b, block_size)


def _top_tokens(cols: dict[str, Any], ex: _Examples | None) -> list[list[str]]:
    """Per feature row: up to INDEX_TOP_TOKENS distinct tokens at the maximum of its top contexts,
    in rank order."""
    ids = cols["ids"]
    n = len(ids)
    top: list[list[str]] = [[] for _ in range(n)]
    if ex is None or not ex.n_rows or "top" not in ex.kinds:
        return top
    rows = np.flatnonzero(ex.kind == ex.kinds.index("top"))
    ctok = ex.center_tokens()[rows]
    feat = ex.feature[rows]
    pos = np.minimum(np.searchsorted(ids, feat), max(n - 1, 0))
    ok = (ids[pos] == feat) & (ctok >= 0) if n else np.zeros(len(rows), bool)
    chosen: dict[int, list[int]] = {}
    for p, t in zip(pos[ok].tolist(), ctok[ok].tolist(), strict=True):
        lst = chosen.setdefault(p, [])
        if len(lst) < INDEX_TOP_TOKENS and t not in lst:
            lst.append(t)
    needed = sorted({t for lst in chosen.values() for t in lst})
    if needed:
        names = dict(
            zip(needed, ex.dictionary.take(pa.array(needed, pa.int64())).to_pylist(), strict=True)
        )
        for p, lst in chosen.items():
            top[p] = [names[t] for t in lst]
    return top


def _index_payload(cols: dict[str, Any], top: list[list[str]]) -> dict[str, Any]:
    """Columns for the index table: one entry per latent, in id order; token strings interned."""
    ids = cols["ids"]
    n = len(ids)
    strings: list[str] = []
    where: dict[str, int] = {}

    def sid(s: str) -> int:
        if s not in where:
            where[s] = len(strings)
            strings.append(s)
        return where[s]

    top_ids = [[sid(s) for s in lst] for lst in top]
    prom: list[list[int]] = [[] for _ in range(n)]
    pt = cols["promoted_tokens"]
    if pt.present:
        for i in range(n):
            prom[i] = [sid(s) for s in pt.row(i)[:INDEX_TOP_TOKENS]]
    out: dict[str, Any] = {
        "n": n,
        "id": ids.tolist(),
        "strings": strings,
        "top": top_ids,
        "prom": prom,
    }
    for key, name in (("d", "density"), ("mean", "mean_act"), ("max", "max_act")):
        if cols[name] is not None:
            out[key] = round_sig(np.array(cols[name], dtype=np.float64), INDEX_DIGITS)
    if cols["n_fired"] is not None:
        out["nf"] = cols["n_fired"]
    return out


def _token_payloads(
    a: Analysis, token_block: int
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    t = a.token_features
    if t is None or t.num_rows == 0:
        return None, []
    toks = pc.fill_null(t.column("token"), "").to_pylist()
    ids = (
        t.column("token_id").to_pylist() if "token_id" in t.column_names else list(range(len(toks)))
    )
    feats = _Lists(t, "features", "int")
    vals = _Lists(t, "values", "float", INDEX_DIGITS)
    blocks = []
    for b0 in range(0, len(toks), token_block):
        rows = range(b0, min(b0 + token_block, len(toks)))
        blocks.append(
            {
                "f": [feats.row(r) for r in rows],
                "v": [vals.row(r) if vals.present else [] for r in rows],
            }
        )
    return {"tok": toks, "id": ids, "bs": token_block, "n": len(toks)}, blocks


def _meta_payload(a: Analysis, info: dict[str, Any]) -> dict[str, Any]:
    return {"summary": a.summary, "site": info}


def _static(name: str) -> bytes:
    return resources.files("saepipe.dashboard").joinpath("static", name).read_bytes()


def build_site(
    analysis_dir: str | Path | Analysis,
    out_dir: str | Path,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    token_block: int = DEFAULT_TOKEN_BLOCK,
    title: str | None = None,
) -> SiteInfo:
    """Write the static dashboard for ``analysis_dir`` (the ``analyze`` stage's folder) into ``out_dir``.

    ``block_size`` latents share one data file (a feature page loads one file: ~0.5 MB for 64 latents
    with 40 contexts of 32 tokens each); ``token_block`` token rows share one token-search file.
    ``title`` overrides the page title (default: the summary's model). Returns a :class:`SiteInfo`.
    Deterministic: the same input gives byte-identical files.
    """
    t_start = time.perf_counter()
    a = analysis_dir if isinstance(analysis_dir, Analysis) else load_analysis(analysis_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("data", "assets"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    (out / "data").mkdir()
    (out / "assets").mkdir()
    written = 0

    def write(rel: str, content: str | bytes) -> None:
        nonlocal written
        data = content.encode("utf-8") if isinstance(content, str) else content
        (out / rel).write_bytes(data)
        written += len(data)

    cols = _feature_columns(a)
    ex = _Examples(a.examples) if a.examples is not None else None
    top = _top_tokens(cols, ex)
    blocks = []
    for b, payload in _iter_blocks(a, cols, ex, block_size, top):
        write(f"data/{block_name(b)}", js_call("block", b, payload))
        blocks.append(b)
    write("data/index.js", js_call("setIndex", _index_payload(cols, top)))
    tok_meta, tok_blocks = _token_payloads(a, token_block)
    if tok_meta is not None:
        write("data/tokens.js", js_call("setTokens", tok_meta))
        for i, payload in enumerate(tok_blocks):
            write(f"data/{token_block_name(i)}", js_call("tokenBlock", i, payload))
    info = {
        "version": FORMAT_VERSION,
        "blockSize": block_size,
        "blocks": blocks,
        "nFeatures": a.n_features,
        "nRows": len(cols["ids"]),
        "hasExamples": ex is not None,
        "hasTokens": tok_meta is not None,
        "tokenBlock": token_block,
        "title": title,
    }
    write("data/meta.js", js_call("setMeta", _meta_payload(a, info)))
    write("assets/dashboard.css", b"\n".join(_static(name) for name in CSS))
    for name in ASSETS:
        write(f"assets/{name}", _static(name))
    for name in PAGES:
        write(name, _static(name))
    return SiteInfo(
        out_dir=out,
        n_features=len(cols["ids"]),
        n_blocks=len(blocks),
        n_token_rows=0 if tok_meta is None else tok_meta["n"],
        bytes_written=written,
        seconds=time.perf_counter() - t_start,
    )


__all__ = ["SiteInfo", "block_name", "block_of", "build_site", "iter_blocks"]
