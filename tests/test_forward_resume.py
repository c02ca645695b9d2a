"""forward's resume from a captured residual stream and row-sliceable ``Replace`` edits."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from saepipe.lm.forward import Replace, forward
from saepipe.lm.sites import Site


def _tokens(batch=3, seq=9, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, 256, (batch, seq)).astype(np.int32))


@pytest.mark.parametrize("layer", [1, 3])
def test_resume_equals_full_run(tiny_model, layer):
    tokens = _tokens()
    full = forward(tiny_model, tokens, capture=(Site(layer, "mlp"),))
    before = forward(tiny_model, tokens, stop_layer=layer - 1, capture=(Site(layer - 1, "output"),))
    resumed = forward(tiny_model, tokens, start_layer=layer, capture=(Site(layer, "mlp"),),
                      start_residual=before.activations[Site(layer - 1, "output")])
    np.testing.assert_allclose(np.array(resumed.logits), np.array(full.logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(resumed.activations[Site(layer, "mlp")]),
                               np.array(full.activations[Site(layer, "mlp")]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value_shape", ["row", "full"])
def test_replace_split_equals_plain_function(tiny_model, value_shape):
    tokens, site = _tokens(batch=5), Site(2, "attn")
    rng = np.random.default_rng(1)
    where = mx.array(rng.random((5, 9, 1)) < 0.5)
    d = tiny_model.info.d_model
    value = mx.array(rng.normal(size=(d,) if value_shape == "row" else (5, 9, d)).astype(np.float32))
    edit = Replace(where, value)
    split = forward(tiny_model, tokens, edit={site: edit}, parallel=True, capture=(site,))
    plain = forward(tiny_model, tokens, edit={site: lambda o: edit(o)}, capture=(site,))
    np.testing.assert_allclose(np.array(split.logits), np.array(plain.logits), rtol=1e-5, atol=1e-5)
    got = np.array(split.activations[site])
    np.testing.assert_array_equal(got[np.array(where)[..., 0]],
                                  np.broadcast_to(np.array(value), got.shape)[np.array(where)[..., 0]])


def test_bad_start_is_a_clear_error(tiny_model):
    tokens = _tokens()
    with pytest.raises(ValueError, match="start_residual"):
        forward(tiny_model, tokens, start_layer=2)
    resid = mx.zeros((3, 9, tiny_model.info.d_model))
    with pytest.raises(ValueError, match="before start_layer"):
        forward(tiny_model, tokens, start_layer=2, start_residual=resid, capture=(Site(1, "mlp"),))
    with pytest.raises(ValueError, match="start_residual must be"):
        forward(tiny_model, tokens, start_layer=2, start_residual=resid[:2])
