"""fit_sae's data-fitted encoder init scale and its width-scaled default learning rate."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from saepipe.evaluation import planted
from saepipe.sae.config import SAEConfig, default_learning_rate
from saepipe.training.fit import fit_sae
from saepipe.training.state import fitted_encoder_scale


@pytest.fixture(scope="module")
def x():
    return planted.PlantedDictionary.create(32, 96, 4, seed=5).sample(6000, seed=1)


def _init(x, **changes):
    """The SAE as initialised (no training step)."""
    config = SAEConfig(expansion_factor=3, k=4, batch_size=256, validation_split=0.0, checkpoint_every=0,
                       **changes)
    return fit_sae(x, config, progress=False, max_steps=0)


def test_encoder_init_scale_is_the_least_squares_scale_of_the_first_reconstruction():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((200, 24)).astype(np.float32)
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    xc = rng.standard_normal((500, 24)).astype(np.float32)
    a = fitted_encoder_scale(xc, mx.array(W), 5)
    pre = np.maximum(xc @ W.T, 0)
    idx = np.argsort(-pre, axis=1)[:, :5]
    r = np.einsum("nk,nkd->nd", np.take_along_axis(pre, idx, axis=1), W[idx])
    best = min(np.linspace(0.05, 2, 400), key=lambda s: np.square(xc - s * r).sum())
    assert a == pytest.approx(best, abs=0.01)
    assert 0.3 < a < 0.95  # the k chosen rows all correlate with x: a = 1 overshoots


def test_fit_sae_initialises_the_encoder_at_the_fitted_scale_unless_given(x, monkeypatch):
    from saepipe.training import state

    fitted = []
    original = state.fitted_encoder_scale
    monkeypatch.setattr(state, "fitted_encoder_scale", lambda *a: fitted.append(original(*a)) or fitted[-1])
    sae = _init(x).sae
    W_enc, W_dec = np.array(sae.W_enc), np.array(sae.W_dec)
    ratio = np.linalg.norm(W_enc, axis=1) / np.linalg.norm(W_dec, axis=1)
    assert np.allclose(ratio, ratio[0], rtol=1e-5) and 0.3 < ratio[0] < 0.95
    assert ratio[0] == pytest.approx(state.ENCODER_SCALE_SHRINK * fitted[0], rel=1e-5)
    assert np.allclose(W_enc / ratio[0], W_dec, atol=1e-6)  # same directions
    given = _init(x, encoder_init_scale=1.0).sae
    assert np.allclose(np.array(given.W_enc), np.array(given.W_dec))


def test_learning_rate_none_is_scaled_with_the_width_and_an_explicit_value_wins(x):
    assert default_learning_rate(9216) == pytest.approx(3e-3)
    assert default_learning_rate(2304) == pytest.approx(6e-3)
    assert default_learning_rate(36864) == pytest.approx(1.5e-3)
    assert SAEConfig().learning_rate is None
    assert _init(x).sae.metadata["config"]["learning_rate"] == pytest.approx(default_learning_rate(96))
    assert _init(x, learning_rate=1e-4).sae.metadata["config"]["learning_rate"] == 1e-4


@pytest.mark.parametrize("field", ["learning_rate", "encoder_init_scale"])
@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "abc", [0.5]])
def test_learning_rate_and_encoder_init_scale_must_be_positive_numbers_or_null(field, bad):
    assert getattr(SAEConfig.from_dict({field: None}), field) is None
    assert getattr(SAEConfig.from_dict({field: 0.5}), field) == 0.5
    with pytest.raises(ValueError, match=field):
        SAEConfig.from_dict({field: bad})


def test_tied_weights_ignore_the_encoder_scale(x):
    sae = _init(x, tied_weights=True, encoder_init_scale=0.5).sae
    assert set(sae.parameters()) == {"b_enc", "W_dec", "b_dec"}
    np.testing.assert_allclose(np.linalg.norm(np.array(sae.W_dec), axis=1), 1.0, atol=1e-5)
