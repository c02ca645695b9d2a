"""The analyze stage against brute force: a small run (tiny random model, a random SAE, a few shard
folders) whose every output is recomputed with plain numpy from the dense codes."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import mlx.core as mx
import numpy as np
import pyarrow.parquet as pq
import pytest

from saepipe.activations.shards import ShardWriter, write_manifest
from saepipe.analysis.codes import Encoder, encode_sources
from saepipe.analysis.config import AnalysisConfig
from saepipe.analysis.directions import decoder_directions
from saepipe.analysis.rows import ArrayRows, ShardRows
from saepipe.analysis.run import analyze, analyze_rows
from saepipe.analysis.tokens import TokenStrings
from saepipe.dashboard.data import EXAMPLE_COLUMNS, FEATURE_COLUMNS, TOKEN_COLUMNS, load_analysis
from saepipe.sae.topk import TopKSAE

LAYER = 1
CFG = AnalysisConfig(top_n=5, window_before=4, window_after=3, quantiles=3, per_quantile=2, histogram_bins=8,
                     logit_top=5, neighbors=4, token_top=6, chunk_rows=128)
DEAD = [3, 77]  # latents that can never fire
DENSE = [5]  # a latent that fires almost everywhere


def make_sae(tiny_model) -> TopKSAE:
    from saepipe.activations.stats import NormStats

    d = tiny_model.info.d_model
    rng = np.random.default_rng(1)
    stats = NormStats(rng.normal(0, 0.1, d), rng.uniform(0.5, 2.0, d), 1.0, 100)
    sae = TopKSAE(d, 4, 8, stats=stats, seed=3, metadata={"layer": LAYER, "component": "mlp",
                                                          "model_hash": tiny_model.info.model_hash})
    b = np.zeros(sae.d_hidden, np.float32)
    b[DEAD] = -1e4
    b[DENSE] = 50.0
    sae.update({"b_enc": mx.array(b)})
    return sae


def make_rows(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activations, token ids and documents (contiguous runs of 3-40 rows), with some exact
    duplicate rows (tied activations) in other documents."""
    rng = np.random.default_rng(seed)
    acts = rng.normal(0, 1, (n, d)).astype(np.float32) * rng.uniform(0.3, 3.0, (n, 1)).astype(np.float32)
    dup = rng.choice(n, n // 20, replace=False)
    acts[dup] = acts[rng.choice(n, len(dup))]
    tok = rng.integers(0, 200, n).astype(np.int32)
    lengths = rng.integers(3, 41, n)
    doc = np.repeat(np.arange(n), lengths)[:n].astype(np.int64) + seed * 100_000
    return acts, tok, doc


def write_split(folder: Path, acts: np.ndarray, tok: np.ndarray, doc: np.ndarray, split: str, shard_rows: int,
                model_hash: str = "random-seed0") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(folder, acts.shape[1], dtype="float32", shard_rows=shard_rows)
    writer.add(acts, tok, doc, np.zeros(len(acts), np.int32))
    shards = writer.close()
    write_manifest(folder, {"d_model": acts.shape[1], "split": split, "layer": LAYER, "component": "mlp",
                            "model_hash": model_hash, "n_tokens": len(acts),
                            "shards": [s._asdict() for s in shards]})
    return folder


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    d = tiny_model.info.d_model
    train, ev = make_rows(2000, d, 0), make_rows(400, d, 1)
    sources = [ShardRows(write_split(root / "extract" / "train", *train, "train", 300), "train"),
               ShardRows(write_split(root / "extract" / "eval", *ev, "eval", 300), "eval")]
    sae = make_sae(tiny_model)
    tables = analyze(sources, sae, tiny_model, CFG, root / "analyze", scratch_dir=root / "scratch")
    codes = encode_sources(sources, Encoder(sae), Path(tmp_path_factory.mktemp("codes")), CFG.chunk_rows)
    dense = np.zeros((codes.n_rows, sae.d_hidden), np.float32)
    np.put_along_axis(dense, np.asarray(codes.indices, np.int64), np.asarray(codes.values), axis=1)
    tok = np.concatenate([train[1], ev[1]])
    doc = np.concatenate([train[2], ev[2]])
    split = np.repeat([0, 1], [2000, 400])
    acts = np.concatenate([train[0], ev[0]])
    return {"root": root, "tables": tables, "sae": sae, "dense": dense, "tok": tok, "doc": doc,
            "split": split, "acts": acts, "sources": sources, "model": tiny_model,
            "strings": TokenStrings(tiny_model.tokenizer)}


# ------------------------------------------------------------------------------------ encode


def test_codes_are_the_saes_topk_code(run):
    """The encode pass gives the SAE's own TopK code (TopKSAE.encode, MLX) up to float rounding."""
    ref = np.array(run["sae"].encode(mx.array(run["acts"])))
    dense = run["dense"]
    assert np.allclose(dense, ref, atol=1e-4)
    assert ((dense > 0) == (ref > 0)).all(axis=1).mean() > 0.99


# ------------------------------------------------------------------------------ statistics


def test_contract_types_and_one_row_per_latent(run):
    t = run["tables"]
    assert {f.name: f.type for f in t.features.schema} == FEATURE_COLUMNS
    assert {f.name: f.type for f in t.examples.schema} == EXAMPLE_COLUMNS
    assert {f.name: f.type for f in t.token_features.schema} == TOKEN_COLUMNS
    assert t.features.column("feature").to_pylist() == list(range(run["sae"].d_hidden))
    a = load_analysis(run["root"] / "analyze")  # the dashboard reads it as written
    assert a.features.num_rows == run["sae"].d_hidden and a.examples.num_rows == t.examples.num_rows
    s = json.loads((run["root"] / "analyze" / "summary.json").read_text())
    assert s["n_features"] == run["sae"].d_hidden and s["n_tokens"] == 2400
    assert s["splits"] == {"train": 2000, "eval": 400} and s["site"] == {"layer": LAYER, "component": "mlp"}
    assert s["quantiles"] == 3 and s["top_n"] == 5 and s["window"] == 8 and s["dead"] == len(DEAD)
    assert set(s["seconds"]) >= {"encode", "statistics", "contexts", "tokens", "logits", "neighbors", "tables",
                                 "write", "total"}


def test_density_mean_max_and_histograms(run):
    f = run["tables"].features.to_pydict()
    dense = run["dense"]
    fired = (dense > 0).sum(axis=0)
    assert f["n_fired"] == fired.tolist()
    assert np.array_equal(f["density"], fired / len(dense))
    assert np.allclose(f["mean_act"], dense.sum(0, dtype=np.float64) / np.maximum(fired, 1), rtol=1e-6)
    assert np.array_equal(np.array(f["max_act"], np.float32), dense.max(axis=0))
    bins = CFG.histogram_bins
    for j in range(dense.shape[1]):
        v = dense[:, j][dense[:, j] > 0]
        if not len(v):
            assert j in DEAD and f["hist_counts"][j] == [] and f["hist_edges"][j] == []
            continue
        m = v.max()
        b = np.minimum((v.astype(np.float64) * (bins / np.float64(m))).astype(np.int64), bins - 1)
        assert f["hist_counts"][j] == np.bincount(b, minlength=bins).tolist()
        assert f["hist_edges"][j] == pytest.approx(np.linspace(0, m, bins + 1), rel=1e-6)
        assert f["hist_edges"][j][-1] == m
    assert fired[DENSE[0]] > 0.9 * len(dense)


# -------------------------------------------------------------------------------- contexts


def brute_examples(run) -> list[tuple]:
    """Every example (feature, kind, rank, row) by the module docstring's rules, plainly."""
    dense, doc = run["dense"], run["doc"]
    out = []
    for j in range(dense.shape[1]):
        rows = np.flatnonzero(dense[:, j] > 0)
        vals = dense[rows, j]
        strongest = rows[np.lexsort((rows, -vals))]  # activation descending, then row ascending
        top, docs = [], set()
        for r in strongest:
            if doc[r] not in docs:
                docs.add(doc[r])
                top.append(int(r))
            if len(top) == CFG.top_n:
                break
        out += [(j, "top", i, r) for i, r in enumerate(top)]
        ascending = strongest[::-1]
        n, m = len(ascending), CFG.quantiles
        for q in reversed(range(m)):
            lo, hi = q * n // m, (q + 1) * n // m
            size, p = hi - lo, min(CFG.per_quantile, hi - lo)
            picks = [int(ascending[lo + (2 * t + 1) * size // (2 * p)]) for t in reversed(range(p))]
            picks = [r for r in picks if r not in top]
            out += [(j, f"q{q}", i, r) for i, r in enumerate(picks)]
    return out


def test_top_contexts_and_quantile_samples(run):
    ex = run["tables"].examples.to_pydict()
    dense, doc, split, tok = run["dense"], run["doc"], run["split"], run["tok"]
    expected = brute_examples(run)
    got = list(zip(ex["feature"], ex["kind"], ex["rank"], strict=True))
    assert got == [e[:3] for e in expected]  # same examples, in display order
    strings = run["strings"]
    for i, (j, _kind, _rank, r) in enumerate(expected):
        assert ex["doc_id"][i] == doc[r] and ex["split"][i] == ("train", "eval")[split[r]]
        assert ex["max_act"][i] == dense[r, j]
        lo = r
        while lo > r - CFG.window_before and lo > 0 and doc[lo - 1] == doc[r] and split[lo - 1] == split[r]:
            lo -= 1
        hi = r
        while hi < r + CFG.window_after and hi + 1 < len(doc) and doc[hi + 1] == doc[r] and split[hi + 1] == split[r]:
            hi += 1
        assert ex["center"][i] == r - lo
        assert ex["acts"][i] == dense[lo : hi + 1, j].tolist()
        assert ex["tokens"][i] == strings.strings(tok[lo : hi + 1])
    kinds = [k for k in ex["kind"] if k != "top"]
    assert kinds and {"q0", "q2"} <= set(kinds)
    # top contexts: one per document, and the window's maximum at the center
    for i, kind in enumerate(ex["kind"]):
        if kind == "top":
            assert ex["acts"][i][ex["center"][i]] == max(ex["acts"][i])


def test_the_data_has_ties(run):
    """Duplicated rows give exactly tied activations in other documents, so the exact comparisons
    above also pin the tie order (the earlier row first)."""
    dense = run["dense"]
    tied = sum(len(v) - len(np.unique(v)) for v in (dense[:, j][dense[:, j] > 0] for j in range(dense.shape[1])))
    assert tied > 50


# ------------------------------------------------------------------------------ token index


def test_token_features(run):
    tf = run["tables"].token_features.to_pydict()
    dense, tok = run["dense"], run["tok"]
    want_ids = sorted(set(tok.tolist()))
    assert tf["token_id"] == want_ids
    assert tf["token"] == run["strings"].strings(want_ids)
    for t, feats, vals in zip(tf["token_id"], tf["features"], tf["values"], strict=True):
        m = dense[tok == t].max(axis=0)
        js = np.flatnonzero(m > 0)
        order = js[np.lexsort((js, -m[js]))][: CFG.token_top]
        assert feats == order.tolist() and vals == m[order].tolist()


# ------------------------------------------------------------------------------ directions


def test_logit_effects_and_neighbors(run):
    f = run["tables"].features.to_pydict()
    sae, module = run["sae"], run["model"].model
    directions = np.asarray(sae.W_dec, np.float64) * np.asarray(
        np.sqrt(np.mean(np.square(sae.stats.std))), np.float64)  # scalar normalization's std
    assert np.allclose(decoder_directions(sae), directions, rtol=1e-6)
    emb = np.asarray(module.model.embed_tokens.weight, np.float64)  # tied unembedding
    logits = (directions * np.asarray(module.model.norm.weight, np.float64)) @ emb.T
    unit = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    cos = unit @ unit.T
    np.fill_diagonal(cos, -np.inf)
    strings = run["strings"]
    for j in range(sae.d_hidden):
        up = np.argsort(-logits[j], kind="stable")[: CFG.logit_top]
        down = np.argsort(logits[j], kind="stable")[: CFG.logit_top]
        assert f["promoted_values"][j] == pytest.approx(logits[j, up], rel=1e-4, abs=1e-6)
        assert f["suppressed_values"][j] == pytest.approx(logits[j, down], rel=1e-4, abs=1e-6)
        assert f["promoted_tokens"][j] == strings.strings(up) or _near_tie(logits[j], up, f, j)
        near = np.argsort(-cos[j], kind="stable")[: CFG.neighbors]
        assert f["neighbors"][j] == near.tolist()
        assert f["neighbor_cos"][j] == pytest.approx(cos[j, near], abs=1e-5)


def _near_tie(row: np.ndarray, order: np.ndarray, f: dict, j: int) -> bool:
    gaps = np.abs(np.diff(row[order]))
    return bool((gaps < 1e-5).any())


# ---------------------------------------------------------------- determinism, memory, API path


def test_outputs_are_byte_identical_across_runs(run, tmp_path):
    sources, sae, model = run["sources"], run["sae"], run["model"]
    analyze(sources, sae, model, CFG, tmp_path / "again", scratch_dir=tmp_path)
    first, again = run["root"] / "analyze", tmp_path / "again"
    for name in ("features.parquet", "examples.parquet", "token_features.parquet"):
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    s1, s2 = (json.loads((p / "summary.json").read_text()) for p in (first, again))
    timings = ("seconds", "cpu_seconds")
    assert {k: v for k, v in s1.items() if k not in timings} == {k: v for k, v in s2.items() if k not in timings}
    assert not any(tmp_path.glob("saepipe-analyze-*")), "the scratch folder is removed"


def test_in_memory_rows_give_the_same_tables(run):
    """ArrayRows (the Python API's path) and shard folders give the same analysis; a feature subset
    gives the same rows for those latents."""
    sources = [ArrayRows(run["acts"][:2000], run["tok"][:2000], run["doc"][:2000], "train"),
               ArrayRows(run["acts"][2000:], run["tok"][2000:], run["doc"][2000:], "eval")]
    sub = analyze_rows(sources, run["sae"], run["model"], CFG, features=[9, 2])
    full = run["tables"]
    assert sub.token_features.equals(full.token_features)
    ex_full = full.examples.filter(np.isin(full.examples.column("feature").to_numpy(), [2, 9]))
    assert sub.examples.equals(ex_full)
    fs, ff = sub.features.to_pydict(), full.features.to_pydict()
    for j in (2, 9):
        for key in fs:  # a smaller matmul may round the logits and cosines differently
            floats = key in ("promoted_values", "suppressed_values", "neighbor_cos")
            assert fs[key][j] == (pytest.approx(ff[key][j], rel=1e-5) if floats else ff[key][j]), key
    assert fs["promoted_tokens"][0] == [] and fs["n_fired"] == ff["n_fired"]


def _peak(sources, sae, model, tmp: Path) -> int:
    tracemalloc.start()
    try:
        analyze_rows(sources, sae, model, CFG, scratch_dir=tmp)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_shards(run, tmp_path):
    """2 vs 8 shards of 16,384 rows: the Python/numpy peak stays the same (codes live in scratch
    files, metadata is read chunk by chunk); a single O(rows) int32 array would add ~0.4 MB."""
    sae, model, d = run["sae"], run["model"], run["model"].info.d_model
    peaks = []
    for n_shards in (2, 8):
        acts, tok, doc = make_rows(16384 * n_shards, d, seed=7)
        folder = write_split(tmp_path / f"s{n_shards}", acts, tok, doc, "train", 16384)
        del acts
        peaks.append(_peak([ShardRows(folder, "train")], sae, model, tmp_path))
    print(f"\ntracemalloc peaks: 2 shards {peaks[0] / 1e6:.2f} MB, 8 shards {peaks[1] / 1e6:.2f} MB")
    assert peaks[1] < peaks[0] + 200_000


def test_config_validation():
    with pytest.raises(ValueError, match="top_n"):
        AnalysisConfig(top_n=0)
    with pytest.raises(ValueError, match="window_before"):
        AnalysisConfig(window_before=-1)
    with pytest.raises(ValueError, match="splits"):
        AnalysisConfig(splits=())
    with pytest.raises(ValueError, match="unknown key"):
        AnalysisConfig.from_dict({"top_k": 3})
    assert AnalysisConfig.from_dict({"splits": ["eval"]}).splits == ("eval",)
    assert AnalysisConfig().window == 32


def test_parquet_files_are_readable_by_pyarrow(run):
    for name in ("features.parquet", "examples.parquet", "token_features.parquet"):
        assert pq.read_table(run["root"] / "analyze" / name).num_rows > 0
