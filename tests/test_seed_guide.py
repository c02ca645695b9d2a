"""mlxterp's SAE guide (the seed document), its code blocks run nearly verbatim on the default model.

Changes from the guide: the model is "default" (SmolLM2-135M, offline) instead of Llama-3.2-1B, the
dataset is a few hundred built-in-corpus passages and the SAEConfig is small, so the file runs in
about a minute on an idle 2-core machine; MLX has no one-argument ``mx.where``, so active ids use ``np.nonzero``.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from saepipe import InterpretableModel, SAEConfig
from saepipe.texts.corpus import builtin_corpus

pytestmark = pytest.mark.slow

SMALL = SAEConfig(expansion_factor=4, k=32, learning_rate=3e-4, num_epochs=2, batch_size=256, warmup_steps=10)


@pytest.fixture(scope="module")
def texts():
    corpus = builtin_corpus()
    return [r.text for r in corpus[:: len(corpus) // 200][:200]]  # a spread over the four sources


@pytest.fixture(scope="module")
def model(default_model):
    return InterpretableModel(default_model)  # = InterpretableModel("default"), loaded once per session


@pytest.fixture(scope="module")
def trained(model, texts, tmp_path_factory):
    """Quick start > Basic Training."""
    path = tmp_path_factory.mktemp("seed") / "my_sae.mlx"
    sae = model.train_sae(layer=10, dataset=texts, save_path=str(path), config=SMALL, context_length=32,
                          progress=False)
    return sae, path


def test_quick_start_and_pretrained(model, trained):
    _, path = trained
    # Load saved SAE
    sae = model.load_sae(str(path))
    # Check compatibility
    assert sae.is_compatible(model, layer=10, component="mlp")
    assert not sae.is_compatible(model, layer=11, component="mlp")
    # Encode activations to features
    with model.trace("Test input") as trace:
        pass
    activation = trace.activations["model.model.layers.10.mlp"]
    features = sae.encode(activation)  # Sparse features
    reconstructed = sae.decode(features)  # Reconstructed activation
    assert features.shape == (1, activation.shape[1], sae.d_hidden)
    assert reconstructed.shape == activation.shape
    per_token = np.array(features != 0).sum(axis=-1)
    assert (per_token <= sae.k).all() and (per_token > 0).all()


def test_encoding_and_reconstruction_quality(model, trained):
    sae, _ = trained
    # Get activation from model
    with model.trace("The capital of France is") as trace:
        pass
    activation = trace.activations["model.model.layers.10.mlp"]
    # Encode to sparse features
    features = sae.encode(activation)
    # Check sparsity
    num_active = int(mx.sum(features != 0))
    assert 0 < num_active <= sae.k * activation.shape[1] and num_active / features.size < 0.05
    # Get active feature indices (mlxterp: mx.where(features[0, -1] != 0)[0])
    active_indices = np.nonzero(np.array(features[0, -1]))[0]
    assert 0 < len(active_indices) <= sae.k
    # Decode back to activation space; measure reconstruction error (position 0 is BOS, never trained on)
    reconstructed = sae.decode(features)
    mse = float(mx.mean((activation[:, 1:] - reconstructed[:, 1:]) ** 2))
    assert np.isfinite(mse)
    a, a_hat = np.array(activation[0, 1:]), np.array(reconstructed[0, 1:])
    cosine = (a * a_hat).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(a_hat, axis=-1)
    assert cosine.mean() > 0.1  # a small SAE after two short epochs: aligned, far from perfect


def test_save_and_load(model, trained, tmp_path):
    sae, _ = trained
    # Save trained SAE
    sae.save(tmp_path / "my_sae.mlx")
    # Load later
    sae = model.load_sae(tmp_path / "my_sae.mlx")
    # Check metadata: {'layer': 10, 'component': 'mlp', 'model_name': '...', ...}
    meta = sae.metadata
    assert (meta["layer"], meta["component"]) == (10, "mlp")
    assert meta["model_name"] == model.info.model_id
    assert meta["config"]["k"] == SMALL.k and meta["d_hidden"] == sae.d_hidden == 4 * 576


def test_validation(model, trained, texts):
    sae, _ = trained
    # 1. Reconstruction quality
    test_texts = ["The weather today is sunny and warm.", "Stocks fell sharply on Monday morning.",
                  "She opened the old book and began to read."]
    with model.trace(test_texts) as trace:
        pass
    activation = trace.activations["model.model.layers.10.mlp"]
    reconstructed = sae.decode(sae.encode(activation))
    mse = float(mx.mean((activation - reconstructed) ** 2))
    assert np.isfinite(mse)
    # 2. Feature activation distribution
    features = sae.encode(activation)
    activation_counts = mx.sum(features != 0, axis=(0, 1))
    # Check for dead features
    dead_features = int(mx.sum(activation_counts == 0))
    assert activation_counts.shape == (sae.d_hidden,)
    assert 0 < dead_features < sae.d_hidden  # three short texts cannot use every feature


def test_training_monitoring(model, trained):
    summary = model.last_fit.summary
    history = model.last_fit.history
    assert summary["completed"] and len(history) == SMALL.num_epochs
    assert history[-1]["train/loss"] < history[0]["train/loss"]  # loss decreases
    assert history[-1]["train/l0"] == pytest.approx(SMALL.k, abs=1)  # L0 ~ k
    assert history[-1]["val/fvu"] < 1.0 and np.isfinite(history[-1]["val/fvu"])


def test_components_layers_and_tied_weights(model, texts, tmp_path):
    """Advanced topics: component selection, a loop over layers, tied weights (tiny data)."""
    few = texts[:12]
    tiny = SMALL.replace(num_epochs=1, batch_size=128)
    # Attention output / residual stream (after layer)
    sae_attn = model.train_sae(layer=10, component="attn", dataset=few, config=tiny, context_length=32, progress=False)
    sae_resid = model.train_sae(layer=10, component="output", dataset=few, config=tiny, context_length=32,
                                progress=False)
    assert sae_attn.metadata["component"] == "attn" and sae_resid.metadata["component"] == "output"
    # Train SAEs on multiple layers
    for layer in [6, 12, 18, 24]:
        sae = model.train_sae(layer=layer, dataset=few, save_path=tmp_path / f"sae_layer{layer}.mlx", config=tiny,
                              context_length=32, progress=False)
        assert model.load_sae(tmp_path / f"sae_layer{layer}.mlx").metadata["layer"] == layer == sae.metadata["layer"]
    # Tied weights: decoder = encoder^T (fewer parameters)
    config = SAEConfig(tied_weights=True, expansion_factor=4, k=32, num_epochs=1, batch_size=128, warmup_steps=10)
    sae = model.train_sae(layer=10, dataset=few, config=config, context_length=32, progress=False)
    assert "W_enc" not in sae.parameters() and sae.tied_weights


def test_phase2_feature_analysis_and_visualization(model, trained, texts, tmp_path):
    """Coming Soon: Phase 2 > Feature Analysis, Feature Visualization (as written; a few texts)."""
    import urllib.request

    sae, _ = trained
    texts = texts[:24]
    # Find top features for text (Phase 2)
    top_features = sae.analyze_text(
        model,
        prompt="Artificial intelligence is transforming society",
        top_k=10
    )
    assert len(top_features) == 10 and len(top_features.per_token) == len(top_features.tokens) > 3
    assert top_features[0].activation >= top_features[-1].activation > 0
    # Find texts that activate a feature (Phase 2)
    activating_texts = sae.get_top_activating_texts(
        feature_idx=1234,
        dataset=texts,
        top_k=20
    )
    assert len(activating_texts) <= 20 and all(c.acts[c.center] == c.activation > 0 for c in activating_texts)
    assert len({c.text_index for c in activating_texts}) == len(activating_texts)  # one context per text
    # Visualize feature activations (Phase 2)
    view = sae.visualize_feature(
        feature_idx=1234,
        model=model,
        dataset=texts
    )
    assert "Feature 1234" in view._repr_html_() and view.save(tmp_path / "f.html").stat().st_size > 1000
    # Interactive feature dashboard (Phase 2)
    dashboard = sae.launch_dashboard(model=model, dataset=texts)
    try:
        assert dashboard.url.startswith("http://127.0.0.1:")
        assert b"<html" in urllib.request.urlopen(dashboard.url + "feature.html", timeout=10).read().lower()
    finally:
        dashboard.stop()


def test_phase2_model_steering(model, trained):
    """Coming Soon: Phase 2 > Model Steering, as written; then generation under the same steer."""
    sae, _ = trained
    # Steer model behavior with features (Phase 2)
    with model.trace("Generate text about...") as trace:
        sae.steer(
            model=model,
            layer=10,
            feature_idx=1234,
            strength=2.0  # Amplify this feature
        )
        output = model.output.save()
    with model.trace("Generate text about...") as clean:
        pass
    site = "model.model.layers.10.mlp"
    assert output.shape == clean.logits.shape == (1, trace.tokens.shape[1], model.info.vocab_size)
    assert not np.array_equal(np.array(output.value), np.array(clean.logits))
    # the steered site moved by 2 x the feature's decoder direction in the model's units
    moved = np.array(trace.activations[site]) - np.array(clean.activations[site])
    assert sae.normalization == "scalar"  # one std for every dimension: the root mean per-dimension variance
    direction = np.array(sae.W_dec[1234]) * np.sqrt(np.mean(np.square(np.asarray(sae.stats.std))))
    np.testing.assert_allclose(moved[0], np.tile(2.0 * direction, (moved.shape[1], 1)), rtol=1e-3, atol=1e-4)
    pre = [np.array(sae.pre_activations(t.activations[site]))[0, :, 1234] for t in (clean, trace)]
    assert (pre[1] >= pre[0]).all() and (pre[1] > pre[0]).sum() >= len(pre[0]) - 1  # ReLU may clamp the first token
    # generation under steering: strength 0 is the clean continuation, a strong steer changes it
    plain = model.generate("The weather today is", max_tokens=6)
    zero = model.generate("The weather today is", max_tokens=6, steer=[sae.steering(1234, 0.0)])
    strong = model.generate("The weather today is", max_tokens=6, steer=[sae.steering(1234, 60.0)])
    assert zero.tokens == plain.tokens and strong.tokens != plain.tokens and plain.text
