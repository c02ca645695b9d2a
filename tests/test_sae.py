"""TopKSAE: exact-k selection, shapes, normalization, tied weights, persistence, compatibility."""

from __future__ import annotations

import json
import struct

import mlx.core as mx
import numpy as np
import pytest

import saepipe  # noqa: F401  (fast BLAS before mlx)
from saepipe.activations.stats import NormStats
from saepipe.sae.topk import TopKSAE, load_sae


def _stats(d: int, seed: int = 0) -> NormStats:
    rng = np.random.default_rng(seed)
    return NormStats(rng.normal(size=d) * 3, rng.uniform(0.5, 2.0, size=d), 5.0, 123)


def _x(*shape: int, seed: int = 1) -> mx.array:
    return mx.array(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def test_exactly_k_per_row_random_inputs():
    sae = TopKSAE(16, 4, 5, seed=3)
    sae.update({"b_enc": mx.full((64,), 10.0)})  # every pre-activation positive: k non-zeros
    f = np.asarray(sae.encode(_x(50, 16)))
    assert ((f != 0).sum(axis=-1) == 5).all()


def test_ties_never_keep_more_than_k():
    sae = TopKSAE(8, 4, 3)
    # every latent has the same pre-activation (1.0): a threshold would keep all 32
    sae.update({"W_enc": mx.zeros((32, 8)), "b_enc": mx.ones((32,))})
    x = mx.ones((6, 8))
    f = np.asarray(sae.encode(x))
    assert ((f != 0).sum(axis=-1) == 3).all()
    values, indices = sae.encode_topk(x)
    assert values.shape == (6, 3) and indices.shape == (6, 3)
    assert all(len(set(row)) == 3 for row in np.asarray(indices).tolist())


def test_topk_picks_the_largest():
    sae = TopKSAE(16, 4, 7, seed=1)
    x = _x(20, 16)
    pre = np.asarray(sae.pre_activations(x))
    values, _ = sae.encode_topk(x)
    expected = -np.sort(-pre, axis=-1)[:, :7]
    np.testing.assert_allclose(np.sort(np.asarray(values), axis=-1)[:, ::-1], expected, rtol=1e-6)


@pytest.mark.parametrize("shape", [(16,), (9, 16), (2, 5, 16), (2, 3, 4, 16)])
def test_any_leading_shape(shape):
    sae = TopKSAE(16, 4, 5, stats=_stats(16), seed=2)
    x = _x(*shape)
    f = sae.encode(x)
    assert f.shape == (*shape[:-1], 64)
    out = sae(x)
    assert out.shape == shape
    np.testing.assert_allclose(np.asarray(sae.decode(f)), np.asarray(out), rtol=1e-5, atol=1e-5)
    values, indices = sae.encode_topk(x)
    assert values.shape == (*shape[:-1], 5)
    np.testing.assert_allclose(np.asarray(sae.decode_topk(values, indices)), np.asarray(out), rtol=1e-5, atol=1e-5)
    flat = np.asarray(sae(x.reshape(-1, 16))).reshape(shape)
    np.testing.assert_allclose(flat, np.asarray(out), rtol=1e-5, atol=1e-5)


def test_wrong_width_is_a_clear_error():
    sae = TopKSAE(16, 2, 4)
    with pytest.raises(ValueError, match="d_model=16"):
        sae.encode(mx.zeros((3, 15)))
    with pytest.raises(ValueError, match="d_hidden=32"):
        sae.decode(mx.zeros((3, 31)))
    with pytest.raises(ValueError, match="k must be"):
        TopKSAE(4, 2, 9)


@pytest.mark.parametrize("mode", ["scalar", "per_dim"])
def test_normalization_round_trip_and_equivalence(mode):
    d = 12
    stats = _stats(d)
    with_stats = TopKSAE(d, 3, 4, stats=stats, seed=5, normalization=mode)
    plain = TopKSAE(d, 3, 4, seed=5)
    x = _x(30, d) * 4 + 1
    np.testing.assert_allclose(np.asarray(with_stats.denormalize(with_stats.normalize(x))), np.asarray(x),
                               rtol=1e-5, atol=1e-5)
    # scalar: one std for all dimensions, the root mean per-dimension variance
    std = np.full(d, np.sqrt(np.mean(stats.std**2))) if mode == "scalar" else stats.std
    x_n = (x - mx.array(stats.mean, dtype=mx.float32)) / mx.array(std, dtype=mx.float32)
    # the normalized SAE is the plain SAE applied in normalized units, output de-normalized
    expected = np.asarray(plain(x_n)) * std + stats.mean
    np.testing.assert_allclose(np.asarray(with_stats(x)), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(with_stats.encode(x)), np.asarray(plain.encode(x_n)))
    assert with_stats.metadata["stats_digest"] == stats.digest()


def test_stats_are_not_parameters():
    sae = TopKSAE(8, 2, 3, stats=_stats(8))
    assert set(sae.parameters()) == {"W_enc", "b_enc", "W_dec", "b_dec"}


def test_tied_weights_use_the_decoder():
    sae = TopKSAE(8, 4, 3, tied_weights=True, seed=4)
    assert set(sae.parameters()) == {"b_enc", "W_dec", "b_dec"}
    x = _x(5, 8)
    pre = np.maximum((np.asarray(x) - np.asarray(sae.b_dec)) @ np.asarray(sae.W_dec).T + np.asarray(sae.b_enc), 0)
    np.testing.assert_allclose(np.asarray(sae.pre_activations(x)), pre, rtol=1e-5, atol=1e-6)


def test_init_unit_decoder_and_encoder_is_decoder_transpose():
    sae = TopKSAE(16, 4, 4, seed=9)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(sae.W_dec), axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(sae.W_enc), np.asarray(sae.W_dec))


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip(tmp_path, tied):
    sae = TopKSAE(16, 4, 6, tied_weights=tied, stats=_stats(16), seed=7,
                  metadata={"layer": 3, "component": "mlp", "model_hash": "abc", "config": {"k": 6}})
    sae.update({"b_enc": mx.array(np.random.default_rng(0).normal(size=64).astype(np.float32))})
    path = sae.save(tmp_path / "my_sae.mlx")  # any file name, as in mlxterp
    assert path.name == "my_sae.mlx"
    loaded = load_sae(path)
    x = _x(4, 7, 16)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(sae(x)))
    np.testing.assert_array_equal(np.asarray(loaded.encode(x)), np.asarray(sae.encode(x)))
    assert loaded.metadata == sae.metadata
    assert loaded.stats.digest() == sae.stats.digest()
    assert loaded.tied_weights is tied and loaded.k == 6 and loaded.d_hidden == 64
    # the file is plain safetensors: 8-byte header length, then a JSON header (no pickle)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert header["__metadata__"]["format"] == "saepipe.sae"
    assert json.loads(header["__metadata__"]["saepipe"])["metadata"]["layer"] == 3


def test_save_load_without_stats(tmp_path):
    sae = TopKSAE(8, 2, 2, seed=1)
    loaded = TopKSAE.load(sae.save(tmp_path / "plain.safetensors"))
    assert loaded.stats is None
    x = _x(3, 8)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(sae(x)))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_sae(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.mlx"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_sae(garbage)
    from safetensors.numpy import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": np.zeros((2, 2), np.float32)}, str(foreign))
    with pytest.raises(ValueError, match="not a saepipe SAE"):
        load_sae(foreign)
    truncated = tmp_path / "truncated.safetensors"
    good = TopKSAE(8, 2, 2).save(tmp_path / "good.safetensors").read_bytes()
    truncated.write_bytes(good[: len(good) - 40])
    with pytest.raises(ValueError, match=r"truncated\.safetensors"):
        load_sae(truncated)


def test_compatibility(tiny_model):
    info = tiny_model.info
    meta = {"layer": 2, "component": "mlp", "model_hash": info.model_hash, "model_name": info.model_id}
    sae = TopKSAE(info.d_model, 2, 4, metadata=meta)
    assert sae.compatibility(tiny_model, 2, "mlp") == (True, [])
    assert sae.is_compatible(tiny_model, 2, "mlp")
    ok, reasons = sae.compatibility(tiny_model, 3, "attn")
    assert not ok and len(reasons) == 2
    assert any("layer" in r and "3" in r for r in reasons) and any("component" in r for r in reasons)
    other = TopKSAE(info.d_model, 2, 4, metadata={**meta, "model_hash": "other"})
    ok, reasons = other.compatibility(tiny_model, 2, "mlp")
    assert not ok and "model hash" in reasons[0]
    wrong_width = TopKSAE(info.d_model // 2, 2, 4, metadata=meta)
    ok, reasons = wrong_width.compatibility(tiny_model, 2, "mlp")
    assert not ok and "d_model" in reasons[0]
    unknown = TopKSAE(info.d_model, 2, 4)
    ok, reasons = unknown.compatibility(tiny_model.info, 2, "mlp")
    assert not ok and any("no model identity" in r for r in reasons) and any("no layer" in r for r in reasons)
