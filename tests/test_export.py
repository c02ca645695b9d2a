"""Export to SAELens: the layout and config keys of its format, the folded normalization (numpy
encoding of the export reproduces saepipe's features), hook names, the CLI, and, where an
interpreter with ``sae-lens`` is at hand, SAELens itself loading the export."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from saepipe.activations.stats import NormStats
from saepipe.cli import main as cli
from saepipe.sae.export import (
    CONFIG_FILE,
    HF_MODEL_NAMES,
    WEIGHTS_FILE,
    encode_numpy,
    export_saelens,
    folded_weights,
    saelens_hook_name,
)
from saepipe.sae.topk import TopKSAE

PEER_SCRIPT = Path(__file__).with_name("saelens_load.py")

SAELENS_TOPK_FIELDS = {"architecture", "d_in", "d_sae", "k", "rescale_acts_by_decoder_norm", "dtype", "device",
                       "apply_b_dec_to_input", "normalize_activations", "reshape_activations", "metadata"}
"""``TopKSAEConfig(...).to_dict()`` keys of SAELens 6 (``sae_lens/saes/topk_sae.py`` and ``sae.py``)."""

SAELENS_METADATA = {"model_name", "hook_name", "hook_head_index", "prepend_bos", "context_size", "dataset_path",
                    "sae_lens_version", "sae_lens_training_version", "neuronpedia_id", "exclude_special_tokens",
                    "hf_hook_name"}
"""Metadata keys SAELens reads (``LLM_METADATA_KEYS`` in ``sae_lens/loading/pretrained_sae_loaders.py``)."""


def _sae(normalization: str | None, tied: bool = False, d: int = 24, seed: int = 0) -> TopKSAE:
    """A trained-looking SAE: random weights and biases, stats with a large offset and uneven scales."""
    rng = np.random.default_rng(seed)
    stats = None
    if normalization is not None:
        stats = NormStats(rng.normal(size=d) * 5, rng.uniform(0.2, 4.0, size=d), 10.0, 1000)
    sae = TopKSAE(d, 4, 5, tied_weights=tied, stats=stats, normalization=normalization or "scalar", seed=seed,
                  metadata={"layer": 6, "component": "mlp", "model_name": "SmolLM2-135M-Instruct.Q4_1.gguf",
                            "context_length": 128, "skip_special_tokens": True})
    params = {name: mx.array(rng.normal(size=p.shape).astype(np.float32) * (0.3 if name.startswith("b") else 1.0))
              for name, p in sae.parameters().items()}
    sae.update(params)
    return sae


def _acts(sae: TopKSAE, n: int = 300, seed: int = 1) -> np.ndarray:
    """Activations in the SAE's raw units (around its stats)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, sae.d_model))
    if sae.stats is not None:
        x = x * np.asarray(sae.stats.std) + np.asarray(sae.stats.mean)
    return x.astype(np.float32)


def _separated(pre_sorted: np.ndarray, k: int, margin: float = 1e-3) -> np.ndarray:
    """Rows whose k-th and (k+1)-th largest values differ by ``margin``: their top-k set is not
    decided by float rounding."""
    return (pre_sorted[:, -k] - pre_sorted[:, -k - 1]) > margin


@pytest.mark.parametrize(("normalization", "tied"), [("scalar", False), ("per_dim", False), (None, False),
                                                     ("per_dim", True)])
def test_export_reproduces_saepipe_features_in_numpy(tmp_path, normalization, tied):
    """Raw activations through the exported weights (SAELens's formula, numpy): saepipe's features
    (values and indices) and reconstruction."""
    sae = _sae(normalization, tied)
    out = export_saelens(sae, tmp_path / "export")
    weights = load_file(str(out / WEIGHTS_FILE))
    x = _acts(sae)
    ours = np.asarray(sae.encode(mx.array(x)))
    theirs = encode_numpy(weights, x, sae.k)
    pre = np.sort(np.asarray(sae.pre_activations(mx.array(x))), axis=-1)
    rows = _separated(pre, sae.k)
    assert rows.mean() > 0.9
    assert np.array_equal(ours[rows] > 0, theirs[rows] > 0)  # the same active latents
    np.testing.assert_allclose(theirs[rows], ours[rows], rtol=1e-4, atol=1e-4 * np.abs(ours).max())
    recon = theirs @ weights["W_dec"] + weights["b_dec"]
    want = np.asarray(sae(mx.array(x)))
    np.testing.assert_allclose(recon[rows], want[rows], rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_export_layout_and_config_keys(tmp_path):
    """The files, tensor names, shapes and dtypes, and cfg.json keys of SAELens's TopK format."""
    sae = _sae("scalar")
    out = export_saelens(sae, tmp_path / "export", dataset_path="saepipe-builtin")
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    weights = load_file(str(out / WEIGHTS_FILE))
    d, h = sae.d_model, sae.d_hidden
    assert {n: w.shape for n, w in weights.items()} == {"W_enc": (d, h), "b_enc": (h,), "W_dec": (h, d), "b_dec": (d,)}
    assert all(w.dtype == np.float32 for w in weights.values())
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert set(cfg) == SAELENS_TOPK_FIELDS
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["k"]) == ("topk", d, h, sae.k)
    assert (cfg["apply_b_dec_to_input"], cfg["normalize_activations"], cfg["dtype"]) == (True, "none", "float32")
    meta = cfg["metadata"]
    assert set(meta) >= SAELENS_METADATA
    assert meta["hook_name"] == "blocks.6.hook_mlp_out" and meta["hf_hook_name"] == "model.layers.6.mlp"
    assert meta["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (meta["context_size"], meta["exclude_special_tokens"], meta["dataset_path"]) == (128, True, "saepipe-builtin")
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6  # SAELens reads older configs in another layout
    assert meta["saepipe"]["normalization_folded"] is True


def test_folding_formula():
    """W_enc' = (W_enc / s).T, W_dec' = W_dec * s, b_dec' = mean + s * b_dec, b_enc' = b_enc."""
    sae = _sae("per_dim")
    w = folded_weights(sae)
    s = np.asarray(sae.stats.std)
    mean = np.asarray(sae.stats.mean)
    np.testing.assert_allclose(w["W_enc"], (np.asarray(sae.W_enc) / s).T, rtol=1e-6)
    np.testing.assert_allclose(w["W_dec"], np.asarray(sae.W_dec) * s, rtol=1e-6)
    np.testing.assert_allclose(w["b_dec"], mean + s * np.asarray(sae.b_dec), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(w["b_enc"], np.asarray(sae.b_enc))
    plain = _sae(None)
    np.testing.assert_array_equal(folded_weights(plain)["W_enc"], np.asarray(plain.W_enc).T)


def test_hook_names():
    assert saelens_hook_name(6, "mlp") == "blocks.6.hook_mlp_out"
    assert saelens_hook_name(0, "attn") == "blocks.0.hook_attn_out"
    assert saelens_hook_name(29, "output") == "blocks.29.hook_resid_post"
    with pytest.raises(ValueError, match="component"):
        saelens_hook_name(1, "resid")


def test_default_model_name_is_the_shipped_gguf():
    from saepipe.lm.model import DEFAULT_GGUF  # lazy: loads mlx-lm

    assert DEFAULT_GGUF in HF_MODEL_NAMES


def test_cli_export(tmp_path):
    sae_path = _sae("scalar").save(tmp_path / "sae.safetensors")
    result = CliRunner().invoke(cli, ["export", "--format", "saelens", "--sae", str(sae_path),
                                      "--out", str(tmp_path / "out"), "--dataset-path", "wikitext"])
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "out" / CONFIG_FILE).read_text())
    assert cfg["metadata"]["dataset_path"] == "wikitext" and "blocks.6.hook_mlp_out" in result.output
    missing = CliRunner().invoke(cli, ["export", "--format", "saelens", "--sae", str(tmp_path / "nope"),
                                       "--out", str(tmp_path / "o2")])
    assert missing.exit_code != 0 and "not found" in missing.output


NORMALIZATIONS = ["scalar", "per_dim"]


def _peer_python() -> str | None:
    """An interpreter that may have sae-lens: $SAEPIPE_PEER_PYTHON, else the throwaway peer venvs of
    benchmarks/train.py's recipe (never the project's environment)."""
    candidates = [os.environ.get("SAEPIPE_PEER_PYTHON"), "/tmp/benchvenv/bin/python", "/work/peers/venv/bin/python"]
    return next((python for python in filter(None, candidates) if Path(python).exists()), None)


@pytest.fixture(scope="module")
def saelens_runs(tmp_path_factory) -> dict:
    """Per normalization: (sae, activations, SAELens's outputs) from one run of the peer interpreter."""
    python = _peer_python()
    if python is None:
        pytest.skip("no interpreter with sae-lens (set SAEPIPE_PEER_PYTHON; recipe in benchmarks/train.py)")
    tmp = tmp_path_factory.mktemp("saelens")
    cases, args = {}, []
    for normalization in NORMALIZATIONS:
        sae = _sae(normalization)
        x = _acts(sae)
        np.save(tmp / f"{normalization}.npy", x)
        export_saelens(sae, tmp / normalization)
        args += [str(tmp / normalization), str(tmp / f"{normalization}.npy"), str(tmp / f"{normalization}.npz")]
        cases[normalization] = (sae, x, tmp / f"{normalization}.npz")
    done = subprocess.run([python, str(PEER_SCRIPT), *args], capture_output=True, text=True, timeout=600)
    if done.returncode == 3:
        pytest.skip(f"{python}: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: (sae, x, np.load(path)) for name, (sae, x, path) in cases.items()}


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_saelens_loads_the_export_and_gets_our_features(saelens_runs, normalization):
    """SAELens itself (``SAE.load_from_disk``) on the export: a TopKSAE at the mapped hook whose
    features and reconstruction are saepipe's."""
    sae, x, got = saelens_runs[normalization]
    info = json.loads(str(got["info"]))
    assert info == {"class": "TopKSAE", "architecture": "topk", "hook_name": "blocks.6.hook_mlp_out",
                    "k": sae.k, "d_in": sae.d_model, "d_sae": sae.d_hidden}
    ours = np.asarray(sae.encode(mx.array(x)))
    rows = _separated(np.sort(np.asarray(sae.pre_activations(mx.array(x))), axis=-1), sae.k)
    assert np.array_equal(ours[rows] > 0, got["features"][rows] > 0)
    np.testing.assert_allclose(got["features"][rows], ours[rows], rtol=1e-4, atol=1e-4 * np.abs(ours).max())
    want = np.asarray(sae(mx.array(x)))
    np.testing.assert_allclose(got["reconstruction"][rows], want[rows], rtol=1e-4, atol=1e-4 * np.abs(want).max())
