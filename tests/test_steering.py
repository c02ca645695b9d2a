"""Steering: deferred traces with edits, ``sae.steer`` / ``model.output.save()``, steered generation,
and the ``saepipe steer`` command, on the tiny random model with hand-made SAEs (no training)."""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from saepipe import IncompatibleSAEError, InterpretableModel, Steer
from saepipe import cli as cli_mod
from saepipe.activations.stats import NormStats
from saepipe.analysis.directions import Unembedding
from saepipe.analysis.steering import SteeringPlan, steering_vector
from saepipe.explore import ExplorableSAE
from saepipe.lm.forward import Add, Chain, forward
from saepipe.lm.generate import generate_tokens
from saepipe.lm.sites import Site
from saepipe.lm.trace import TracePendingError, trace

LAST = 3  # the tiny model's last block: its output feeds the final norm and the unembedding


@pytest.fixture(scope="module")
def model(tiny_model):
    return InterpretableModel(tiny_model)


def _sae(model, layer=LAST, component="output", *, per_dim_stats=False, seed=0, **meta) -> ExplorableSAE:
    """An untrained SAE (encoder = decoder transpose) recorded as trained on ``model`` at the site."""
    stats = None
    if per_dim_stats:
        rng = np.random.default_rng(seed)
        stats = NormStats(rng.normal(size=64), rng.uniform(0.2, 3.0, size=64), 1.0, 100)
    metadata = {"layer": layer, "component": component, "model_hash": model.info.model_hash,
                "model_name": model.info.model_id, **meta}
    return ExplorableSAE(64, 4, 8, stats=stats, metadata=metadata, seed=seed, normalization="per_dim").bind(model)


def _steered(model, sae, text, **steer):
    with model.trace(text) as t:
        if steer:
            sae.steer(model=model, **steer)
        out = model.output.save()
    return t, out


# --- the trace ---------------------------------------------------------------------------------
def test_strength_zero_gives_logits_identical_to_a_clean_run(model):
    sae = _sae(model, layer=1, component="mlp", per_dim_stats=True)
    texts = ["hello world", "a longer second text"]
    with model.trace(texts) as clean:
        pass
    for component in ("mlp", "attn", "output"):
        sae = _sae(model, layer=1, component=component, per_dim_stats=True)
        t, out = _steered(model, sae, texts, layer=1, feature_idx=7, strength=0.0)
        assert np.array_equal(np.array(out.value), np.array(clean.logits))
        assert np.array_equal(np.array(t.logits), np.array(clean.logits))
    t, _ = _steered(model, sae, texts, layer=1, feature_idx=7, strength=0.5)
    assert not np.array_equal(np.array(t.logits), np.array(clean.logits))


def test_strength_raises_the_feature_by_strength_units_in_model_space(model):
    """The steering vector is W_dec[i] * std: re-encoding the steered site adds exactly `strength`
    to the latent's pre-activation (encoder row i . decoder row i = 1 at initialisation), whatever
    the per-dimension normalization."""
    sae = _sae(model, per_dim_stats=True)
    name = f"model.model.layers.{LAST}"
    feature = 11
    pre = {}
    acts = {}
    for s in (0.0, 1.0, 2.0, 4.0, 8.0):
        t, _ = _steered(model, sae, "steer me", feature_idx=feature, strength=s)
        pre[s] = np.array(sae.pre_activations(t.activations[name]))[0, :, feature]
        acts[s] = np.array(sae.encode(t.activations[name]))[0, :, feature]
    on = pre[0.0] > 0
    for s in (1.0, 2.0, 4.0, 8.0):
        np.testing.assert_allclose(pre[s][on], pre[0.0][on] + s, rtol=1e-4, atol=1e-4)
    means = [acts[s].mean() for s in sorted(acts)]
    assert all(b > a for a, b in itertools.pairwise(means)), means
    assert (acts[8.0] > 0).all()  # in every token's top-k by then
    np.testing.assert_allclose(np.array(steering_vector(sae, feature)),
                               np.array(sae.W_dec[feature]) * np.array(sae.stats.std), rtol=1e-6)


def test_strength_raises_the_promoted_tokens_probability_monotonically(model):
    sae = _sae(model, per_dim_stats=True, seed=1)
    feature = 3
    effect = Unembedding(model.loaded).logits(np.array(steering_vector(sae, feature))[None])[0]
    promoted = np.argsort(-effect)[:5]
    probs = []
    for s in (0.0, 2.0, 4.0, 8.0, 16.0):
        _, out = _steered(model, sae, "the quick brown fox", feature_idx=feature, strength=s)
        p = np.array(mx.softmax(out.value.astype(mx.float32), axis=-1))[0]
        probs.append(p[:, promoted].sum(axis=-1).mean())
    assert all(b > a for a, b in itertools.pairwise(probs)), probs
    assert probs[-1] > 4 * probs[0], probs


def test_several_steers_compose(model):
    a, b = _sae(model, seed=0), _sae(model, layer=1, component="mlp", seed=1)
    text = "compose these"
    with model.trace(text) as t:
        a.steer(model=model, feature_idx=1, strength=2.0)
        a.steer(model=model, feature_idx=2, strength=-3.0)
        b.steer(model=model, layer=1, feature_idx=5, strength=4.0)
        out = model.output.save()
    assert set(t.edits) == {Site(LAST, "output"), Site(1, "mlp")}
    tokens = mx.array(t.tokens)
    by_hand = {Site(LAST, "output"): Add(2.0 * steering_vector(a, 1) - 3.0 * steering_vector(a, 2)),
               Site(1, "mlp"): Add(4.0 * steering_vector(b, 5))}
    ref = forward(model.loaded, tokens, edit=by_hand)
    np.testing.assert_allclose(np.array(out.value), np.array(ref.logits), rtol=1e-5, atol=1e-5)
    # the trace chains the edits of one site in order; a chain splits by rows like its parts
    chained = Chain((Add(mx.ones((64,))), Add(mx.ones((2, 3, 64))))).rows(1, 2)
    assert chained.edits[0].delta.shape == (64,) and chained.edits[1].delta.shape == (1, 3, 64)


def test_positions_steer_only_those_tokens(model):
    sae = _sae(model, layer=1, component="mlp")
    texts = ["abcdef", "ab"]  # 7 and 3 tokens (BOS + bytes), right padded
    name = "model.model.layers.1.mlp"
    with model.trace(texts) as clean:
        pass
    t, _ = _steered(model, sae, texts, layer=1, feature_idx=4, strength=5.0, positions=[-1, 1])
    diff = np.abs(np.array(t.activations[name]) - np.array(clean.activations[name])).max(axis=-1)
    assert (diff > 1e-3).tolist() == [[False, True, False, False, False, False, True],
                                      [False, True, True, False, False, False, False]]
    with pytest.raises(IndexError, match="position -4 is outside the 3 tokens of text 1"):
        _steered(model, sae, texts, layer=1, feature_idx=4, strength=5.0, positions=[-4])


def test_output_and_results_before_exit_are_clear_errors(model):
    sae = _sae(model)
    with model.trace("early") as t:
        out = model.output.save()
        for read in (lambda: out.value, lambda: out.shape, lambda: out[0], lambda: np.array(out),
                     lambda: t.activations, lambda: t.logits):
            with pytest.raises(TracePendingError, match=r"when its `with` block exits|when the block exits"):
                read()
        assert "pending" in repr(out)
    assert out.shape == (1, t.tokens.shape[1], model.info.vocab_size) and out.ready
    np.testing.assert_array_equal(np.array(mx.array(out)), np.array(t.logits))
    with pytest.raises(RuntimeError, match=r"only available inside `with model\.trace"):
        model.output  # noqa: B018
    with pytest.raises(RuntimeError, match="inside one"):
        sae.steer(model=model, feature_idx=1, strength=1.0)
    with pytest.raises(RuntimeError, match="already run"):
        t.add_edit(Site(0, "mlp"), Add(mx.zeros((64,))))
    with pytest.raises(RuntimeError, match="entered once"), t:
        pass


def test_incompatible_sae_is_a_clear_error(model):
    with model.trace("x"):
        with pytest.raises(IncompatibleSAEError, match="layer differs: asked for 2, SAE trained on 3"):
            _sae(model).steer(model=model, layer=2, feature_idx=0, strength=1.0)
        with pytest.raises(IncompatibleSAEError, match="component differs"):
            _sae(model).steer(model=model, component="mlp", feature_idx=0, strength=1.0)
        with pytest.raises(IncompatibleSAEError, match="model hash differs"):
            _sae(model, model_hash="another").steer(model=model, feature_idx=0, strength=1.0)
        wide = ExplorableSAE(32, 2, 4, metadata={"layer": 1, "component": "mlp"})
        with pytest.raises(IncompatibleSAEError, match="d_model differs: model has 64, SAE has 32"):
            wide.steer(model=model, feature_idx=0, strength=1.0)
        with pytest.raises(IncompatibleSAEError, match="records no layer"):
            ExplorableSAE(64, 2, 4, metadata={"model_hash": model.info.model_hash}).steer(
                model=model, feature_idx=0, strength=1.0)
        with pytest.raises(ValueError, match=r"out of range: this SAE has features 0\.\.255"):
            _sae(model).steer(model=model, feature_idx=256, strength=1.0)
        with pytest.raises(ValueError, match="finite"):
            _sae(model).steer(model=model, feature_idx=1, strength=float("nan"))


def test_trace_without_with_runs_on_first_read(tiny_model):
    t = trace(tiny_model, "lazy", capture=["model.layers.1.mlp"])
    assert not t.ran
    assert t.logits is None and t.ran  # only block 1 was needed
    with trace(tiny_model, "lazy", capture=["model.layers.1.mlp"]) as t2:
        t2.add_edit(Site(2, "mlp"), Add(mx.ones((64,))))
        out = t2.output.save()
    assert out.value.shape[-1] == 259  # a saved output runs the model to the end


# --- generation ---------------------------------------------------------------------------------
def test_generate_is_greedy_deterministic_and_steerable(model):
    sae = _sae(model, per_dim_stats=True, seed=2)
    a = model.generate("hello", max_tokens=12, stop_at_eos=False)
    b = model.generate("hello", max_tokens=12, stop_at_eos=False)
    assert a.tokens == b.tokens and len(a.tokens) == 12 and a.cached and str(a) == a.text
    assert a.prompt_tokens == model.tokenizer.encode("hello")
    zero = model.generate("hello", max_tokens=12, steer=[sae.steering(9, 0.0)], stop_at_eos=False)
    assert zero.tokens == a.tokens
    loud = model.generate("hello", max_tokens=12, steer=Steer(sae, 9, 40.0), stop_at_eos=False)
    assert loud.tokens != a.tokens
    # the steered direction's top promoted token takes over
    effect = Unembedding(model.loaded).logits(np.array(steering_vector(sae, 9))[None])[0]
    assert loud.tokens[-1] == int(np.argmax(effect))


def test_generate_with_and_without_cache_agree(model):
    sae = _sae(model, layer=1, component="mlp", seed=3)
    for steers in ([], [Steer(sae, 6, 3.0)], [Steer(sae, 6, 3.0, positions=[1, -1, 8])]):
        cached = model.generate("abc", max_tokens=10, steer=steers, stop_at_eos=False)
        fresh = model.generate("abc", max_tokens=10, steer=steers, cache=False, stop_at_eos=False)
        assert cached.cached and not fresh.cached
        assert cached.tokens == fresh.tokens


def test_generation_positions_and_edits_at(model):
    """``SteeringPlan.edits`` covers absolute positions: prompt positions (negative from its end) and
    generated ones; the cached loop asks for the prompt once, then one position per token."""
    sae = _sae(model, seed=4)
    plan = SteeringPlan([Steer(sae, 1, 2.0, positions=[-1, 5]), Steer(sae, 2, 1.0)], model.loaded, prompt_length=4)
    v1, v2 = np.array(steering_vector(sae, 1)), np.array(steering_vector(sae, 2))
    whole = np.array(plan.edits(0, 7)[Site(LAST, "output")].delta)[0]
    expect = np.tile(v2, (7, 1))
    expect[[3, 5]] += 2.0 * v1
    np.testing.assert_allclose(whole, expect, rtol=1e-6)
    one = plan.edits(6, 1)[Site(LAST, "output")]
    np.testing.assert_allclose(np.array(one.delta), v2, rtol=1e-6)
    calls = []

    def edits_at(start, length):
        calls.append((start, length))
        return {}

    generate_tokens(model.loaded, [1, 2, 3, 4], 3, edits_at=edits_at)
    assert calls == [(0, 4), (4, 1), (5, 1)]


def test_generate_sampling_is_seeded_and_arguments_are_checked(model):
    a = model.generate("hi", max_tokens=8, temperature=1.5, seed=7, stop_at_eos=False)
    b = model.generate("hi", max_tokens=8, temperature=1.5, seed=7, stop_at_eos=False)
    c = model.generate("hi", max_tokens=8, temperature=1.5, seed=8, stop_at_eos=False)
    assert a.tokens == b.tokens != c.tokens
    with pytest.raises(ValueError, match="max_tokens"):
        model.generate("hi", max_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate("hi", temperature=-1.0)
    with pytest.raises(TypeError, match="Steer"):
        model.generate("hi", steer=[("sae", 1, 2.0)])
    with pytest.raises(IncompatibleSAEError, match="model hash differs"):
        model.generate("hi", steer=[_sae(model, model_hash="other").steering(1, 1.0)])


# --- the command --------------------------------------------------------------------------------
def test_steer_command_prints_clean_and_steered_side_by_side(model, tmp_path, monkeypatch):
    import saepipe.lm.model as model_mod

    sae = _sae(model, per_dim_stats=True, seed=2)
    path = sae.save(tmp_path / "sae.safetensors")
    asked = []
    monkeypatch.setattr(model_mod, "load_model", lambda spec, **kw: asked.append(spec) or model.loaded)
    args = ["steer", "--feature", "9", "--strength", "40", "--sae", str(path), "--max-tokens", "6", "--width", "80",
            "hello"]
    result = CliRunner().invoke(cli_mod.main, args)
    assert result.exit_code == 0, result.output
    clean = model.generate("hello", max_tokens=6)
    steered = model.generate("hello", max_tokens=6, steer=[sae.steering(9, 40.0)])
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("clean"))
    assert lines[header].split(" | ") == ["clean".ljust(38), "steered: feature 9 x 40"]
    assert lines[header + 1] == "-" * 38 + "-+-" + "-" * 38
    body = lines[header + 2:]

    def squeeze(text):
        return "".join(text.split())

    assert squeeze("".join(line[:38] for line in body)) == squeeze(clean.text)
    assert squeeze("".join(line[41:] for line in body)) == squeeze(steered.text) != squeeze(clean.text)
    # the model named by the SAE's metadata (neither a file nor a hub id here: params.yaml's, else default)
    assert asked == ["default"]
    bad = CliRunner().invoke(cli_mod.main, ["steer", "-f", "999", "-s", "1", "--sae", str(path), "x"])
    assert bad.exit_code != 0 and "out of range" in bad.output
    missing = CliRunner().invoke(cli_mod.main, ["steer", "-f", "1", "-s", "1", "--sae", str(tmp_path / "no"), "x"])
    assert missing.exit_code != 0 and "SAE file not found" in missing.output


def test_steer_model_spec_follows_the_sae_then_params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_mod.steer_model_spec({"model_name": "SmolLM2-135M-Instruct.Q4_1.gguf"}) == "default"
    assert cli_mod.steer_model_spec({"model_name": "mlx-community/Llama-3.2-1B-Instruct"}) == \
        "mlx-community/Llama-3.2-1B-Instruct"
    assert cli_mod.steer_model_spec({}) == "default"
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("model: some/model\n")
    assert cli_mod.steer_model_spec({"model_name": "tiny-random-llama"}) == "some/model"
    assert cli_mod.side_by_side("a b c", "x\ny", "L", "R", 47) == [
        "L                      | R", "-----------------------+-----------------------", "a b c                  | x",
        "                       | y"]
