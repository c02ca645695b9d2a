"""evaluate_sae on a tiny random model, checked against an independent computation; health checks;
the evaluate stage end to end."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from saepipe.activations.stats import NormStats
from saepipe.evaluation.evaluate import evaluate_sae, health_checks, token_batches
from saepipe.sae.topk import TopKSAE

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Sparse autoencoders find features.",
    "a",
    "",
    "MLX runs on CPU here, slowly but surely, and the test stays small.",
    "Hello, world! " * 6,
    "Numbers 0123456789 and symbols #$%&.",
]
LAYER = 1


class IdentitySAE:
    """Perfect reconstruction: the code is the activation itself."""

    def encode(self, x):
        return x

    def decode(self, z):
        return z


class ZeroSAE(IdentitySAE):
    """Reconstructs everything as 0: splicing it in is zero-ablation."""

    def decode(self, z):
        return mx.zeros_like(z)


def _eval(tiny_model, sae, component="mlp", **kw):
    args = dict(layer=LAYER, component=component, max_tokens=10_000, batch_size=3, context_length=48,
                skip_special_tokens=True)
    return evaluate_sae(tiny_model, sae, TEXTS, **{**args, **kw})


def _random_sae(d_model: int, seed: int = 0) -> TopKSAE:
    rng = np.random.default_rng(seed)
    stats = NormStats(rng.normal(size=d_model), rng.uniform(0.5, 2, size=d_model), 1.0, 100)
    return TopKSAE(d_model, expansion_factor=4, k=8, stats=stats, seed=seed)


# ------------------------------------------------------------------- independent reference


def _np_ce(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    m = z.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
    return lse - np.take_along_axis(z, targets[..., None], -1)[..., 0]


def _run_blocks(module, ids: list[int], replace=None) -> tuple[np.ndarray, np.ndarray]:
    """One unpadded text through mlx-lm's own blocks; ``replace(h)`` swaps the residual after LAYER."""
    h = module.model.embed_tokens(mx.array([ids]))
    captured = None
    for i, block in enumerate(module.model.layers):
        h = block(h, mask="causal")
        if i == LAYER:
            captured = np.array(h[0])
            if replace is not None:
                h = mx.array(replace(captured)[None])
    logits = module.model.embed_tokens.as_linear(module.model.norm(h))
    return np.array(logits[0]), captured


def test_matches_independent_computation(tiny_model):
    """FVU and CE-loss score of the residual-stream SAE, recomputed text by text without padding,
    without saepipe.lm.forward and without saepipe.evaluation.metrics."""
    module, tok = tiny_model.model, tiny_model.tokenizer
    sae = _random_sae(tiny_model.info.d_model)
    xs, xhats, ce = [], [], {"clean": [], "spliced": [], "zero": []}
    for text in TEXTS:
        ids = tok.encode(text)[:48]
        if len(ids) < 2:
            xs.append(np.zeros((0, tiny_model.info.d_model)))  # BOS only: nothing scored
            continue
        keep = np.array([i not in tok.all_special_ids for i in ids])
        clean_logits, h = _run_blocks(module, ids)
        x_hat = np.array(sae(mx.array(h)))
        xs.append(h[keep])
        xhats.append(x_hat[keep])

        def put(value, keep=keep):
            return lambda resid: np.where(keep[:, None], value, resid)

        variants = {"clean": clean_logits, "spliced": _run_blocks(module, ids, put(x_hat))[0],
                    "zero": _run_blocks(module, ids, put(0.0))[0]}
        has_next = keep[:-1]  # scored positions that have a next token
        for name, logits in variants.items():
            ce[name].append(_np_ce(logits[:-1], np.array(ids[1:]))[has_next])
    x, x_hat = np.concatenate(xs).astype(np.float64), np.concatenate(xhats).astype(np.float64)
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    ce = {k: np.concatenate(v).mean() for k, v in ce.items()}
    score = (ce["zero"] - ce["spliced"]) / (ce["zero"] - ce["clean"])

    got = _eval(tiny_model, sae, component="output")
    assert got.reconstruction.n_rows == len(x)
    assert got.reconstruction.fvu == pytest.approx(fvu, rel=1e-4)
    assert got.spliced.ce_clean == pytest.approx(ce["clean"], rel=1e-5)
    assert got.spliced.ce_zero_ablated == pytest.approx(ce["zero"], rel=1e-5)
    assert got.spliced.ce_loss_score == pytest.approx(score, rel=1e-3)
    assert got.sparsity.l0 == pytest.approx(8.0)  # TopK with k=8 (random init: all positive pre-acts)


# -------------------------------------------------------------------------- properties


def test_perfect_reconstruction_scores(tiny_model):
    r = _eval(tiny_model, IdentitySAE())
    assert r.reconstruction.fvu == 0.0
    assert r.spliced.ce_loss_score == pytest.approx(1.0, abs=1e-12)
    assert r.spliced.kl_spliced == 0.0
    assert r.spliced.kl_score == 1.0
    assert r.spliced.ce_spliced == r.spliced.ce_clean


def test_zero_ablation_sae_scores_zero(tiny_model):
    r = _eval(tiny_model, ZeroSAE(), component="output")
    assert r.spliced.ce_loss_score == 0.0
    assert r.spliced.kl_score == 0.0
    assert r.spliced.ce_zero_ablated != r.spliced.ce_clean


def test_independent_of_batch_size(tiny_model):
    sae = _random_sae(tiny_model.info.d_model, seed=1)
    a, b = _eval(tiny_model, sae, batch_size=2), _eval(tiny_model, sae, batch_size=7)
    for part in ("reconstruction", "spliced"):
        ra, rb = getattr(a, part), getattr(b, part)
        for field in ra._fields:
            assert getattr(rb, field) == pytest.approx(getattr(ra, field), rel=1e-4, abs=1e-6), field
    np.testing.assert_array_equal(a.sparsity.density, b.sparsity.density)


def test_max_tokens_is_exact_and_special_positions_skipped(tiny_model):
    tok = tiny_model.tokenizer
    batches = list(token_batches(tok, TEXTS, context_length=48, batch_size=2, max_tokens=50,
                                 skip_special_tokens=True))
    assert sum(int(b.mask.sum()) for b in batches) == 50
    for b in batches:
        assert not b.mask[:, 0].any()  # BOS
        assert not (b.mask & (np.arange(b.tokens.shape[1]) >= b.lengths[:, None])).any()  # pads
    with_bos = list(token_batches(tok, TEXTS[:2], context_length=48, batch_size=2, max_tokens=10_000,
                                  skip_special_tokens=False))
    assert with_bos[0].mask[:, 0].all()
    r = _eval(tiny_model, IdentitySAE(), max_tokens=37)
    assert r.reconstruction.n_rows == r.sparsity.n_tokens == r.spliced.n_kl_tokens == 37


@pytest.mark.parametrize("skip_special", [True, False])
def test_scored_positions_are_extractions_rows(tiny_model, tmp_path, skip_special):
    """The same tokens as extract stores for the eval split, in the same order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from saepipe.activations.config import ExtractConfig
    from saepipe.activations.extract import make_batches
    from saepipe.texts.prepare import read_split

    pq.write_table(pa.table({"id": np.arange(len(TEXTS)), "text": TEXTS, "source": ["t"] * len(TEXTS),
                             "split": ["eval"] * len(TEXTS)}), tmp_path / "texts.parquet")
    ids, texts = read_split(tmp_path / "texts.parquet", "eval")
    cfg = ExtractConfig(context_length=20, batch_size=3, skip_special_tokens=skip_special)
    want = np.concatenate([b.tokens[b.keep] for b in make_batches(tiny_model.tokenizer, ids, texts, cfg)])
    got = np.concatenate([b.tokens[b.mask] for b in token_batches(
        tiny_model.tokenizer, texts, context_length=20, batch_size=3, max_tokens=10_000,
        skip_special_tokens=skip_special)])
    np.testing.assert_array_equal(got, want)


def test_d_model_mismatch_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="d_model"):
        _eval(tiny_model, _random_sae(tiny_model.info.d_model * 2))


# -------------------------------------------------------------------------------- health


def test_health_checks():
    good = {"l0": 31.0, "dead_fraction": 0.05, "fvu": 0.2}
    h = health_checks(good, {"history": [{"train/loss": 2.0}, {"train/loss": 0.5}], "warnings": []}, k=32)
    assert all(c["ok"] for c in h.values()), h
    bad = {"l0": 20.0, "dead_fraction": 0.5, "fvu": float("nan")}
    short = ["the run has 2 steps but sae.warmup_steps=50: ..."]
    h = health_checks(bad, {"history": [{"train/loss": 0.5}, {"train/loss": 0.6}], "warnings": short}, k=32)
    assert not any(c["ok"] for c in h.values()), h
    assert h["schedule_ok"]["value"] == short
    assert not health_checks(good, {}, k=32)["schedule_ok"]["ok"]  # not recorded: not passed
    assert h["no_nan"]["value"] == ["fvu"]
    assert not health_checks(good, {}, k=32)["loss_decreased"]["ok"]  # unknown: not passed
    # the per-step curve wins over a one-epoch history: noisy but decreasing on average
    curve = np.r_[np.linspace(3, 1, 50) + np.tile([0.3, -0.3], 25), [1.2]]
    h = health_checks(good, {"history": [{"train/loss": 1.0}]}, k=32, loss_curve=curve)
    assert h["loss_decreased"]["ok"] and h["loss_decreased"]["value"]["start"] > 2.5
    assert not health_checks(good, {}, k=32, loss_curve=curve[::-1])["loss_decreased"]["ok"]


# ------------------------------------------------------------------------------ the stage


def test_stage_end_to_end(tiny_model, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml
    from click.testing import CliRunner

    import saepipe.lm.model
    from stages.evaluate import main

    monkeypatch.setattr(saepipe.lm.model, "load_model", lambda spec, **kw: tiny_model)
    params = {"model": "test/tiny", "extract": {"context_length": 32, "skip_special_tokens": True},
              "evaluate": {"max_tokens": 120, "batch_size": 4}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    pq.write_table(pa.table({"id": np.arange(2 * len(TEXTS)), "text": TEXTS * 2,
                             "source": ["t"] * (2 * len(TEXTS)), "split": ["eval", "train"] * len(TEXTS)}),
                   tmp_path / "texts.parquet")
    sae = _random_sae(tiny_model.info.d_model)
    sae.update_metadata(layer=LAYER, component="mlp", model_hash=tiny_model.info.model_hash)
    sae.save(tmp_path / "sae.safetensors")
    (tmp_path / "train.json").write_text(json.dumps({"steps": 20, "history": [{"train/loss": 0.6}]}))
    live = tmp_path / "live" / "plots" / "metrics"
    (live / "val").mkdir(parents=True)
    (live / "val" / "fvu.tsv").write_text("step\tfvu\n20\t0.5\n")
    (live / "loss.tsv").write_text("timestamp\tstep\tloss\n1\t0\t1.0\n2\t10\t0.5\n3\t20\t0.3\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, [  # no --site: the one the SAE file records
        "--params", str(tmp_path / "params.yaml"), "--sae", str(tmp_path / "sae.safetensors"),
        "--texts", str(tmp_path / "texts.parquet"), "--train-metrics", str(tmp_path / "train.json"),
        "--train-live", str(tmp_path / "live"), "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "FVU" in res.output and "CE-loss score" in res.output
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("fvu", "explained_variance", "mse", "cosine", "rel_bias", "l0", "dead_fraction",
                "ce_clean", "ce_spliced", "ce_zero_ablated", "ce_mean_ablated", "ce_loss_score",
                "kl_spliced", "kl_score"):
        assert isinstance(metrics[key], float), key
    assert metrics["n_rows"] == 120
    assert metrics["health"]["loss_decreased"]["ok"] is True
    lines = (out / "density.csv").read_text().splitlines()
    assert lines[0].startswith("log10_density,")
    assert sum(int(r.split(",")[-1]) for r in lines[1:]) == round((1 - metrics["dead_fraction"]) * metrics["d_hidden"])
    assert (out / "plots" / "training_curves.png").stat().st_size > 1000
    assert (out / "plots" / "feature_density.png").stat().st_size > 1000
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 2 and "http" not in report

    assert metrics["layer"] == LAYER and metrics["component"] == "mlp"

    # an SAE trained at another site than --site is refused
    sae.update_metadata(layer=LAYER + 1)
    sae.save(tmp_path / "other.safetensors")
    res = CliRunner().invoke(main, [
        "--params", str(tmp_path / "params.yaml"), "--site", f"{LAYER}.mlp", "--sae", str(tmp_path / "other.safetensors"),
        "--texts", str(tmp_path / "texts.parquet"), "--out", str(tmp_path / "out2")])
    assert res.exit_code != 0 and "layer differs" in res.output


# ----------------------------------------------------------------------------- fast path


@pytest.mark.parametrize("component,layer", [("mlp", LAYER), ("attn", 0), ("output", 3)])
def test_fast_path_equals_straightforward_path(tiny_model, component, layer):
    """Length-sorted batches + resumed, stream-split passes give the metrics of file-order batches
    run from the embedding with plain edit functions; max_tokens cuts a text in the middle."""
    sae = _random_sae(tiny_model.info.d_model, seed=2)
    kw = dict(layer=layer, component=component, max_tokens=101, batch_size=3)
    fast, slow = _eval(tiny_model, sae, fast=True, **kw), _eval(tiny_model, sae, fast=False, **kw)
    for part in ("reconstruction", "spliced"):
        rf, rs = getattr(fast, part), getattr(slow, part)
        for field in rf._fields:
            assert getattr(rf, field) == pytest.approx(getattr(rs, field), rel=1e-5, abs=1e-7), field
    assert fast.spliced.n_ce_tokens == slow.spliced.n_ce_tokens
    np.testing.assert_array_equal(fast.sparsity.density, slow.sparsity.density)


def test_length_sorted_keeps_scored_positions(tiny_model):
    from saepipe.evaluation.evaluate import length_sorted

    batches = list(token_batches(tiny_model.tokenizer, TEXTS, context_length=48, batch_size=2,
                                 max_tokens=200, skip_special_tokens=True))
    regrouped = length_sorted(batches, 2, pad_id=258)

    def scored(bs):  # (token, next token or -1) of every scored position, as a sorted multiset
        pairs = []
        for b in bs:
            for row, length in zip(range(len(b.tokens)), b.lengths, strict=True):
                for t in np.flatnonzero(b.mask[row]):
                    pairs.append((int(b.tokens[row, t]), int(b.tokens[row, t + 1]) if t + 1 < length else -1))
        return sorted(pairs)
    assert scored(regrouped) == scored(batches)
    widths = [b.tokens.shape[1] for b in regrouped]
    assert widths == sorted(widths)
    assert [len(b.tokens) for b in regrouped] == [2, 2, 2]  # the 6 texts with a scored position
    assert all(b.lengths.max() == b.tokens.shape[1] for b in regrouped)  # no all-padding column
