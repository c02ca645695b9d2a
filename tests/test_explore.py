"""The Phase-2 API (saepipe.explore) on the tiny random model: results agree with the SAE's own
encoding of the same texts, and the dashboard it serves is reachable and cleaned up."""

from __future__ import annotations

import urllib.request

import mlx.core as mx
import numpy as np
import pytest

from saepipe import InterpretableModel
from saepipe.analysis.rows import rows_from_texts
from saepipe.dashboard import FeatureView
from saepipe.explore import ExplorableSAE, TextAnalysis, TopTexts
from saepipe.lm.sites import Site
from saepipe.sae.topk import TopKSAE

LAYER = 1
TEXTS = ["The capital of France is Paris, and Paris is large.", "Rivers flow to the sea.",
         "A quick brown fox jumps over the lazy dog.", "Numbers: 1, 2, 3, 4, 5.",
         "She said hello and left the room.", "Paris in spring is lovely."] * 3


@pytest.fixture(scope="module")
def model(tiny_model):
    return InterpretableModel(tiny_model)


@pytest.fixture(scope="module")
def sae(model, tmp_path_factory):
    raw = TopKSAE(model.d_model, 4, 8, seed=5, metadata={"layer": LAYER, "component": "mlp",
                                                          "model_hash": model.info.model_hash})
    path = raw.save(tmp_path_factory.mktemp("sae") / "sae.mlx")
    return model.load_sae(path)


def test_load_and_train_return_an_explorable_sae(model, sae):
    assert isinstance(sae, ExplorableSAE) and isinstance(sae, TopKSAE)
    plain = TopKSAE(model.d_model, 4, 8, seed=5)
    converted = ExplorableSAE.from_sae(plain, model)
    x = mx.random.normal((3, model.d_model))
    assert np.array_equal(np.array(converted.encode(x)), np.array(plain.encode(x)))
    assert set(converted.parameters()) == set(plain.parameters())


def test_analyze_text_matches_the_saes_encoding(model, sae):
    prompt = "The capital of France is Paris"
    result = sae.analyze_text(model, prompt=prompt, top_k=5)
    assert isinstance(result, TextAnalysis) and len(result) == 5
    with model.trace(prompt) as t:
        pass
    dense = np.array(sae.encode(t.activations[Site(LAYER, "mlp").name]))[0, 1:]  # BOS left out
    assert [p.position for p in result.per_token] == list(range(1, dense.shape[0] + 1))
    for row, scores in zip(dense, result.per_token, strict=True):
        order = np.lexsort((np.arange(len(row)), -row))[:5]
        order = [j for j in order if row[j] > 0]
        assert [s.feature for s in scores.features] == order
        assert [s.activation for s in scores.features] == pytest.approx(row[order].tolist(), rel=1e-5)
    best = dense.max(axis=0)
    assert result.features == np.lexsort((np.arange(len(best)), -best))[:5].tolist()
    assert "TextAnalysis(" in repr(result) and "#" in repr(result)
    assert next(iter(result)) == result[0] and result.tokens[0] == "T"


def test_top_activating_texts_are_the_strongest_texts(model, sae):
    rows = rows_from_texts(model.loaded, Site(LAYER, "mlp"), TEXTS)
    dense = np.array(sae.encode(mx.array(rows.acts)))
    feature = int(np.argmax((dense > 0).sum(0)))
    got = sae.get_top_activating_texts(feature_idx=feature, dataset=TEXTS, top_k=4)
    assert isinstance(got, TopTexts) and len(got) == 4 and got.feature == feature
    per_text = {}
    for r in range(len(dense)):
        d = int(rows.doc_id[r])
        per_text[d] = max(per_text.get(d, 0.0), dense[r, feature])
    want = sorted(per_text.items(), key=lambda dv: (-dv[1], dv[0]))[:4]
    assert [c.text_index for c in got] == [d for d, _ in want]
    assert [c.activation for c in got] == pytest.approx([v for _, v in want], rel=1e-5)
    for c in got:
        assert c.text == TEXTS[c.text_index] and c.acts[c.center] == c.activation == max(c.acts)
        assert "".join(c.tokens) in c.text and "\u27e6" in str(c)
    assert f"feature={feature}" in repr(got)


def test_visualize_feature(model, sae, tmp_path):
    view = sae.visualize_feature(feature_idx=3, model=model, dataset=TEXTS)
    assert isinstance(view, FeatureView) and view.feature == 3
    html = view._repr_html_()
    assert "Feature 3" in html and "<script" not in html
    assert view.save(tmp_path / "f3.html").read_text().startswith("<!doctype html>")


def test_launch_dashboard_serves_and_cleans_up(model, sae):
    srv = sae.launch_dashboard(model=model, dataset=TEXTS)
    try:
        assert srv.url.startswith("http://127.0.0.1:")
        page = urllib.request.urlopen(srv.url, timeout=10).read().decode()
        assert "<html" in page.lower()
        meta = urllib.request.urlopen(srv.url + "data/meta.js", timeout=10).read().decode()
        assert f'"n_features":{sae.d_hidden}' in meta.replace(" ", "")
    finally:
        srv.stop()
    assert not srv.folder.exists() and not srv.running


def test_errors_name_the_problem(model, sae):
    with pytest.raises(ValueError, match="out of range"):
        sae.get_top_activating_texts(feature_idx=sae.d_hidden, dataset=TEXTS)
    with pytest.raises(ValueError, match="dataset is required"):
        sae.visualize_feature(feature_idx=1, model=model)
    with pytest.raises(TypeError, match="list of strings"):
        sae.get_top_activating_texts(feature_idx=1, dataset="one text")
    with pytest.raises(ValueError, match="no model"):
        ExplorableSAE.from_sae(TopKSAE(model.d_model, 4, 8)).analyze_text(prompt="hi")
    other = ExplorableSAE.from_sae(TopKSAE(model.d_model, 4, 8, metadata={"layer": 2, "component": "mlp",
                                                                           "model_hash": "another"}))
    with pytest.raises(ValueError, match="model hash differs"):
        other.analyze_text(model, prompt="hi")
