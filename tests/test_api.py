"""The mlxterp-style API on the tiny random model: training, loading, compatibility, misuse errors."""

from __future__ import annotations

import logging
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import saepipe
from saepipe import IncompatibleSAEError, InterpretableModel, SAEConfig, load_sae
from saepipe.activations.shards import ShardSource
from saepipe.api import count_rows, dataset_texts, texts_digest
from saepipe.lm.model import tiny_random_model

TEXTS = [f"Sample text number {i}: the quick brown fox jumps over the lazy dog {i * 7}." for i in range(24)]
CONFIG = SAEConfig(expansion_factor=2, k=4, batch_size=64, num_epochs=1, warmup_steps=2, seed=1)


@pytest.fixture(scope="module")
def model(tiny_model):
    return InterpretableModel(tiny_model)


@pytest.fixture(scope="module")
def trained(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("sae") / "my_sae.mlx"
    sae = model.train_sae(layer=2, dataset=TEXTS, save_path=path, config=CONFIG, component="mlp",
                          context_length=24, progress=False)
    return sae, path, model.last_fit


def test_properties(model, tiny_model):
    assert model.num_layers == 4 and model.d_model == 64
    assert model.info == tiny_model.info
    assert model.tokenizer is tiny_model.tokenizer
    assert "layers=4" in repr(model)


def test_train_sae_saves_with_metadata(trained, model):
    sae, path, fit = trained
    assert path.is_file()
    meta = sae.metadata
    assert (meta["layer"], meta["component"]) == (2, "mlp")
    assert meta["model_name"] == model.info.model_id and meta["model_hash"] == model.info.model_hash
    assert sae.d_hidden == 128 and sae.k == 4 and meta["normalized"]
    assert fit.summary["completed"] and fit.summary["steps"] >= 1
    assert np.isfinite(fit.summary["val/fvu"])
    loaded = model.load_sae(path)
    x = mx.random.normal((3, 64), key=mx.random.key(0))
    np.testing.assert_allclose(np.array(loaded.encode(x)), np.array(sae.encode(x)), rtol=1e-6, atol=1e-6)
    assert load_sae(path).metadata["layer"] == 2


def test_rows_are_every_non_special_token(trained, model):
    """The activation rows are exactly extract's: one per non-BOS token of each (truncated) text."""
    _, _, fit = trained
    source = ShardSource(fit.activations)
    expected = sum(min(len(model.tokenizer.encode(t)), 24) - 1 for t in TEXTS)  # minus BOS
    assert source.n_rows == expected == count_rows(model.tokenizer, TEXTS, 24, True)
    # the first text's rows equal the traced activations at its positions 1.. (BOS skipped)
    n0 = min(len(model.tokenizer.encode(TEXTS[0])), 24)
    with model.trace(TEXTS[0]) as t:
        pass
    traced = np.array(t.activations["model.model.layers.2.mlp"][0, 1:n0])
    np.testing.assert_allclose(source.take(np.arange(n0 - 1)), traced, rtol=2e-2, atol=2e-3)  # float16 shards


def test_seed_usage(trained, model):
    sae, _, _ = trained
    assert sae.is_compatible(model, layer=2, component="mlp")
    assert not sae.is_compatible(model, layer=1, component="mlp")
    assert not sae.is_compatible(model, layer=2, component="attn")
    with model.trace(["Test input", "A longer second input text"]) as trace:
        pass
    activation = trace.activations["model.model.layers.2.mlp"]
    features = sae.encode(activation)
    assert features.shape == (*activation.shape[:2], sae.d_hidden)
    assert (np.array(features != 0).sum(axis=-1) <= sae.k).all()
    assert sae.decode(features).shape == activation.shape


def test_encode_checks_the_site(trained, model):
    sae, _, _ = trained
    codes = model.encode(sae, "Hello there")
    assert codes.shape[-1] == sae.d_hidden
    with pytest.raises(IncompatibleSAEError, match="layer differs"):
        model.encode(sae, "Hello there", layer=3)


def test_load_sae_rejects_other_model_or_site(trained, tmp_path):
    _, path, _ = trained
    other = InterpretableModel(tiny_random_model(num_layers=2, d_model=32, seed=5))
    with pytest.raises(IncompatibleSAEError, match="d_model differs: model has 32, SAE has 64"):
        other.load_sae(path)
    assert other.load_sae(path, check=False).d_model == 64
    same_shape = InterpretableModel(tiny_random_model(seed=9))
    with pytest.raises(IncompatibleSAEError, match="model hash differs"):
        same_shape.load_sae(path)
    model = InterpretableModel(tiny_random_model())
    with pytest.raises(IncompatibleSAEError, match="component differs"):
        model.load_sae(path, layer=2, component="output")
    with pytest.raises(ValueError, match=r"has layers 0\.\.3"):
        model.load_sae(path, layer=9)


def test_misuse_errors(model):
    with pytest.raises(ValueError, match="unknown component 'mlpp'; valid components: mlp, attn, output"):
        model.train_sae(layer=1, dataset=TEXTS, component="mlpp", config=CONFIG)
    with pytest.raises(ValueError, match=r"layer 4 is out of range; this model has layers 0..3"):
        model.train_sae(layer=4, dataset=TEXTS, config=CONFIG)
    with pytest.raises(ValueError, match="dataset is empty"):
        model.train_sae(layer=1, dataset=[], config=CONFIG)
    with pytest.raises(ValueError, match="empty or whitespace"):
        model.train_sae(layer=1, dataset=["", "  "], config=CONFIG)
    with pytest.raises(TypeError, match="not a single str"):
        model.train_sae(layer=1, dataset="just one text", config=CONFIG)
    with pytest.raises(ValueError, match="k=500 exceeds d_hidden=128"):
        model.train_sae(layer=1, dataset=TEXTS, config=SAEConfig(expansion_factor=2, k=500))
    with pytest.raises(TypeError, match="must be an SAEConfig"):
        model.train_sae(layer=1, dataset=TEXTS, config={"k": 4})


def test_dataset_texts_accepts_hf_datasets():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": TEXTS[:3], "other": [1, 2, 3]})
    assert dataset_texts(ds) == TEXTS[:3]
    ds2 = datasets.Dataset.from_dict({"body": TEXTS[:2]})
    assert dataset_texts(ds2, text_column="body") == TEXTS[:2]
    with pytest.raises(ValueError, match=r"no column 'text'; its columns are \['body'\]"):
        dataset_texts(ds2)
    with pytest.raises(TypeError, match="DatasetDict"):
        dataset_texts(datasets.DatasetDict({"train": ds}))
    assert dataset_texts([{"text": "a"}, {"text": "b"}]) == ["a", "b"]
    with pytest.raises(TypeError, match="item 1 is a int"):
        dataset_texts(["a", 3])
    assert texts_digest(["a", "b"]) != texts_digest(["b", "a"]) != texts_digest(["ab"])


def test_several_layers_reuse_prepared_texts(tiny_model, caplog):
    model = InterpretableModel(tiny_model)
    cfg = CONFIG.replace(normalize_input=False)
    ds = __import__("datasets").Dataset.from_dict({"text": TEXTS[:8]})
    model.train_sae(layer=0, dataset=ds, config=cfg, context_length=16, progress=False)
    first = model.last_fit.activations
    with caplog.at_level(logging.INFO, logger="saepipe.activations.extract"):
        sae = model.train_sae(layer=1, dataset=TEXTS[:8], config=cfg, component="attn", context_length=16,
                              progress=False)
    assert sae.metadata["layer"] == 1 and sae.metadata["component"] == "attn"
    assert len(list((model.cache_dir / "texts").iterdir())) == 1  # one prepared copy for both runs
    assert not first.exists()  # the temporary shards of the previous site are dropped
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="saepipe.activations.extract"):
        model.train_sae(layer=1, dataset=TEXTS[:8], config=cfg.replace(k=2), component="attn",
                        context_length=16, progress=False)
    assert any("already complete" in r.getMessage() for r in caplog.records)  # no second forward


def test_import_saepipe_stays_light():
    code = ("import sys, saepipe; assert 'mlx' not in sys.modules and 'saepipe.api' not in sys.modules; "
            "from saepipe import InterpretableModel, SAEConfig, load_sae; print(InterpretableModel.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "saepipe.api"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = saepipe.nope
