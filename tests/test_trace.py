"""trace(): exact names, all components, padding, errors."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from saepipe.lm.forward import forward
from saepipe.lm.model import tiny_random_model
from saepipe.lm.sites import Site
from saepipe.lm.trace import trace


@pytest.fixture(scope="module")
def deep_model():
    return tiny_random_model(num_layers=12, d_model=32, seed=3)


def test_names_are_exact_and_match_forward(deep_model):
    texts = ["hello world", "a longer second text here"]
    with trace(deep_model, texts) as t:
        pass
    tokens = mx.array(t.tokens)
    ref = forward(deep_model, tokens, capture=[Site(1, "mlp"), Site(10, "mlp"), Site(10, "output")])
    a = t.activations
    assert a["model.model.layers.10.mlp"].shape == (2, t.tokens.shape[1], 32)
    np.testing.assert_array_equal(np.array(a["model.model.layers.10.mlp"]), np.array(ref.activations[Site(10, "mlp")]))
    np.testing.assert_array_equal(np.array(a["model.model.layers.1.mlp"]), np.array(ref.activations[Site(1, "mlp")]))
    assert not np.allclose(np.array(a["model.layers.1.mlp"]), np.array(a["model.layers.10.mlp"]))
    np.testing.assert_array_equal(np.array(a["model.model.layers.10"]), np.array(ref.activations[Site(10, "output")]))
    assert a["model.layers.10.self_attn"] is a["model.model.layers.10.attn"]
    assert a["model.layers.10"] is a["model.model.layers.10.output"]
    np.testing.assert_allclose(np.array(t.logits), np.array(ref.logits), rtol=1e-5, atol=1e-6)
    assert len(a) == 36 and "model.model.layers.11.self_attn" in list(a)


def test_lengths_and_padding(deep_model):
    t = trace(deep_model, ["ab", "abcdef"])
    assert t.lengths.tolist() == [3, 7]  # BOS + bytes
    alone = trace(deep_model, "ab")
    np.testing.assert_allclose(np.array(t.activations["model.layers.5"][0, :3]),
                               np.array(alone.activations["model.layers.5"][0]), rtol=1e-5, atol=1e-6)


def test_capture_subset_stops_early(deep_model):
    t = trace(deep_model, "hi", capture=["model.layers.3.mlp", "model.layers.2.self_attn"])
    assert t.logits is None
    assert sorted(t.activations) == ["model.model.layers.2.self_attn", "model.model.layers.3.mlp"]
    with pytest.raises(KeyError, match="not captured"):
        t.activations["model.layers.4.mlp"]


def test_unknown_names_list_valid_ones(deep_model):
    t = trace(deep_model, "hi")
    for name in ("model.layers.12.mlp", "layers.1.mlp", "model.model.layers.1.mlpx", "model.layers.01.mlp"):
        with pytest.raises(KeyError, match="valid names"):
            t.activations[name]
    with pytest.raises(KeyError, match="valid names"):
        trace(deep_model, "hi", capture=["model.layers.1.resid"])
    with pytest.raises(ValueError, match="at least one text"):
        trace(deep_model, [])
