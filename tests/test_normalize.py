"""normalize: streamed float64 moments equal numpy on the whole data; merge order does not matter."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from saepipe.activations.normalize import (
    STATS_FILE,
    chunk_moments,
    fit_stats,
    merge_moments,
    normalize,
    reduce_moments,
)
from saepipe.activations.shards import SHARD_PATTERN, ShardSource, write_manifest, write_shard
from saepipe.activations.stats import NormStats


def _data(n: int = 1000, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # large offset vs spread: the naive sum-of-squares formula would lose digits here
    return (rng.normal(size=(n, d)) * rng.uniform(0.1, 3, size=d) + 1e3).astype(np.float32)


def _shard_folder(path, data: np.ndarray, shard_rows: int) -> None:
    path.mkdir()
    shards = []
    for i, start in enumerate(range(0, len(data), shard_rows)):
        part = data[start : start + shard_rows]
        n = len(part)
        shards.append(write_shard(path / SHARD_PATTERN.format(i), part, np.zeros(n), np.zeros(n),
                                  np.arange(n), "float32")._asdict())
    write_manifest(path, {"d_model": data.shape[1], "n_tokens": len(data), "site": "model.model.layers.0.mlp",
                          "split": "train", "shards": shards})


def _reference(x: np.ndarray):
    x = x.astype(np.float64)
    return x.mean(0), x.std(0), np.linalg.norm(x, axis=1).mean()


def test_streamed_equals_numpy():
    x = _data()
    stats = fit_stats(x, chunk_rows=77)
    mean, std, norm = _reference(x)
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-9)
    np.testing.assert_allclose(stats.std, std, rtol=1e-9)
    assert stats.mean_norm == pytest.approx(norm, rel=1e-9)
    assert stats.n_rows == 1000


def test_large_chunk_is_split_into_blocks(monkeypatch):
    import saepipe.activations.normalize as norm

    x = _data(n=100)
    whole = norm.chunk_moments(x)
    monkeypatch.setattr(norm, "BLOCK_ROWS", 7)
    blocked = norm.chunk_moments(x)
    assert blocked.count == whole.count == 100
    np.testing.assert_allclose(blocked.m2, whole.m2, rtol=1e-10)
    np.testing.assert_allclose(blocked.mean, whole.mean, rtol=1e-12)


def test_merge_is_order_independent():
    x = _data(n=600)
    parts = [chunk_moments(x[a:b]) for a, b in [(0, 10), (10, 250), (250, 251), (251, 600)]]
    forward = reduce_moments(x[a:b] for a, b in [(0, 10), (10, 250), (250, 251), (251, 600)])
    backward = parts[3]
    for p in reversed(parts[:3]):
        backward = merge_moments(backward, p)
    tree = merge_moments(merge_moments(parts[0], parts[2]), merge_moments(parts[3], parts[1]))
    for m in (backward, tree):
        assert m.count == forward.count
        np.testing.assert_allclose(m.mean, forward.mean, rtol=1e-12)
        np.testing.assert_allclose(m.m2, forward.m2, rtol=1e-9)
        assert m.norm_sum == pytest.approx(forward.norm_sum, rel=1e-12)


def test_shard_order_does_not_matter(tmp_path):
    x = _data(n=500)
    _shard_folder(tmp_path / "a", x, 128)
    shuffled = np.concatenate([x[384:], x[128:256], x[:128], x[256:384]])
    _shard_folder(tmp_path / "b", shuffled, 116)
    a, b = fit_stats(tmp_path / "a", 50), fit_stats(tmp_path / "b", 1000)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-10)
    np.testing.assert_allclose(a.std, b.std, rtol=1e-9)
    np.testing.assert_allclose(a.std, _reference(x)[1], rtol=1e-9)


def test_normalize_writes_stats_with_manifest_digest(tmp_path):
    x = _data(n=300)
    _shard_folder(tmp_path / "acts", x, 100)
    stats = normalize(tmp_path / "acts", tmp_path / "out", chunk_rows=64)
    loaded = NormStats.load(tmp_path / "out" / STATS_FILE)
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    meta = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert meta["manifest_digest"] == ShardSource(tmp_path / "acts").manifest["digest"]
    assert meta["digest"] == stats.digest() and meta["n_rows"] == 300


def test_constant_dimension_gets_floored_std():
    x = _data(n=50)
    x[:, 3] = 2.0
    assert fit_stats(x).std[3] > 0


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="chunk_rows"):
        fit_stats(_data(n=10), chunk_rows=0)
    with pytest.raises(FileNotFoundError, match=r"manifest\.json"):
        normalize(tmp_path, tmp_path / "out")


def test_stage_cli(tmp_path):
    from stages.normalize import main

    _shard_folder(tmp_path / "acts", _data(n=200), 64)
    params = tmp_path / "params.yaml"
    params.write_text("normalize:\n  chunk_rows: 32\n")
    result = CliRunner().invoke(main, ["--params", str(params), "--acts", str(tmp_path / "acts"),
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert NormStats.load(tmp_path / "out" / STATS_FILE).n_rows == 200
    params.write_text("normalize:\n  chunk_rowz: 32\n")
    bad = CliRunner().invoke(main, ["--params", str(params), "--acts", str(tmp_path / "acts")])
    assert bad.exit_code != 0 and "chunk_rowz" in bad.output
