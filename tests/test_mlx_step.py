"""saepipe.sae.sparse and saepipe.training.mlx_step pinned against straightforward references (numpy, and
mx.grad of dense code)."""

from __future__ import annotations

import mlx.core as mx  # conftest imported saepipe first (fast BLAS before mlx)
import numpy as np
import pytest

from saepipe.sae import sparse
from saepipe.training import mlx_step as so


def _rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _np_topk_values(a: np.ndarray, k: int) -> np.ndarray:
    return np.sort(a, axis=1)[:, ::-1][:, :k]


# --------------------------------------------------------------------------------------------------
# topk
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("width", "k", "block"), [
    (512, 8, None), (512, 8, 4), (500, 7, 6), (1000, 3, 16), (96, 32, None), (64, 64, None), (40, 1, 5),
])
def test_topk_matches_numpy(width, k, block):
    rng = np.random.default_rng(width + k)
    a = _rand(rng, 33, width)
    idx = np.array(sparse.topk_indices(mx.array(a), k, block))
    assert idx.shape == (33, k)
    assert all(len(set(row)) == k for row in idx.tolist())
    got = np.sort(np.take_along_axis(a, idx.astype(np.int64), axis=1), axis=1)[:, ::-1]
    np.testing.assert_array_equal(got, _np_topk_values(a, k))


@pytest.mark.parametrize("block", [None, 2, 8])
def test_topk_exactly_k_with_ties(block):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 4, size=(64, 256)).astype(np.float32)  # many ties at the threshold
    a[0] = 1.0  # a row of all-equal values
    a[1, :] = 0.0
    a[1, :10] = 5.0  # exactly 10 tied maxima, k below and above
    for k in (1, 5, 10, 17):
        idx = np.array(sparse.topk_indices(mx.array(a), k, block)).astype(np.int64)
        assert idx.shape == (64, k)
        assert all(len(set(row)) == k for row in idx.tolist()), "duplicate index: more than k kept"
        assert (idx >= 0).all() and (idx < 256).all()
        got = np.sort(np.take_along_axis(a, idx, axis=1), axis=1)[:, ::-1]
        np.testing.assert_array_equal(got, _np_topk_values(a, k))


def test_topk_values_and_gradient():
    rng = np.random.default_rng(2)
    a = mx.array(_rand(rng, 16, 200))
    w = mx.array(_rand(rng, 16, 6))
    values, indices = sparse.topk(a, 6)
    np.testing.assert_array_equal(np.array(values), np.take_along_axis(np.array(a), np.array(indices).astype(np.int64), 1))
    grad = mx.grad(lambda p: (sparse.topk(p, 6).values * w).sum())(a)
    expected = np.zeros((16, 200), np.float32)
    np.put_along_axis(expected, np.array(indices).astype(np.int64), np.array(w), axis=1)
    np.testing.assert_allclose(np.array(grad), expected)


def test_topk_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be in"):
        sparse.topk_indices(mx.zeros((2, 5)), 6)


# --------------------------------------------------------------------------------------------------
# sparse decoder and weight gradients
# --------------------------------------------------------------------------------------------------
def _sparse_case(seed=3, n=70, k=5, h=64, d=12):
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(h, k, replace=False) for _ in range(n)]).astype(np.uint32)
    return rng, _rand(rng, n, k), idx, _rand(rng, h, d), _rand(rng, n, d)


def _dense(values, idx, h):
    out = np.zeros((values.shape[0], h), np.float32)
    np.put_along_axis(out, idx.astype(np.int64), values, axis=1)
    return out


@pytest.mark.parametrize("chunk", [None, 16, 1000])
def test_decode_rows_and_values_grad(chunk):
    _, v, idx, W, g = _sparse_case()
    got = np.array(sparse.decode_rows(mx.array(v), mx.array(idx), mx.array(W), chunk))
    np.testing.assert_allclose(got, _dense(v, idx, 64) @ W, rtol=1e-5, atol=1e-5)
    gv = np.array(so.decode_values_grad(mx.array(g), mx.array(idx), mx.array(W), chunk))
    np.testing.assert_allclose(gv, np.einsum("nd,nkd->nk", g, W[idx.astype(np.int64)]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["dense", "scatter"])
def test_rows_grad(method):
    _, v, idx, _, g = _sparse_case()
    idx[0, :2] = idx[1, :2]  # the same latent in several rows must accumulate
    got = np.array(so.rows_grad(mx.array(v), mx.array(idx), mx.array(g), 64, method))
    np.testing.assert_allclose(got, _dense(v, idx, 64).T @ g, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="method"):
        so.rows_grad(mx.array(v), mx.array(idx), mx.array(g), 64, "magic")


def test_sparse_decode_vjp_matches_dense_grad():
    _, v, idx, W, g = _sparse_case()
    b = np.arange(12, dtype=np.float32) / 10
    args = [mx.array(v), mx.array(W), mx.array(b)]
    ii = mx.array(idx)

    def fast(v_, W_, b_):
        return (so.sparse_decode(v_, ii, W_, b_) * mx.array(g)).sum()

    def ref(v_, W_, b_):
        dense = mx.put_along_axis(mx.zeros((70, 64)), ii, v_, axis=-1)
        return ((dense @ W_ + b_) * mx.array(g)).sum()

    got = mx.grad(fast, argnums=(0, 1, 2))(*args)
    want = mx.grad(ref, argnums=(0, 1, 2))(*args)
    for a, b_ in zip(got, want, strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b_), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(so.sparse_decode(*args[:1], ii, *args[1:])),
                               _dense(v, idx, 64) @ W + b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# the whole loss
# --------------------------------------------------------------------------------------------------
def _ref_loss(params, x, dead, aux_scale, *, k, k_aux, aux_coef, l1_coef, tied):
    """Dense reference: full pre-activations, argsort top-k, dense codes, autograd."""
    W_dec, b_dec, b_enc = params["W_dec"], params["b_dec"], params["b_enc"]
    W_enc = W_dec if tied else params["W_enc"]
    pre = mx.maximum((x - b_dec) @ W_enc.T + b_enc, 0.0)

    def dense_topk(a, kk):
        idx = mx.stop_gradient(mx.argsort(-a, axis=-1)[:, :kk])
        return mx.put_along_axis(mx.zeros_like(a), idx, mx.take_along_axis(a, idx, axis=-1), axis=-1)

    z = dense_topk(pre, k)
    e = x - (z @ W_dec + b_dec)
    total_var = mx.square(x - x.mean(axis=0)).sum()
    loss = mx.square(e).sum() / total_var + l1_coef * z.sum(axis=-1).mean()
    if dead is not None:
        e = mx.stop_gradient(e)
        r = dense_topk(mx.where(dead, pre, 0.0), k_aux) @ W_dec - e
        loss = loss + aux_coef * aux_scale * mx.square(r).sum() / mx.square(e - e.mean(axis=0)).sum()
    return loss


def _params(rng, d, h, tied):
    W = _rand(rng, h, d)
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    p = {"W_dec": W, "b_dec": _rand(rng, d, scale=0.1), "b_enc": _rand(rng, h, scale=0.1)}
    if not tied:
        p["W_enc"] = W.copy() + _rand(rng, h, d, scale=0.05)
    return {name: mx.array(a) for name, a in p.items()}


@pytest.mark.parametrize(("tied", "n_dead", "method", "l1"), [
    (False, 0, "dense", 0.0), (False, 0, "scatter", 0.01), (False, 5, "dense", 0.0),
    (False, 40, "scatter", 0.0), (False, 300, "dense", 0.01), (True, 40, "dense", 0.0), (True, 0, "scatter", 0.0),
])
def test_value_and_grads_match_dense_autograd(tied, n_dead, method, l1):
    rng = np.random.default_rng(n_dead + 7 * tied)
    d, h, n, k, k_aux = 16, 512, 96, 8, 16
    params = _params(rng, d, h, tied)
    x = mx.array(_rand(rng, n, d))
    dead = None
    if n_dead:
        mask = np.zeros(h, bool)
        mask[rng.choice(h, n_dead, replace=False)] = True
        dead = mx.array(mask)
    scale = mx.array(min(n_dead / k_aux, 1.0))
    kw = dict(k=k, k_aux=k_aux, aux_coef=0.5, l1_coef=l1, tied=tied)
    ref_loss, ref_grads = mx.value_and_grad(lambda p: _ref_loss(p, x, dead, scale, **kw))(params)
    parts, grads = so.value_and_grads(params, x, dead=dead, aux_scale=scale, method=method,
                                      capacity=so.aux_capacity(n_dead, h) or None, **kw)
    np.testing.assert_allclose(float(parts.loss), float(ref_loss), rtol=1e-5)
    assert (float(parts.aux) > 0) == (n_dead > 0)
    assert sorted(grads) == sorted(ref_grads)
    for name, g in grads.items():
        want = np.array(ref_grads[name])
        np.testing.assert_allclose(np.array(g), want, rtol=1e-3, atol=1e-5 * np.abs(want).max())
    assert parts.values.shape == parts.indices.shape == (n, k)
    assert float(parts.l0) <= k


def test_value_and_grads_finite_differences():
    """Directional derivative of the loss against a central difference (loss in float32).

    Without AuxK: its residual target is stop-gradient by design, so finite differences of the total
    loss do not equal its gradient (the AuxK gradient is pinned by the autograd comparison above).
    """
    rng = np.random.default_rng(11)
    d, h, n = 8, 128, 64
    params = _params(rng, d, h, False)
    x = mx.array(_rand(rng, n, d))
    dead = None
    kw = dict(k=4, k_aux=8, aux_coef=0.5, l1_coef=0.01, tied=False)
    _, grads = so.value_and_grads(params, x, dead=dead, aux_scale=1.0, **kw)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        direction = _rand(rng, *params[name].shape)
        direction = mx.array(direction / np.linalg.norm(direction))  # small steps keep the top-k set
        eps = 1e-3

        def loss_at(t, name=name, direction=direction):
            p = dict(params)
            p[name] = params[name] + t * direction
            return float(so.value_and_grads(p, x, dead=dead, aux_scale=1.0, **kw)[0].loss)

        numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
        analytic = float((grads[name] * direction).sum())
        assert abs(numeric - analytic) <= 2e-2 * abs(analytic) + 1e-3, (name, numeric, analytic)


def test_aux_capacity_buckets():
    assert so.aux_capacity(0, 9216) == 0
    assert so.aux_capacity(1, 9216) == 64
    assert so.aux_capacity(65, 9216) == 128
    assert so.aux_capacity(600, 9216) == 1024
    assert so.aux_capacity(9000, 9216) == 9216


def test_make_train_step_matches_the_reference_step():
    """Same contract as the reference step: same new weights and metrics from a state."""
    from saepipe.sae.config import SAEConfig
    from saepipe.training.reference import make_reference_step

    rng = np.random.default_rng(5)
    d, h, n = 16, 256, 64
    config = SAEConfig(k=6, batch_size=n, dead_tokens_threshold=100, l1_coefficient=0.001)
    params = _params(rng, d, h, False)
    zeros = {name: mx.zeros_like(p) for name, p in params.items()}
    counter = mx.array(np.where(np.arange(h) % 7 == 0, 100, 0).astype(np.int32))
    n_dead = int((np.array(counter) >= 100).sum())
    args = (params, zeros, dict(zeros), mx.array(0.0), mx.array(1e-3), mx.array(_rand(rng, n, d)),
            mx.zeros((d,)), mx.ones((d,)), counter, mx.array(min(n_dead / 8, 1.0)))
    fast = so.make_train_step(config, h, 8, so.aux_capacity(n_dead, h))(*args)
    ref = make_reference_step(config, h, 8, True)(*args)
    np.testing.assert_allclose(np.array(fast[5]), np.array(ref[5]), rtol=1e-4, atol=1e-6)
    for name in params:
        np.testing.assert_allclose(np.array(fast[0][name]), np.array(ref[0][name]), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.array(fast[4]), np.array(ref[4]))
