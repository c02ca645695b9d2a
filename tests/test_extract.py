"""extract: stored rows equal a direct forward, masking, manifest, shards, resumption, errors."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from saepipe.activations.config import ExtractConfig
from saepipe.activations.extract import (
    PROGRESS,
    check_storable,
    extract,
    extract_sites,
    extract_split,
)
from saepipe.activations.shards import MANIFEST, ShardSource
from saepipe.activations.sources import ActivationSource, as_source
from saepipe.lm.forward import forward
from saepipe.lm.sites import Site
from saepipe.runtime.files import file_sha256

SITE = Site(1, "mlp")

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "seven", "quick", "foxes", "jumped", "over", "lazy", "dogs", "near", "rivers"]


def _texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 12)))) for _ in range(n)]


@pytest.fixture
def texts_path(tmp_path):
    train, ev = _texts(14, 0), _texts(5, 1)
    texts = train + ev
    splits = ["train"] * len(train) + ["eval"] * len(ev)
    order = np.random.default_rng(2).permutation(len(texts))  # splits interleaved in the file
    table = pa.table({
        "id": pa.array(np.arange(len(texts), dtype=np.int64) + 100),
        "text": [texts[i] for i in order], "source": ["test"] * len(texts),
        "split": [splits[i] for i in order],
    })
    path = tmp_path / "texts.parquet"
    pq.write_table(table, path)
    return path


def _cfg(**kw) -> ExtractConfig:
    base = dict(context_length=24, batch_size=4, dtype="float32",
                max_tokens=300, eval_max_tokens=40, skip_special_tokens=True, shard_rows=64)
    return ExtractConfig(**{**base, **kw})


def _expected_rows(loaded, texts_path, split, cfg, site):
    """Per prepare id: (rows, positions) of the text alone through forward, special tokens dropped."""
    table = pq.read_table(texts_path).to_pylist()
    special = list(loaded.tokenizer.all_special_ids)
    rows = {}
    for rec in table:
        if rec["split"] != split:
            continue
        toks = loaded.tokenizer.encode(rec["text"])[: cfg.context_length]
        acts = forward(loaded.model, mx.array([toks]), stop_layer=site.layer, capture=[site]).activations[site]
        keep = ~np.isin(toks, special)
        rows[rec["id"]] = (np.array(acts[0])[keep], np.flatnonzero(keep))
    return rows


def _assert_rows_match(src, expected, rtol, atol=None):
    """Stored rows come text by text; each text's rows equal its own forward (the last may be cut)."""
    doc_ids, positions, acts = src.doc_ids, src.positions, src.take(np.arange(src.n_rows))
    starts = np.flatnonzero(np.r_[True, doc_ids[1:] != doc_ids[:-1]])
    assert len(set(doc_ids[starts])) == len(starts)  # each text's rows are contiguous
    ends = [*starts[1:], len(doc_ids)]
    for i, (a, b) in enumerate(zip(starts, ends, strict=True)):
        want, want_pos = expected[int(doc_ids[a])]
        assert b - a == len(want) or i == len(starts) - 1
        np.testing.assert_allclose(acts[a:b], want[: b - a], rtol=rtol, atol=rtol if atol is None else atol)
        np.testing.assert_array_equal(positions[a:b], want_pos[: b - a])


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float16", 2e-3)])
def test_rows_equal_direct_forward(tiny_model, texts_path, tmp_path, dtype, tol):
    cfg = _cfg(dtype=dtype)
    manifest = extract_split(tiny_model, texts_path, tmp_path / "train", cfg, "train", site="1.output",
                             progress=False)
    src = ShardSource(tmp_path / "train", verify=True)
    expected = _expected_rows(tiny_model, texts_path, "train", cfg, Site(1, "output"))
    n = min(sum(len(r) for r, _ in expected.values()), cfg.max_tokens)
    assert src.n_rows == manifest["n_tokens"] == n == sum(s["rows"] for s in manifest["shards"])
    _assert_rows_match(src, expected, tol)
    assert manifest["dtype"] == dtype and manifest["d_model"] == src.d_model == 64
    assert manifest["layer"] == 1 and manifest["component"] == "output" and manifest["split"] == "train"


def test_batches_sort_by_length_and_cover_every_text(tiny_model, texts_path):
    from saepipe.activations.extract import make_batches
    from saepipe.texts.prepare import read_split

    ids, texts = read_split(texts_path, "train")
    batches = list(make_batches(tiny_model.tokenizer, ids, texts, _cfg(), sort_window=32))
    assert sorted(np.concatenate([b.doc_ids for b in batches]).tolist()) == sorted(ids.tolist())
    widths = [b.tokens.shape[1] for b in batches]
    assert widths == sorted(widths)  # one window here: batches go from short to long texts
    later = list(make_batches(tiny_model.tokenizer, ids, texts, _cfg(), start_batch=2, sort_window=32))
    assert all((a.tokens == b.tokens).all() for a, b in zip(later, batches[2:], strict=True))
    in_order = list(make_batches(tiny_model.tokenizer, ids, texts, _cfg()))  # sort_window=0
    assert np.concatenate([b.doc_ids for b in in_order]).tolist() == ids.tolist()
    for b in in_order:
        assert (b.lengths == (b.tokens != 258).sum(1)).all() and b.keep.sum() == (b.lengths - 1).sum()


def test_no_pad_or_special_rows_and_budget(tiny_model, texts_path, tmp_path):
    cfg = _cfg(max_tokens=50)
    extract_split(tiny_model, texts_path, tmp_path / "t", cfg, "train", site=SITE, progress=False)
    src = ShardSource(tmp_path / "t")
    special = set(tiny_model.tokenizer.all_special_ids)
    assert src.n_rows == 50
    assert not special & set(src.token_ids.tolist())
    assert src.positions.min() >= 1  # position 0 is BOS
    assert [s["rows"] for s in src.manifest["shards"]] == [50]


def test_skip_special_tokens_false_keeps_bos(tiny_model, texts_path, tmp_path):
    cfg = _cfg(skip_special_tokens=False, max_tokens=10_000)
    extract_split(tiny_model, texts_path, tmp_path / "t", cfg, "train", site=SITE, progress=False)
    src = ShardSource(tmp_path / "t")
    bos = tiny_model.tokenizer.bos_token_id
    starts = src.positions == 0
    assert starts.sum() == 14 and (src.token_ids[starts] == bos).all()
    assert 258 not in set(src.token_ids.tolist())  # the pad id never appears


def test_both_splits_kept_apart(tiny_model, texts_path, tmp_path):
    manifests = extract(tiny_model, texts_path, tmp_path / "out", _cfg(), [SITE], progress=False)[SITE]
    train_ids = set(ShardSource(tmp_path / "out" / "1.mlp" / "train").doc_ids.tolist())
    eval_ids = set(ShardSource(tmp_path / "out" / "1.mlp" / "eval").doc_ids.tolist())
    assert train_ids and eval_ids and not train_ids & eval_ids
    assert manifests["eval"]["n_tokens"] == 40
    assert manifests["train"]["digest"] != manifests["eval"]["digest"]


SITES = [Site(0, "attn"), Site(1, "mlp"), Site(2, "output"), Site(3, "attn")]


def test_many_sites_in_one_pass_equal_one_site_each(tiny_model, texts_path, tmp_path, monkeypatch):
    """Each site's folder is what a one-site extraction of it writes, and the model ran once per batch."""
    import saepipe.activations.extract as ex

    cfg = _cfg(shard_rows=32, max_tokens=150)
    calls = []
    real = ex.forward
    monkeypatch.setattr(ex, "forward", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    manifests, stats = extract_sites(tiny_model, texts_path, {s: tmp_path / "many" / s.id for s in SITES},
                                     cfg, "train", progress=False)
    assert stats.sites_run == [s.id for s in SITES] and stats.sites_reused == [] and stats.stop_layer == 3
    assert len(calls) == stats.batches and all(set(c["capture"]) == set(SITES) for c in calls)
    assert all(c["stop_layer"] == 3 for c in calls) and stats.rows == 150
    for site in SITES:
        alone = extract_split(tiny_model, texts_path, tmp_path / "one" / site.id, cfg, "train", site=site,
                              progress=False)
        assert manifests[site]["digest"] == alone["digest"]
        assert (manifests[site]["layer"], manifests[site]["component"]) == site
    assert len(calls) == stats.batches * (1 + len(SITES))  # one pass per batch for all four, then one each


def test_many_sites_resume_after_a_kill(tiny_model, texts_path, tmp_path):
    cfg = _cfg(shard_rows=16, max_tokens=100, batch_size=1)  # < 24 rows a batch: shards land one by one
    outs = {s: tmp_path / "part" / s.id for s in SITES}
    full, _ = extract_sites(tiny_model, texts_path, {s: tmp_path / "full" / s.id for s in SITES}, cfg, "train",
                            progress=False)
    # killed right after the first site's third shard landed: the others are behind it
    assert extract_sites(tiny_model, texts_path, outs, cfg, "train", max_shards=3, progress=False) is None
    progress = [outs[s] / PROGRESS for s in SITES]
    counts = [len(json.loads(p.read_text())["shards"]) if p.exists() else 0 for p in progress]
    assert counts[0] == 3 and min(counts) >= 1 and max(counts[1:]) < 3
    resumed, stats = extract_sites(tiny_model, texts_path, outs, cfg, "train", progress=False)
    assert stats.rows == 100 - min(counts) * 16  # resumed from the shards every site had
    assert all(resumed[s]["digest"] == full[s]["digest"] for s in SITES)
    assert not any((outs[s] / PROGRESS).exists() for s in SITES)


def test_adding_a_site_runs_the_model_for_it_only(tiny_model, texts_path, tmp_path):
    out = tmp_path / "out"
    extract(tiny_model, texts_path, out, _cfg(), [Site(2, "mlp")], progress=False)
    first = ShardSource(out / "2.mlp" / "train").manifest
    extract(tiny_model, texts_path, out, _cfg(), [Site(2, "mlp"), Site(0, "attn")], progress=False)
    passes = json.loads((out / "extract.json").read_text())
    assert passes["train"]["sites_run"] == ["0.attn"] and passes["train"]["sites_reused"] == ["2.mlp"]
    assert passes["train"]["stop_layer"] == 0
    assert ShardSource(out / "2.mlp" / "train").manifest == first  # untouched
    extract(tiny_model, texts_path, out, _cfg(), [Site(0, "attn")], progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["0.attn", "extract.json"]  # unlisted sites removed
    assert json.loads((out / "extract.json").read_text())["eval"]["sites_run"] == []


def test_the_layout_before_sweeps_is_moved_not_extracted_again(tiny_model, texts_path, tmp_path):
    """data/extract/{train,eval} of one site (before sweeps) become data/extract/<site>/{train,eval}."""
    out = tmp_path / "out"
    old = {split: extract_split(tiny_model, texts_path, out / split, _cfg(), split, site=SITE, progress=False)
           for split in ("train", "eval")}
    manifests = extract(tiny_model, texts_path, out, _cfg(), [SITE], progress=False)[SITE]
    assert all(manifests[split]["digest"] == old[split]["digest"] for split in old)
    assert sorted(p.name for p in out.iterdir()) == ["1.mlp", "extract.json"]
    assert json.loads((out / "extract.json").read_text())["train"]["sites_reused"] == ["1.mlp"]


@pytest.mark.parametrize("window", [1, 2, 32])
def test_resume_equals_uninterrupted_run(tiny_model, texts_path, tmp_path, monkeypatch, window):
    import saepipe.activations.extract

    monkeypatch.setattr(saepipe.activations.extract, "SORT_WINDOW_BATCHES", window)
    cfg = _cfg(shard_rows=16, max_tokens=100, batch_size=3)
    full = extract_split(tiny_model, texts_path, tmp_path / "full", cfg, "train", site=SITE, progress=False)
    part = tmp_path / "part"
    assert extract_split(tiny_model, texts_path, part, cfg, "train", site=SITE, max_shards=2, progress=False) is None
    assert not (part / MANIFEST).exists() and (part / PROGRESS).exists()
    assert len(json.loads((part / PROGRESS).read_text())["shards"]) == 2
    (part / "shard-00002.arrow.tmp").write_bytes(b"half-written")  # a kill mid-write
    resumed = extract_split(tiny_model, texts_path, part, cfg, "train", site=SITE, progress=False)
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in full["shards"]]
    assert resumed["digest"] == full["digest"]
    assert not (part / PROGRESS).exists() and not list(part.glob("*.tmp"))


def test_resume_redoes_corrupt_shard(tiny_model, texts_path, tmp_path):
    cfg = _cfg(shard_rows=16, max_tokens=100)
    full = extract_split(tiny_model, texts_path, tmp_path / "full", cfg, "train", site=SITE, progress=False)
    part = tmp_path / "part"
    extract_split(tiny_model, texts_path, part, cfg, "train", site=SITE, max_shards=3, progress=False)
    (part / "shard-00001.arrow").write_bytes(b"garbage")
    resumed = extract_split(tiny_model, texts_path, part, cfg, "train", site=SITE, progress=False)
    assert resumed["digest"] == full["digest"]
    assert file_sha256(part / "shard-00001.arrow") == full["shards"][1]["sha256"]


def test_rerun_of_finished_folder_is_a_no_op(tiny_model, texts_path, tmp_path):
    cfg = _cfg()
    first = extract_split(tiny_model, texts_path, tmp_path / "t", cfg, "train", site=SITE, progress=False)
    mtime = (tmp_path / "t" / "shard-00000.arrow").stat().st_mtime_ns
    again = extract_split(tiny_model, texts_path, tmp_path / "t", cfg, "train", site=SITE, progress=False)
    assert again == first
    assert (tmp_path / "t" / "shard-00000.arrow").stat().st_mtime_ns == mtime
    changed = extract_split(tiny_model, texts_path, tmp_path / "t", cfg, "train", site=(2, "mlp"), progress=False)
    assert changed["layer"] == 2 and changed["digest"] != first["digest"]


def test_shard_opens_with_datasets(tiny_model, texts_path, tmp_path):
    import datasets

    extract_split(tiny_model, texts_path, tmp_path / "t", _cfg(dtype="float16"), "train", site=SITE, progress=False)
    ds = datasets.Dataset.from_file(str(tmp_path / "t" / "shard-00000.arrow"))
    src = ShardSource(tmp_path / "t")
    assert ds.num_rows == 64 and ds.column_names == ["acts", "token_id", "doc_id", "position"]
    np.testing.assert_array_equal(np.array(ds[3]["acts"], dtype=np.float32), src.take(np.array([3]))[0])
    assert ds[3]["token_id"] == src.token_ids[3]


def test_take_and_chunks_agree(tiny_model, texts_path, tmp_path):
    extract_split(tiny_model, texts_path, tmp_path / "t", _cfg(shard_rows=20), "train", site=SITE, progress=False)
    src = ShardSource(tmp_path / "t")
    assert isinstance(src, ActivationSource) and isinstance(as_source(tmp_path / "t"), ShardSource)
    assert len(src.manifest["shards"]) > 3
    every = np.concatenate(list(src.chunks(7)))
    assert every.shape == (src.n_rows, 64) and every.dtype == np.float32
    rows = np.random.default_rng(0).integers(0, src.n_rows, size=50)
    np.testing.assert_array_equal(src.take(rows), every[rows])
    with pytest.raises(IndexError):
        src.take(np.array([src.n_rows]))


@pytest.mark.parametrize(
    "site, match",
    [((4, "mlp"), "out of range"), ((1, "resid"), "unknown component"), ("1-mlp", "layer.component")],
)
def test_bad_site_errors(tiny_model, texts_path, tmp_path, site, match):
    with pytest.raises(ValueError, match=match):
        extract_split(tiny_model, texts_path, tmp_path / "t", _cfg(), "train", site=site, progress=False)


def test_empty_split_and_bad_config(tiny_model, tmp_path):
    path = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"id": pa.array([0], pa.int64()), "text": ["only train"],
                             "source": ["x"], "split": ["train"]}), path)
    with pytest.raises(ValueError, match="no texts in split 'eval'"):
        extract_split(tiny_model, path, tmp_path / "e", _cfg(), "eval", site=SITE, progress=False)
    with pytest.raises(ValueError, match="unknown key"):
        ExtractConfig.from_dict({"context_length": 1, "lyaer": 2})
    with pytest.raises(ValueError, match=r"moved to sweep.sites: write `sweep: \{sites: \[3.attn\]\}`"):
        ExtractConfig.from_dict({"layer": 3, "component": "attn"})
    with pytest.raises(ValueError, match="dtype"):
        _cfg(dtype="bfloat16")


def test_check_storable():
    check_storable(np.array([[1.0, -65504.0]]), "float16")
    check_storable(np.array([[1e6]]), "float32")
    with pytest.raises(ValueError, match="float32"):
        check_storable(np.array([[1e6]]), "float16")
    with pytest.raises(ValueError, match="non-finite"):
        check_storable(np.array([[np.nan]]), "float32")


def test_d_model_mismatch_is_an_error(tiny_model, texts_path, tmp_path):
    wrong = tiny_model._replace(info=tiny_model.info._replace(d_model=32))
    with pytest.raises(ValueError, match="d_model"):
        extract_split(wrong, texts_path, tmp_path / "t", _cfg(), "train", site=SITE, progress=False)


def test_stage_cli(tiny_model, texts_path, tmp_path, monkeypatch):
    import stages.extract as stage

    params = tmp_path / "params.yaml"
    params.write_text("model: test/tiny\nextract:\n  context_length: 16\n"
                      "  max_tokens: 30\n  eval_max_tokens: 10\n  shard_rows: 8\nsweep:\n  sites: [2.attn, 1.mlp]\n")
    monkeypatch.setattr(stage, "load_model", lambda spec: tiny_model)
    result = CliRunner().invoke(stage.main, ["--params", str(params), "--texts", str(texts_path),
                                             "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert ShardSource(tmp_path / "out" / "2.attn" / "train").n_rows == 30
    assert ShardSource(tmp_path / "out" / "1.mlp" / "eval").manifest["component"] == "mlp"
    assert "train: one pass to layer 2 for 2.attn, 1.mlp" in result.output
    bad = CliRunner().invoke(stage.main, ["--params", str(params), "--texts", str(tmp_path / "none.parquet")])
    assert bad.exit_code != 0 and "prepare" in bad.output


@pytest.fixture
def real_model(request):
    try:
        return request.getfixturevalue("default_model")
    except NotImplementedError as e:
        pytest.skip(f"load_model('default') not available yet: {e}")


@pytest.mark.slow
def test_default_model_rows_equal_direct_forward(real_model, texts_path, tmp_path):
    cfg = _cfg(max_tokens=60, dtype="float16", shard_rows=32)
    manifest = extract_split(real_model, texts_path, tmp_path / "t", cfg, "train", site="6.mlp", progress=False)
    src = ShardSource(tmp_path / "t", verify=True)
    expected = _expected_rows(real_model, texts_path, "train", cfg, Site(6, "mlp"))
    assert src.n_rows == manifest["n_tokens"] == 60 and src.d_model == 576
    scale = max(np.abs(r).max() for r, _ in expected.values())
    _assert_rows_match(src, expected, 2e-3, 2e-3 * scale)
    assert manifest["model_hash"] == real_model.info.model_hash
