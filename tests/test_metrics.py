"""Properties of the metric definitions and their streaming accumulators."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saepipe.evaluation.metrics import (
    ReconstructionStats,
    SparsityStats,
    SplicedLossStats,
    density_histogram,
    next_token_mask,
    reconstruction_metrics,
)


def _reference_fvu(x: np.ndarray, x_hat: np.ndarray) -> float:
    x, x_hat = x.astype(np.float64), x_hat.astype(np.float64)
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(axis=0)) ** 2).sum())


@st.composite
def data_and_splits(draw):
    n = draw(st.integers(2, 60))
    d = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    offset = draw(st.sampled_from([0.0, 3.0, 1e4]))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=5)))
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, d)) + offset).astype(np.float32)
    x_hat = (x + rng.normal(scale=0.3, size=(n, d))).astype(np.float32)
    return x, x_hat, cuts


# ------------------------------------------------------------------------------ reconstruction


@settings(max_examples=60, deadline=None)
@given(data_and_splits())
def test_streaming_equals_one_shot(case):
    x, x_hat, cuts = case
    one = reconstruction_metrics(x, x_hat)
    stream = ReconstructionStats()
    for a, b in zip([0, *cuts], [*cuts, len(x)], strict=True):
        stream.update(x[a:b], x_hat[a:b])
    got = stream.result()
    assert got.n_rows == one.n_rows == len(x)
    for field in ("mse", "fvu", "explained_variance", "cosine", "rel_bias"):
        assert getattr(got, field) == pytest.approx(getattr(one, field), rel=1e-9, abs=1e-12), field
    # and the one-shot value is the textbook formula, even with a large mean (offset 1e4)
    assert one.fvu == pytest.approx(_reference_fvu(x, x_hat), rel=1e-9)


@settings(max_examples=30, deadline=None)
@given(data_and_splits())
def test_merge_equals_sequential(case):
    x, x_hat, cuts = case
    cut = cuts[0] if cuts else len(x) // 2
    a = ReconstructionStats().update(x[:cut], x_hat[:cut])
    b = ReconstructionStats().update(x[cut:], x_hat[cut:])
    merged, one = a.merge(b).result(), reconstruction_metrics(x, x_hat)
    for field in one._fields:
        assert getattr(merged, field) == pytest.approx(getattr(one, field), rel=1e-9, abs=1e-12)


def test_perfect_reconstruction():
    x = np.random.default_rng(0).normal(size=(50, 7)).astype(np.float32)
    m = reconstruction_metrics(x, x)
    assert (m.mse, m.fvu, m.explained_variance) == (0.0, 0.0, 1.0)
    assert m.cosine == pytest.approx(1.0)
    assert m.rel_bias == pytest.approx(1.0)


def test_predicting_the_mean_gives_fvu_one():
    x = np.random.default_rng(1).normal(loc=5.0, size=(64, 5))
    m = reconstruction_metrics(x, np.broadcast_to(x.mean(axis=0), x.shape))
    assert m.fvu == pytest.approx(1.0, rel=1e-12)
    assert m.explained_variance == pytest.approx(0.0, abs=1e-12)


def test_hand_computed_values():
    x = np.array([[1.0, 0.0], [0.0, 2.0]])
    x_hat = np.array([[0.5, 0.0], [0.0, 0.0]])
    m = reconstruction_metrics(x, x_hat)
    assert m.mse == pytest.approx((0.25 + 4.0) / 4)
    # mean (0.5, 1); total variance = 0.25+1 + 0.25+1 = 2.5
    assert m.fvu == pytest.approx(4.25 / 2.5)
    assert m.cosine == pytest.approx(0.5)  # row 1: cos 1, row 2: x_hat = 0 -> 0
    assert m.rel_bias == pytest.approx(0.25 / 0.5)  # sum ||x_hat||^2 / sum x_hat.x: shrinkage 0.5


def test_rel_bias_measures_uniform_shrinkage():
    x = np.random.default_rng(2).normal(size=(40, 6))
    assert reconstruction_metrics(x, 0.7 * x).rel_bias == pytest.approx(0.7)


def test_bad_shapes_and_empty_are_errors():
    with pytest.raises(ValueError, match="equal"):
        ReconstructionStats().update(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="no rows"):
        ReconstructionStats().result()


# ------------------------------------------------------------------------------------ sparsity


def test_sparsity_on_hand_made_codes():
    codes = np.array([[1.0, 0.0, 0.0, 2.0],
                      [0.0, 0.0, 0.0, 3.0],
                      [0.5, 0.0, 0.0, 0.0]])
    s = SparsityStats(4).update(codes).result()
    assert s.l0 == pytest.approx(4 / 3)
    np.testing.assert_allclose(s.density, [2 / 3, 0, 0, 2 / 3])
    assert s.dead_fraction == 0.5
    assert s.n_tokens == 3


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 5), st.integers(1, 30))
def test_topk_update_equals_dense_and_streams(seed, k, n):
    rng = np.random.default_rng(seed)
    d_hidden = 12
    idx = np.stack([rng.choice(d_hidden, size=k, replace=False) for _ in range(n)])
    vals = np.maximum(rng.normal(size=(n, k)), 0)  # some exact zeros: inactive
    dense = np.zeros((n, d_hidden))
    np.put_along_axis(dense, idx, vals, axis=1)
    a = SparsityStats(d_hidden).update(dense).result()
    half = n // 2
    b = (SparsityStats(d_hidden).update_topk(vals[:half], idx[:half])
         .merge(SparsityStats(d_hidden).update_topk(vals[half:], idx[half:])).result())
    assert a.l0 == pytest.approx(b.l0)
    assert a.dead_fraction == b.dead_fraction
    np.testing.assert_array_equal(a.density, b.density)
    assert a.l0 == pytest.approx((vals != 0).sum() / n)


def test_density_histogram():
    density = np.array([0.0, 0.0, 1e-3, 1e-2, 0.5, 1.0])
    h = density_histogram(density, bins=4, low=-4)
    assert h.n_dead == 2
    assert h.counts.sum() == 4
    np.testing.assert_allclose(h.edges, [-4, -3, -2, -1, 0])
    np.testing.assert_array_equal(h.counts, [0, 1, 1, 2])


def test_sparsity_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        SparsityStats(4).update(np.zeros((2, 5)))


# ------------------------------------------------------------------------------------- masks


def test_next_token_mask():
    positions = np.array([[0, 1, 1, 1], [0, 1, 0, 0], [1, 1, 1, 0]], dtype=bool)
    lengths = np.array([4, 2, 4])
    np.testing.assert_array_equal(next_token_mask(positions, lengths),
                                  [[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 0]])


# ------------------------------------------------------------------------------ spliced model


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def _spliced_case(seed: int = 0, b: int = 3, t: int = 5, v: int = 11):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, v, size=(b, t))
    lengths = np.array([t, t - 2, 2])[:b]
    pos = np.arange(t)[None, :] < lengths[:, None]
    logits = {name: rng.normal(size=(b, t, v)).astype(np.float32)
              for name in ("clean", "spliced", "zero_ablated", "mean_ablated")}
    return tokens, lengths, pos, next_token_mask(pos, lengths), logits


def _update(stats, tokens, ce_mask, kl_mask, logits):
    return stats.update(tokens, ce_mask, kl_mask, **{k: mx.array(v) for k, v in logits.items()})


def test_spliced_values_match_numpy():
    tokens, _, pos, ce_mask, logits = _spliced_case()
    r = _update(SplicedLossStats(), tokens, ce_mask, pos, logits).result()
    targets = np.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    ce = {k: -np.take_along_axis(_np_log_softmax(v), targets[..., None], -1)[..., 0][ce_mask].mean()
          for k, v in logits.items()}
    lp = _np_log_softmax(logits["clean"])
    kl = {k: (np.exp(lp) * (lp - _np_log_softmax(v))).sum(-1)[pos].mean() for k, v in logits.items()}
    assert r.ce_clean == pytest.approx(ce["clean"], rel=1e-5)
    assert r.ce_spliced == pytest.approx(ce["spliced"], rel=1e-5)
    assert r.ce_loss_score == pytest.approx(
        (ce["zero_ablated"] - ce["spliced"]) / (ce["zero_ablated"] - ce["clean"]), rel=1e-4)
    assert r.ce_loss_score_mean_ablated == pytest.approx(
        (ce["mean_ablated"] - ce["spliced"]) / (ce["mean_ablated"] - ce["clean"]), rel=1e-4)
    assert r.kl_spliced == pytest.approx(kl["spliced"], rel=1e-4)
    assert r.kl_score == pytest.approx(1 - kl["spliced"] / kl["zero_ablated"], rel=1e-4)
    assert (r.n_ce_tokens, r.n_kl_tokens) == (int(ce_mask.sum()), int(pos.sum()))


def test_perfect_splice_scores_one_and_zero_ablation_scores_zero():
    tokens, _, pos, ce_mask, logits = _spliced_case(seed=1)
    perfect = _update(SplicedLossStats(), tokens, ce_mask, pos, {**logits, "spliced": logits["clean"]})
    r = perfect.result()
    assert r.ce_loss_score == 1.0 and r.kl_spliced == 0.0 and r.kl_score == 1.0
    ablated = _update(SplicedLossStats(), tokens, ce_mask, pos, {**logits, "spliced": logits["zero_ablated"]})
    r = ablated.result()
    assert r.ce_loss_score == 0.0 and r.kl_score == 0.0


def test_spliced_streaming_equals_one_batch():
    tokens, _, pos, ce_mask, logits = _spliced_case(seed=2)
    whole = _update(SplicedLossStats(), tokens, ce_mask, pos, logits).result()
    parts = [_update(SplicedLossStats(), tokens[i : i + 1], ce_mask[i : i + 1], pos[i : i + 1],
                     {k: v[i : i + 1] for k, v in logits.items()}) for i in range(len(tokens))]
    merged = parts[0].merge(parts[1]).merge(parts[2]).result()
    for field in whole._fields:
        assert getattr(merged, field) == pytest.approx(getattr(whole, field), rel=1e-9)


def test_ce_mask_at_last_position_is_an_error():
    tokens, _, pos, _, logits = _spliced_case()
    with pytest.raises(ValueError, match="last position"):
        _update(SplicedLossStats(), tokens, pos, pos, logits)


def test_density_histogram_keeps_every_live_latent():
    density = np.array([1e-7, 1e-3, 1.0])
    h = density_histogram(density, bins=5, low=-5)
    assert h.counts.sum() == 3 and h.counts[0] == 1  # below `low`: first bin
    auto = density_histogram(density, bins=7)
    assert auto.edges[0] == -7 and auto.counts.sum() == 3


def test_fast_logsumexp_and_softmax_match_float64():
    from saepipe.lm import fastmath

    rng = np.random.default_rng(0)
    z = (rng.normal(size=(7, 5000)) * rng.uniform(0.1, 30, size=(7, 1))).astype(np.float32)
    z[0, :10] = -1e4  # far below the max: exp underflows to 0, must not become NaN
    z64 = z.astype(np.float64)
    top = z64.max(axis=1, keepdims=True)
    lse = (top + np.log(np.exp(z64 - top).sum(axis=1, keepdims=True)))[:, 0]
    lse_fast, p_fast = fastmath.log_softmax_parts(mx.array(z))
    np.testing.assert_allclose(np.array(lse_fast), lse, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.array(fastmath.logsumexp(mx.array(z))), lse, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.array(p_fast), np.exp(z64 - lse[:, None]), rtol=2e-5, atol=1e-12)
