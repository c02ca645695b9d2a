"""The analyze and dashboard stages end to end on small params: shard folders -> data/analyze ->
data/dashboard, then the site in a real browser (headless Chromium from file://): the index loads,
a token search finds features, and a feature page shows the analysis' highlighted contexts."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

import saepipe.lm.model
from saepipe.dashboard import load_feature_record
from saepipe.dashboard.browser import Browser, ChromiumUnavailable, ensure_chromium
from saepipe.dashboard.render import visible
from tests.test_analysis import LAYER, make_rows, make_sae, write_split

PARAMS = {"model": "test/tiny", "analyze": {"top_n": 6, "window_before": 5, "window_after": 2, "quantiles": 4,
                                       "per_quantile": 2, "histogram_bins": 16, "logit_top": 5, "neighbors": 5,
                                       "token_top": 8, "chunk_rows": 256, "splits": ["train", "eval"]}}


@pytest.fixture(scope="module")
def stages(tiny_model, tmp_path_factory):
    from stages.analyze import main as analyze_main
    from stages.dashboard import main as dashboard_main

    root = tmp_path_factory.mktemp("stages")
    d, h = tiny_model.info.d_model, tiny_model.info.model_hash
    write_split(root / "extract" / "train", *make_rows(1500, d, 0), "train", 512, h)
    write_split(root / "extract" / "eval", *make_rows(300, d, 1), "eval", 512, h)
    make_sae(tiny_model).save(root / "sae.safetensors")
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    mp = pytest.MonkeyPatch()
    mp.setattr(saepipe.lm.model, "load_model", lambda spec, **kw: tiny_model)
    try:
        res = CliRunner().invoke(analyze_main, ["--params", str(root / "params.yaml"), "--sae",
                                                str(root / "sae.safetensors"), "--acts", str(root / "extract"),
                                                "--out", str(root / "analyze")])
    finally:
        mp.undo()
    assert res.exit_code == 0, res.output + repr(res.exception)
    res2 = CliRunner().invoke(dashboard_main, ["--analysis", str(root / "analyze"), "--out", str(root / "dashboard")])
    assert res2.exit_code == 0, res2.output + repr(res2.exception)
    return {"root": root, "analyze_output": res.output, "dashboard_output": res2.output}


def test_analyze_stage_writes_the_contract_and_prints_its_phases(stages):
    out = stages["root"] / "analyze"
    assert {p.name for p in out.iterdir()} == {"features.parquet", "examples.parquet", "token_features.parquet",
                                               "summary.json"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"] == {"train": 1500, "eval": 300} and summary["window"] == 8
    assert summary["quantiles"] == 4 and summary["site"] == {"layer": LAYER, "component": "mlp"}
    for phase in ("encode", "statistics", "contexts", "tokens", "logits", "neighbors", "tables", "write"):
        assert f"analyze: {phase} " in stages["analyze_output"]
    assert not list(stages["root"].glob("saepipe-analyze-*")), "the scratch folder next to the output is removed"


def test_analyze_stage_refuses_an_sae_of_another_site(stages, tiny_model, tmp_path, monkeypatch):
    from stages.analyze import main as analyze_main

    monkeypatch.setattr(saepipe.lm.model, "load_model", lambda spec, **kw: tiny_model)
    sae = make_sae(tiny_model)
    sae.update_metadata(layer=LAYER + 1)
    sae.save(tmp_path / "other.safetensors")
    root = stages["root"]
    res = CliRunner().invoke(analyze_main, ["--params", str(root / "params.yaml"), "--sae",
                                            str(tmp_path / "other.safetensors"), "--acts", str(root / "extract"),
                                            "--out", str(tmp_path / "out")])
    assert res.exit_code != 0 and "layer differs" in res.output


def test_dashboard_stage_builds_the_site(stages):
    site = stages["root"] / "dashboard"
    assert (site / "index.html").is_file() and (site / "feature.html").is_file()
    assert (site / "data" / "index.js").is_file() and list((site / "data").glob("features-*.js"))
    assert "dashboard: 256 latents" in stages["dashboard_output"]


@pytest.fixture(scope="module")
def chromium() -> str:
    if os.environ.get("SAEPIPE_SKIP_BROWSER_TESTS") == "1":
        pytest.skip("SAEPIPE_SKIP_BROWSER_TESTS=1")
    try:
        return ensure_chromium(install=True)
    except ChromiumUnavailable as e:
        pytest.fail(f"{e} (set SAEPIPE_SKIP_BROWSER_TESTS=1 to skip these tests on purpose)", pytrace=False)


def test_real_analysis_in_a_browser(stages, chromium):
    site, analysis = stages["root"] / "dashboard", stages["root"] / "analyze"
    tf = pq.read_table(analysis / "token_features.parquet").slice(0, 1).to_pylist()[0]
    with Browser(chromium, width=1200, height=900) as b:
        b.goto((site / "index.html").as_uri(), ready="index")
        assert b.evaluate("document.querySelectorAll('#rows tr').length") == 100
        # search by a token the analysis indexed: its features are listed
        b.type_text("#q", tf["token"].strip() or tf["token"])
        b.wait_for("document.documentElement.dataset.search === 'done'")
        assert b.evaluate("document.querySelectorAll('#results .res').length") > 0
        # a live feature's page shows its contexts with the analysis' tokens and activations
        fid = tf["features"][0]
        b.goto(f"{(site / 'feature.html').as_uri()}#{fid}", ready=f"feature:{fid}")
        rec = load_feature_record(analysis, fid)
        rows = b.evaluate("Array.from(document.querySelectorAll('.ctx')).map(r => Array.from("
                          "r.querySelectorAll('.tk')).map(t => [t.textContent, t.dataset.act ? +t.dataset.act : 0]))")
        assert len(rows) == len(rec["examples"]) > 0
        for row, ex in zip(rows, rec["examples"], strict=True):
            assert [t[0] for t in row] == [visible(t) for t in ex["tokens"]]
            assert [t[1] for t in row] == pytest.approx(ex["acts"], rel=1e-6)
        assert b.evaluate("document.querySelectorAll('.ctx .tk.on').length") >= len(rows)
        assert b.errors == []
