"""saepipe.training.cpu_kernels against straightforward numpy, on random and tie-heavy inputs."""

from __future__ import annotations

import numpy as np
import pytest

from saepipe.training import cpu_kernels as ck
from saepipe.training.cpu_kernels import aligned_empty


def _topk(pre, bias, k, lanes=None, columns=None):
    n = pre.shape[0]
    values, indices = np.empty((n, k), np.float32), np.empty((n, k), np.int32)
    columns = np.empty(0, np.int32) if columns is None else columns
    gathered = np.empty((n, columns.size), np.float32)
    lanes = ck.lanes_for(pre.shape[1], k) if lanes is None else lanes
    ck.topk_rows(pre, bias, k, lanes, values, indices, columns, gathered)
    return values, indices, gathered


@pytest.mark.parametrize(("n", "width", "k", "lanes"), [
    (300, 9216 // 8, 32, None), (200, 1000, 7, None), (100, 1003, 16, 5),  # tail columns
    (50, 64, 1, None), (50, 64, 64, None), (50, 40, 39, 3), (30, 257, 20, 1)])
def test_topk_rows_equals_argpartition(n, width, k, lanes):
    rng = np.random.default_rng(width + k)
    pre = rng.standard_normal((n, width), dtype=np.float32)
    bias = rng.standard_normal(width, dtype=np.float32)
    columns = np.sort(rng.choice(width, width // 3, replace=False)).astype(np.int32)
    values, indices, gathered = _topk(pre, bias, k, lanes, columns)
    full = pre + bias
    np.testing.assert_array_equal(gathered, np.maximum(full[:, columns], 0))
    expected = np.sort(np.argpartition(full, width - k, axis=1)[:, width - k:], axis=1)
    np.testing.assert_array_equal(np.sort(indices, axis=1), expected)
    np.testing.assert_array_equal(values, np.take_along_axis(full, indices, axis=1))


def test_topk_rows_keeps_exactly_k_under_ties():
    rng = np.random.default_rng(0)
    pre = rng.integers(-3, 3, size=(200, 512)).astype(np.float32)  # ~85 copies of each value
    pre[:10] = 1.0  # all equal
    k = 24
    values, indices, _ = _topk(pre, np.zeros(512, np.float32), k)
    for row, vals, idx in zip(pre, values, indices, strict=True):
        assert len(set(idx.tolist())) == k
        np.testing.assert_array_equal(np.sort(vals), np.sort(row)[-k:])


def test_topk_rows_gives_valid_columns_for_nan_rows():
    pre = np.random.default_rng(1).standard_normal((6, 300), dtype=np.float32)
    pre[0] = np.nan
    pre[1, ::2] = np.nan
    _, indices, _ = _topk(pre, np.zeros(300, np.float32), 16)
    for idx in indices:  # in range and distinct: later gathers stay in bounds
        assert idx.min() >= 0 and idx.max() < 300 and len(set(idx.tolist())) == 16


@pytest.mark.parametrize("k", [1, 5, 40])
def test_keep_top_k_zeroes_all_but_the_k_largest(k):
    rng = np.random.default_rng(k)
    a = np.maximum(rng.standard_normal((300, 61), dtype=np.float32), 0)
    a[:20] = np.where(a[:20] > 0, 2.0, 0.0)  # ties at the threshold
    a[20:25] = 0.0
    kept = a.copy()
    ck.keep_top_k(kept, k)
    for row, out in zip(a, kept, strict=True):
        n_pos = int((row > 0).sum())
        assert int((out > 0).sum()) == min(k, n_pos)
        np.testing.assert_array_equal(np.sort(out[out > 0]), np.sort(row)[::-1][:min(k, n_pos)][::-1])
        assert np.all((out == row) | (out == 0))


def _problem(n=96, d=24, h=80, k=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    W = rng.standard_normal((h, d), dtype=np.float32)
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    b_dec = rng.standard_normal(d, dtype=np.float32) * 0.1
    pre = x @ W.T
    pv, idx, _ = _topk(pre, np.zeros(h, np.float32), k)
    return x, W, b_dec, pv, idx


def _dense(values, indices, width):
    out = np.zeros((values.shape[0], width), np.float64)
    np.put_along_axis(out, indices, values, axis=1)
    return out


def test_decode_residual_matches_dense_math():
    x, W, b_dec, pv, idx = _problem()
    pv[::5, 1] = -np.abs(pv[::5, 1])  # not positive: no contribution, in a sweep of four ...
    pv[::3, 5] = -np.abs(pv[::3, 5])  # ... and in the tail (k = 6)
    n, d = x.shape
    e, sse = np.empty((n, d), np.float32), np.empty(n, np.float32)
    e_sums = ck.decode_residual(x, b_dec, W, idx, pv, e, sse)
    code = _dense(np.maximum(pv, 0), idx, W.shape[0])
    e_ref = x - (code @ W + b_dec)
    np.testing.assert_allclose(e, e_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sse, (e_ref**2).sum(axis=1), rtol=1e-5)
    np.testing.assert_allclose(e_sums, e.astype(np.float64).sum(axis=0), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_latent_grads_match_dense_math(tied, stream):
    x, W, b_dec, pv, idx = _problem(seed=1, d=32 if stream else 24)
    pv[::7, 0] = -np.abs(pv[::7, 0])  # some slots not positive: no gradient through them
    rng = np.random.default_rng(2)
    h, d = W.shape
    e = rng.standard_normal(x.shape, dtype=np.float32)
    xc = x - b_dec
    gscale, l1 = np.float32(-0.02), np.float32(0.003)
    aux_cols = np.array([3, 17, 40])
    slot = np.full(h, -1, np.int64)
    slot[aux_cols] = np.arange(3)
    aux_dec, aux_enc = rng.standard_normal((3, d), dtype=np.float32), rng.standard_normal((3, d), dtype=np.float32)
    aux_b = rng.standard_normal(3, dtype=np.float32)
    dW_dec, db_enc = aligned_empty((h, d)), np.empty(h, np.float32)  # streaming: rows on cache lines
    dW_enc = dW_dec if tied else aligned_empty((h, d))
    assert ck.streamable(dW_dec, dW_enc) == stream
    shifted = aligned_empty((h * d + 1,))[1:].reshape(h, d)
    assert not ck.streamable(shifted)  # rows off the cache lines: never streamed (it would fault)
    fired, sq_dec, sq_enc = np.empty(h, np.int64), np.empty(h, np.float32), np.empty(h, np.float32)
    gpre = np.full(pv.shape, np.nan, np.float32)
    out = ck.LatentGrads(dW_dec, dW_enc, db_enc, fired, sq_dec, sq_enc, gpre)
    ck.latent_grads(ck.group_by_latent(idx, h), pv, e, xc, gscale, l1, W, tied, (slot, aux_dec, aux_enc, aux_b), out)

    gv = gscale * np.einsum("rd,rjd->rj", e, W[idx]) + l1
    np.testing.assert_allclose(gpre, np.where(pv > 0, gv, 0), rtol=1e-4, atol=1e-6)

    code, gcode = _dense(np.maximum(pv, 0), idx, h), _dense(gpre, idx, h)
    ref_dec, ref_enc, ref_b = gscale * code.T @ e, gcode.T @ xc, gcode.sum(axis=0)
    ref_dec[aux_cols] += aux_dec
    ref_enc[aux_cols] += aux_enc
    ref_b[aux_cols] += aux_b
    if tied:
        ref_dec += ref_enc
    ref_dec -= (ref_dec * W).sum(axis=1, keepdims=True) * W
    np.testing.assert_allclose(dW_dec, ref_dec, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sq_dec, (ref_dec**2).sum(axis=1), rtol=1e-4, atol=1e-6)
    if not tied:
        np.testing.assert_allclose(dW_enc, ref_enc, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(sq_enc, (ref_enc**2).sum(axis=1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(db_enc, ref_b, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(fired, (code > 0).sum(axis=0))


def test_group_by_latent_is_a_stable_counting_sort():
    idx = np.random.default_rng(0).integers(0, 50, size=(40, 7)).astype(np.int32)
    offsets, order, rows = ck.group_by_latent(idx, 50)
    flat = idx.ravel()
    np.testing.assert_array_equal(order, np.argsort(flat, kind="stable"))
    np.testing.assert_array_equal(rows, order // 7)
    np.testing.assert_array_equal(np.diff(offsets), np.bincount(flat, minlength=50))


@pytest.mark.parametrize("unit_rows", [False, True])
def test_adam_rows_matches_the_formula(unit_rows):
    rng = np.random.default_rng(3)
    p, m, v, g = (rng.standard_normal((30, 12), dtype=np.float32) for _ in range(4))
    v = np.abs(v)
    lr, c1, c2, scale, b1, b2, eps = 1e-2, 0.19, 0.002, 0.5, 0.9, 0.999, 1e-8
    gs = scale * g
    m_ref = b1 * m + (1 - b1) * gs
    v_ref = b2 * v + (1 - b2) * gs**2
    p_ref = p - lr * (m_ref / c1) / (np.sqrt(v_ref / c2) + eps)
    if unit_rows:
        p_ref /= np.linalg.norm(p_ref, axis=1, keepdims=True)
    f = np.float32
    ck.adam_rows(p, m, v, g, f(lr), f(c1), f(c2), f(scale), f(b1), f(b2), f(eps), unit_rows, f(1e-12))
    np.testing.assert_allclose(m, m_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(p, p_ref, rtol=1e-4, atol=1e-6)


def test_zero_where_not_positive_returns_column_sums():
    rng = np.random.default_rng(4)
    out, a = rng.standard_normal((333, 21), dtype=np.float32), rng.standard_normal((333, 21), dtype=np.float32)
    expected = np.where(a > 0, out, 0)
    sums = ck.zero_where_not_positive(out, a)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_allclose(sums, expected.astype(np.float64).sum(axis=0), rtol=1e-12, atol=1e-12)


def test_subtract_sum_sq_scale_matches_numpy():
    rng = np.random.default_rng(3)
    r, e = rng.standard_normal((37, 11), dtype=np.float32), rng.standard_normal((37, 11), dtype=np.float32)
    expected_sum = float(((r.astype(np.float64) - e) ** 2).sum())
    expected = np.float32(0.25) * (r - e)
    total = ck.subtract_sum_sq_scale(r, e, np.float32(0.25))
    np.testing.assert_allclose(total, expected_sum, rtol=1e-6)
    np.testing.assert_allclose(r, expected, rtol=1e-6)


def test_standardize_equals_numpy_float32():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((19, 13), dtype=np.float32) * 3 + 1
    mean, std = x.mean(axis=0), x.std(axis=0) + np.float32(0.5)
    b_dec = rng.standard_normal(13, dtype=np.float32)
    xn, xc = np.empty_like(x), np.empty_like(x)
    sums, squares = ck.standardize(x, mean, std, b_dec, xn, xc)
    np.testing.assert_array_equal(xn, (x - mean) / std)  # IEEE float32, bit for bit
    np.testing.assert_array_equal(xc, (x - mean) / std - b_dec)
    np.testing.assert_allclose(sums, xn.astype(np.float64).sum(axis=0), rtol=1e-9, atol=1e-9)
    assert squares == pytest.approx(float((xn.astype(np.float64) ** 2).sum()), rel=1e-6)


def test_cpu_step_state_is_a_private_aligned_copy_shared_with_mlx():
    import mlx.core as mx

    from saepipe.training.cpu_step import aligned_mlx_copy

    source = mx.arange(40, dtype=mx.float32).reshape(8, 5)
    owned, view = aligned_mlx_copy(source)
    assert view.ctypes.data % 64 == 0 and view.shape == (8, 5)
    np.testing.assert_array_equal(view, np.asarray(source))
    view[0, 0] = 99.0  # the kernels write the numpy view; MLX's matmul reads the array
    assert float(owned[0, 0]) == 99.0 and float(source[0, 0]) == 0.0
    assert aligned_empty((3, 7)).ctypes.data % 64 == 0
