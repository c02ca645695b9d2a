"""Export a saepipe TopK SAE to SAELens's on-disk format (``cfg.json`` + ``sae_weights.safetensors``).

SAELens (v6, ``sae_lens.saes.topk_sae.TopKSAE``, architecture ``"topk"``) computes, on raw
activations x (``apply_b_dec_to_input = true``, ``normalize_activations = "none"``):

    pre   = (x - b_dec') @ W_enc' + b_enc'        W_enc' (d_in, d_sae)
    z     = ReLU(TopK(pre, k))
    x_hat = z @ W_dec' + b_dec'                   W_dec' (d_sae, d_in)

saepipe (``saepipe.sae.topk``) normalizes first, ``x_n = (x - mean) / s`` (``s`` the per-dimension
std, or one scalar for every dimension, see ``saepipe.sae.normalization``), and computes
``z = TopK(ReLU((x_n - b_dec) @ W_enc.T + b_enc))``, ``x_hat = (z @ W_dec + b_dec) * s + mean``.
Folding the normalization into the weights makes both compute the same ``z`` and ``x_hat``:

    (x_n - b_dec) = (x - (mean + s * b_dec)) / s     so  b_dec' = mean + s * b_dec,
                                                         W_enc' = (W_enc / s).T   (row i of W_enc' / s_i),
                                                         b_enc' = b_enc;
    x_hat = z @ (W_dec * s) + (b_dec * s + mean)      so  W_dec' = W_dec * s (each row times s),
                                                         and the same b_dec'.

(Without stats: mean = 0, s = 1.) The codes ``z`` stay in saepipe's units, so SAELens's features
are saepipe's, value for value. ReLU before or after the top-k gives the same non-zero features
(a row with fewer than k positive pre-activations fills its top-k with zeros either way). The
folded decoder rows are not unit-norm (they are ``s``-scaled); ``rescale_acts_by_decoder_norm`` is
false, so SAELens uses them as they are.

Hook names (TransformerLens, on a Llama-style model): saepipe's ``mlp`` site of layer L (the MLP's
output) is ``blocks.L.hook_mlp_out``, ``attn`` (the attention block's output, after o_proj) is
``blocks.L.hook_attn_out``, ``output`` (the residual after block L) is ``blocks.L.hook_resid_post``;
``hf_hook_name`` names the same module in the Hugging Face model (``model.layers.L.mlp``, ...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from saepipe.runtime.files import atomic_write, atomic_write_text
from saepipe.runtime.version import __version__
from saepipe.sae.normalization import InputNormalizer
from saepipe.sae.topk import TopKSAE

WEIGHTS_FILE = "sae_weights.safetensors"
"""SAELens's weights file name (``sae_lens.constants.SAE_WEIGHTS_FILENAME``)."""

CONFIG_FILE = "cfg.json"
"""SAELens's config file name (``sae_lens.constants.SAE_CFG_FILENAME``)."""

SAELENS_FORMAT_VERSION = "6.0.0"
"""The SAELens version whose format we write: loaders treat configs without a version >= 6 as the
old (pre-6) layout, whose keys are read differently."""

HOOKS = {"mlp": "hook_mlp_out", "attn": "hook_attn_out", "output": "hook_resid_post"}
"""saepipe component -> TransformerLens hook of ``blocks.L``."""

HF_MODULES = {"mlp": "model.layers.{layer}.mlp", "attn": "model.layers.{layer}.self_attn",
              "output": "model.layers.{layer}"}
"""saepipe component -> the Hugging Face (Llama) module whose output it is."""

HF_MODEL_NAMES = {"SmolLM2-135M-Instruct.Q4_1.gguf": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""saepipe model ids with a known Hugging Face name (the default model is its Q4_1 GGUF,
dequantized: close to, not the same as, the float model)."""


def saelens_hook_name(layer: int, component: str) -> str:
    """The TransformerLens hook name of a saepipe site, e.g. ``blocks.6.hook_mlp_out``."""
    if component not in HOOKS:
        raise ValueError(f"no SAELens hook for component {component!r}; valid: {', '.join(HOOKS)}")
    return f"blocks.{int(layer)}.{HOOKS[component]}"


def folded_weights(sae: TopKSAE) -> dict[str, np.ndarray]:
    """SAELens's ``W_enc`` (d_in, d_sae), ``b_enc``, ``W_dec`` (d_sae, d_in), ``b_dec`` with the
    SAE's input normalization folded in (module docstring); computed in float64, stored float32."""
    W_enc = np.asarray(sae.W_encoder, dtype=np.float64)
    W_dec = np.asarray(sae.W_dec, dtype=np.float64)
    b_enc = np.asarray(sae.b_enc, dtype=np.float64)
    b_dec = np.asarray(sae.b_dec, dtype=np.float64)
    mean, s = np.zeros(sae.d_model), np.ones(sae.d_model)
    if sae.stats is not None:
        norm = InputNormalizer(sae.stats, sae.normalization)
        mean, s = np.asarray(norm.mean, dtype=np.float64), np.asarray(norm.std, dtype=np.float64)
    weights = {"W_enc": (W_enc / s).T, "b_enc": b_enc, "W_dec": W_dec * s, "b_dec": mean + s * b_dec}
    return {name: np.ascontiguousarray(w, dtype=np.float32) for name, w in weights.items()}


def saelens_config(sae: TopKSAE, **overrides: Any) -> dict[str, Any]:
    """SAELens's ``cfg.json`` for ``sae`` (a ``TopKSAEConfig.to_dict()``). The metadata comes from
    what the SAE recorded (site, model, context length, ...); ``overrides`` replace metadata
    entries (e.g. ``model_name``, ``dataset_path``, ``prepend_bos``, ``hook_name``)."""
    meta = sae.metadata
    layer, component = meta.get("layer"), meta.get("component")
    if layer is None or component is None:
        if "hook_name" not in overrides:
            raise ValueError("the SAE does not record its layer and component: pass hook_name=")
        hook = hf_hook = None
    else:
        hook, hf_hook = saelens_hook_name(layer, component), HF_MODULES[component].format(layer=int(layer))
    model = meta.get("model_name")
    skip = meta.get("skip_special_tokens")
    metadata = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "model_name": HF_MODEL_NAMES.get(model, model),
        "hook_name": hook,
        "hook_head_index": None,
        "hf_hook_name": hf_hook,
        "prepend_bos": None,  # saepipe tokenizes as the model's tokenizer says (BOS or not)
        "context_size": meta.get("context_length"),
        "exclude_special_tokens": skip,
        "dataset_path": None,
        "neuronpedia_id": None,
        "saepipe": {"version": __version__, "model_id": model, "model_hash": meta.get("model_hash"),
                    "site": meta.get("site"), "layer": layer, "component": component,
                    "stats_digest": meta.get("stats_digest"), "normalization": sae.normalization,
                    "normalization_folded": sae.stats is not None,
                    "activations_digest": meta.get("activations_digest")},
    }
    metadata.update(overrides)
    return {
        "architecture": "topk",
        "d_in": sae.d_model,
        "d_sae": sae.d_hidden,
        "k": sae.k,
        "rescale_acts_by_decoder_norm": False,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }


def export_saelens(sae: TopKSAE, out_dir: str | Path, **overrides: Any) -> Path:
    """Write ``sae`` to ``out_dir`` in SAELens's format (``cfg.json``, ``sae_weights.safetensors``);
    ``SAE.load_from_disk(out_dir)`` in SAELens reads it. ``overrides``: see ``saelens_config``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = saelens_config(sae, **overrides)
    weights = folded_weights(sae)
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(weights, str(tmp)))
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return out


def encode_numpy(weights: dict[str, np.ndarray], x: np.ndarray, k: int) -> np.ndarray:
    """SAELens's TopK encode written in numpy (dense features (n, d_sae)): what an exported SAE
    computes, for checking an export without torch."""
    pre = (np.asarray(x, np.float32) - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    idx = np.argpartition(-pre, k - 1, axis=-1)[..., :k]
    out = np.zeros_like(pre)
    np.put_along_axis(out, idx, np.maximum(np.take_along_axis(pre, idx, axis=-1), 0), axis=-1)
    return out


__all__ = ["CONFIG_FILE", "HF_MODEL_NAMES", "HF_MODULES", "HOOKS", "SAELENS_FORMAT_VERSION", "WEIGHTS_FILE",
           "encode_numpy", "export_saelens", "folded_weights", "saelens_config", "saelens_hook_name"]
