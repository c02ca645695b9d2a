"""forward(): equals mlx-lm's own forward; capture, edit, stop_layer; right padding is inert."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from saepipe.lm.forward import forward
from saepipe.lm.sites import COMPONENTS, Site


def _tokens(b: int = 3, t: int = 17, vocab: int = 256, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, vocab, size=(b, t)).astype(np.int32))


def test_logits_equal_mlx_lm(tiny_model):
    tokens = _tokens()
    ref = np.array(tiny_model.model(tokens))
    out = forward(tiny_model.model, tokens)
    np.testing.assert_allclose(np.array(out.logits), ref, rtol=1e-4, atol=1e-5)
    assert out.activations == {}


def test_accepts_loaded_model_and_single_row(tiny_model):
    tokens = _tokens(b=1, t=5)
    np.testing.assert_allclose(np.array(forward(tiny_model, tokens).logits),
                               np.array(tiny_model.model(tokens)), rtol=1e-4, atol=1e-5)


def test_identity_edit_equals_plain(tiny_model):
    tokens = _tokens()
    sites = [Site(i, c) for i in range(4) for c in COMPONENTS]
    plain = forward(tiny_model.model, tokens, capture=sites, parallel=False)
    edited = forward(tiny_model.model, tokens, capture=sites, edit={s: (lambda x: x) for s in sites})
    np.testing.assert_array_equal(np.array(edited.logits), np.array(plain.logits))
    for s in sites:
        np.testing.assert_array_equal(np.array(edited.activations[s]), np.array(plain.activations[s]))


def test_parallel_split_equals_one_stream(tiny_model):
    tokens = _tokens(b=5)
    sites = [Site(1, "attn"), Site(3, "output")]
    split = forward(tiny_model.model, tokens, capture=sites, parallel=True)
    whole = forward(tiny_model.model, tokens, capture=sites, parallel=False)
    np.testing.assert_allclose(np.array(split.logits), np.array(whole.logits), rtol=1e-4, atol=1e-5)
    for s in sites:
        assert split.activations[s].shape == (5, 17, 64)
        np.testing.assert_allclose(np.array(split.activations[s]), np.array(whole.activations[s]),
                                   rtol=1e-5, atol=1e-6)


def test_edit_replaces_what_flows_on(tiny_model):
    tokens = _tokens()
    sites = [Site(0, "output"), Site(1, "attn"), Site(1, "output")]
    out = forward(tiny_model.model, tokens, capture=sites, edit={Site(1, "mlp"): mx.zeros_like})
    a = out.activations
    # with block 1's MLP zeroed, its output is the residual plus attention only
    np.testing.assert_allclose(np.array(a[Site(1, "output")]),
                               np.array(a[Site(0, "output")] + a[Site(1, "attn")]), rtol=1e-6, atol=1e-6)
    plain = forward(tiny_model.model, tokens)
    assert not np.allclose(np.array(out.logits), np.array(plain.logits))


@pytest.mark.parametrize("component", ["mlp", "attn", "output"])
def test_stop_layer_matches_full_run(tiny_model, component):
    tokens = _tokens()
    site = Site(2, component)
    full = forward(tiny_model.model, tokens, capture=[site], parallel=False)
    early = forward(tiny_model.model, tokens, stop_layer=2, capture=[site], parallel=False)
    assert early.logits is None and list(early.activations) == [site]
    np.testing.assert_array_equal(np.array(early.activations[site]), np.array(full.activations[site]))


def test_last_output_gives_logits(tiny_model):
    tokens = _tokens()
    m = tiny_model.model
    out = forward(m, tokens, capture=[Site(3, "output")])
    h = out.activations[Site(3, "output")]
    np.testing.assert_allclose(np.array(m.model.embed_tokens.as_linear(m.model.norm(h))),
                               np.array(out.logits), rtol=1e-5, atol=1e-5)
    assert h.shape == (3, 17, 64)


def test_right_padding_does_not_change_text_rows(tiny_model):
    rng = np.random.default_rng(1)
    text = rng.integers(0, 256, size=9).astype(np.int32)
    other = rng.integers(0, 256, size=20).astype(np.int32)
    batch = np.full((2, 20), 258, dtype=np.int32)
    batch[0, :9] = text
    batch[1] = other
    site = Site(3, "output")
    alone = forward(tiny_model.model, mx.array(text[None]), capture=[site]).activations[site]
    padded = forward(tiny_model.model, mx.array(batch), capture=[site]).activations[site]
    np.testing.assert_allclose(np.array(padded[0, :9]), np.array(alone[0]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"capture": [Site(4, "mlp")]}, "out of range"),
        ({"capture": [Site(1, "resid")]}, "unknown component"),
        ({"stop_layer": 1, "capture": [Site(2, "mlp")]}, "after stop_layer"),
        ({"stop_layer": 7}, "out of range"),
        ({"edit": {Site(0, "ffn"): mx.zeros_like}}, "unknown component"),
    ],
)
def test_bad_sites_are_clear_errors(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        forward(tiny_model.model, _tokens(), **kwargs)


def test_tokens_must_be_2d(tiny_model):
    with pytest.raises(ValueError, match="batch, seq"):
        forward(tiny_model.model, mx.array([1, 2, 3]))


@pytest.fixture
def real_model(request):
    """The default model, or a clean skip while load_model is not written yet."""
    try:
        return request.getfixturevalue("default_model")
    except NotImplementedError as e:
        pytest.skip(f"load_model('default') not available yet: {e}")


@pytest.mark.slow
def test_default_model_logits_equal_mlx_lm(real_model):
    default_model = real_model
    tokens = mx.array(np.array([default_model.tokenizer.encode("The quick brown fox jumps over the lazy dog.")],
                               dtype=np.int32))
    ref = np.array(default_model.model(tokens))
    out = np.array(forward(default_model, tokens).logits)
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3)
    assert (out.argmax(-1) == ref.argmax(-1)).all()


def test_fast_kernels_match_float64_truth():
    from saepipe.lm.forward import _causal_softmax, _swiglu

    g = mx.concatenate([mx.linspace(-86, 86, 20001), mx.array([0.0, 1e-30, -1e-3])])
    u = mx.linspace(-3, 3, g.shape[0])
    g64, u64 = np.array(g, dtype=np.float64), np.array(u, dtype=np.float64)
    truth = g64 * u64 / (1 + np.exp(-g64))
    got = np.array(_swiglu(g, u), dtype=np.float64)
    ok = np.abs(truth) > 1e-36  # float32 normal range
    assert (np.abs(got - truth)[ok] / np.abs(truth[ok])).max() < 5e-7  # MLX's own silu: ~4e-6
    far = np.array(_swiglu(mx.array([-200.0, 200.0]), mx.array([1.0, 1.0])))
    np.testing.assert_allclose(far, [0.0, 200.0], atol=1e-30)
    s = np.random.default_rng(0).normal(scale=30, size=(2, 3, 5, 5)).astype(np.float32)
    keep = np.tril(np.ones((5, 5), dtype=bool))
    probs = np.array(_causal_softmax(mx.array(s), mx.array(keep), mx.array(0.5)))
    z = np.where(keep, s.astype(np.float64) * 0.5, -np.inf)
    e = np.exp(z - z.max(-1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(-1, keepdims=True), rtol=1e-6, atol=1e-7)
    assert (probs[..., ~keep] == 0).all()


def test_single_threaded_blas_scope_nests_and_restores():
    """A caller already inside the scope (a test fixture, a split train step) may enter it again."""
    import threading

    from saepipe.runtime import blas_threads

    done = threading.Event()

    def nested() -> None:
        with blas_threads.single_threaded(), blas_threads.single_threaded():
            pass
        done.set()

    lib = blas_threads._openblas()
    before = lib.openblas_get_num_threads() if lib else None
    worker = threading.Thread(target=nested, daemon=True)
    worker.start()
    assert done.wait(10), "nested single_threaded() deadlocked"
    if lib:
        assert lib.openblas_get_num_threads() == before
