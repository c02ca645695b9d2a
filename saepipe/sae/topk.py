"""The TopK sparse autoencoder and its one-file persistence.

Forward pass (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"):

    x_n    = (x - mean) / std                      (only with normalization stats; see saepipe.sae.normalization)
    pre    = ReLU((x_n - b_dec) @ W_enc.T + b_enc)  (d_hidden pre-activations)
    z      = TopK(pre, k)                          (exactly k kept per row, by index: ties never keep more)
    x_hat  = (z @ W_dec + b_dec) * std + mean

Latent codes ``z`` live in normalized units. ``W_dec`` is stored (d_hidden, d_model): row j is the
unit-norm direction of latent j (a "decoder column" in the usual math notation). With
``tied_weights`` the encoder uses ``W_dec`` too (no ``W_enc``).

File format: one safetensors file (any name, e.g. ``my_sae.mlx``) holding the weights and, when
present, the normalization stats; its header ``__metadata__`` has ``format = "saepipe.sae"`` and
``saepipe`` = a JSON document (shapes, k, stats scalars and the free-form ``metadata``). No pickle.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from safetensors import safe_open

from saepipe.activations.stats import NormStats
from saepipe.runtime.files import arrays_sha256, write_safetensors
from saepipe.runtime.version import __version__
from saepipe.sae.compatibility import Reason, site_reasons
from saepipe.sae.dictionary import Dictionary
from saepipe.sae.normalization import InputNormalizer
from saepipe.sae.sparse import TopK, decode_rows, to_dense, topk

FORMAT = "saepipe.sae"
FORMAT_VERSION = 1
_DIGEST_KEY = "tensors_sha256"  # header key: sha256 of the tensors (files saved before it have none)


class TopKSAE(nn.Module, Dictionary):
    """TopK SAE: ``encode``/``decode`` on dense codes, ``encode_topk``/``decode_topk`` on sparse ones.

    All methods accept any leading shape (``(..., d_model)`` activations, ``(..., d_hidden)`` codes).
    """

    def __init__(
        self,
        d_model: int,
        expansion_factor: int = 16,
        k: int = 32,
        *,
        tied_weights: bool = False,
        stats: NormStats | None = None,
        metadata: dict[str, Any] | None = None,
        seed: int = 0,
        normalization: str = "scalar",
    ) -> None:
        super().__init__()
        if d_model < 1 or expansion_factor < 1:
            raise ValueError(f"d_model ({d_model}) and expansion_factor ({expansion_factor}) must be >= 1")
        d_hidden = d_model * expansion_factor
        if not 1 <= k <= d_hidden:
            raise ValueError(f"k must be in 1..d_hidden={d_hidden}, got {k}")
        self.d_model = int(d_model)
        self.expansion_factor = int(expansion_factor)
        self.k = int(k)
        self.tied_weights = bool(tied_weights)
        self._metadata: dict[str, Any] = dict(metadata or {})
        self._norm: InputNormalizer | None = None
        self.normalization = normalization
        self.set_stats(stats)
        params = init_params(d_model, d_hidden, tied_weights, seed)
        for name, value in params.items():
            setattr(self, name, value)

    # --- shape and description -------------------------------------------------------------------
    @property
    def d_hidden(self) -> int:
        return self.d_model * self.expansion_factor

    @property
    def stats(self) -> NormStats | None:
        """The input normalization stats, or None when inputs are used as they are."""
        return None if self._norm is None else self._norm.stats

    def set_stats(self, stats: NormStats | None) -> None:
        """Attach (or remove, with None) input normalization stats."""
        if stats is not None and np.asarray(stats.mean).shape != (self.d_model,):
            raise ValueError(f"stats have d_model {np.asarray(stats.mean).shape}, SAE has {self.d_model}")
        self._norm = None if stats is None else InputNormalizer(stats, self.normalization)

    @property
    def metadata(self) -> dict[str, Any]:
        """Description of the SAE: site, model identity, config, data and summary metrics."""
        base = {
            "d_model": self.d_model,
            "d_hidden": self.d_hidden,
            "expansion_factor": self.expansion_factor,
            "k": self.k,
            "tied_weights": self.tied_weights,
            "normalized": self._norm is not None,
            "stats_digest": None if self._norm is None else self._norm.stats.digest(),
            "saepipe_version": __version__,
        }
        return {**self._metadata, **base}

    def update_metadata(self, **values: Any) -> None:
        """Add or overwrite free-form metadata entries (layer, component, model_hash, ...)."""
        self._metadata.update(values)

    @property
    def W_encoder(self) -> mx.array:
        """Encoder weight (d_hidden, d_model); the decoder weight when tied."""
        return self.W_dec if self.tied_weights else self.W_enc

    # --- forward -----------------------------------------------------------------------------------
    def normalize(self, x: mx.array) -> mx.array:
        return x if self._norm is None else self._norm.normalize(x)

    def denormalize(self, x_n: mx.array) -> mx.array:
        return x_n if self._norm is None else self._norm.denormalize(x_n)

    def pre_activations(self, x: mx.array) -> mx.array:
        """ReLU(encoder(x)) for every latent, before TopK: (..., d_hidden)."""
        x = self._check_input(x)
        x_n = self.normalize(x)
        return nn.relu((x_n - self.b_dec) @ self.W_encoder.T + self.b_enc)

    def encode_topk(self, x: mx.array) -> TopK:
        """Sparse code: (values, indices), each (..., k); exactly k latents per row."""
        return topk(self.pre_activations(x), self.k)

    def decode_topk(self, values: mx.array, indices: mx.array) -> mx.array:
        """Reconstruction (..., d_model) from a sparse code.

        ``indices`` must be integers in 0..d_hidden-1 (checked first: the gather that follows would
        read outside ``W_dec`` otherwise); ``values`` must be finite numbers.
        """
        values, indices = mx.array(values), mx.array(indices)
        if values.shape != indices.shape or values.ndim == 0:
            raise ValueError(f"values {values.shape} and indices {indices.shape} must have the same (..., k) shape")
        check_latent_indices(indices, self.d_hidden)
        if not mx.issubdtype(values.dtype, mx.floating):
            values = values.astype(mx.float32)
        flat = decode_rows(values.reshape(-1, values.shape[-1]), indices.reshape(-1, values.shape[-1]), self.W_dec)
        x_n = flat.reshape(*values.shape[:-1], self.d_model) + self.b_dec
        return self.denormalize(x_n)

    def encode(self, x: mx.array) -> mx.array:
        """Dense code (..., d_hidden): zero except the k kept latents of each row."""
        values, indices = self.encode_topk(x)
        return to_dense(values, indices, self.d_hidden)

    def decode(self, f: mx.array) -> mx.array:
        """Reconstruction (..., d_model) from a dense code."""
        f = mx.array(f)
        if f.shape[-1] != self.d_hidden:
            raise ValueError(f"codes must have last dimension d_hidden={self.d_hidden}, got shape {f.shape}")
        return self.denormalize(f @ self.W_dec + self.b_dec)

    def __call__(self, x: mx.array) -> mx.array:
        return self.decode_topk(*self.encode_topk(x))

    def _check_input(self, x: Any) -> mx.array:
        x = mx.array(x) if not isinstance(x, mx.array) else x
        if x.ndim == 0 or x.shape[-1] != self.d_model:
            raise ValueError(f"activations must have last dimension d_model={self.d_model}, got shape {x.shape}")
        return x.astype(mx.float32) if x.dtype != mx.float32 else x

    # --- compatibility -----------------------------------------------------------------------------
    def compatibility(self, model: Any, layer: int, component: str) -> tuple[bool, list[Reason]]:
        """Whether this SAE reads activations of ``model`` at (layer, component); reasons if not.

        See ``saepipe.sae.compatibility.site_reasons``: each reason is a string that also tells
        whether it is a mismatch or only something this SAE did not record (``unverified``).
        """
        reasons = site_reasons(self._metadata, self.d_model, model, layer, component)
        return not reasons, reasons

    def is_compatible(self, model: Any, layer: int, component: str) -> bool:
        """True when ``compatibility`` finds no reason against using this SAE there."""
        return self.compatibility(model, layer, component)[0]

    # --- persistence -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the SAE as one self-describing safetensors file (any file name)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: np.asarray(value) for name, value in self.parameters().items()}
        header: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "d_model": self.d_model,
            "expansion_factor": self.expansion_factor,
            "k": self.k,
            "tied_weights": self.tied_weights,
            "normalization": self.normalization,
            "stats": None,
            "metadata": _jsonable(self.metadata),
        }
        if self._norm is not None:
            s = self._norm.stats
            tensors["norm_mean"] = np.asarray(s.mean, dtype=np.float64)
            tensors["norm_std"] = np.asarray(s.std, dtype=np.float64)
            header["stats"] = {"mean_norm": float(s.mean_norm), "n_rows": int(s.n_rows)}
        file_meta = {"format": FORMAT, "saepipe": json.dumps(header), _DIGEST_KEY: arrays_sha256(tensors)}
        return write_safetensors(path, tensors, file_meta)

    @classmethod
    def load(cls, path: str | Path) -> TopKSAE:
        """Read a file written by ``save``; a missing, corrupt or foreign file is a clear error."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SAE file not found: {path}")
        try:
            with safe_open(str(path), framework="numpy") as f:
                file_meta = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        except Exception as err:
            raise ValueError(f"{path} is not a readable safetensors file ({err})") from err
        if file_meta.get("format") != FORMAT or "saepipe" not in file_meta:
            raise ValueError(f"{path} is a safetensors file but not a saepipe SAE (no saepipe header)")
        if file_meta.get(_DIGEST_KEY) not in (None, arrays_sha256(tensors)):
            raise ValueError(f"{path}: the weights do not match the checksum in the file's header "
                             "(changed or damaged since it was saved)")
        try:
            header = json.loads(file_meta["saepipe"])
            if header.get("format_version", 0) > FORMAT_VERSION:
                raise ValueError(f"{path} uses SAE format {header['format_version']}; this saepipe reads "
                                 f"<= {FORMAT_VERSION}")
            d_model, factor, k = int(header["d_model"]), int(header["expansion_factor"]), int(header["k"])
            tied, normalization = bool(header["tied_weights"]), str(header.get("normalization", "per_dim"))
            stats_header = header.get("stats")
            meta = dict(header.get("metadata") or {})
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}: corrupt saepipe header ({type(err).__name__}: {err})") from err
        # the shapes the header claims must be those of the weights, before any array is allocated
        w_dec = tensors.get("W_dec")
        if w_dec is None or tuple(w_dec.shape) != (d_model * factor, d_model):
            raise ValueError(f"{path}: W_dec has shape {None if w_dec is None else w_dec.shape}, the header "
                             f"says ({d_model * factor}, {d_model})")
        stats = None
        if stats_header is not None:
            try:
                stats = NormStats(tensors.pop("norm_mean"), tensors.pop("norm_std"),
                                  float(stats_header["mean_norm"]), int(stats_header["n_rows"]))
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}: corrupt normalization stats ({type(err).__name__}: {err})") from err
        sae = cls(d_model, factor, k, tied_weights=tied, stats=stats, metadata=meta, normalization=normalization)
        expected = set(sae.parameters())
        if set(tensors) != expected:
            raise ValueError(f"{path}: tensors {sorted(tensors)} do not match an SAE's {sorted(expected)}")
        weights = {}
        for name, value in tensors.items():
            want = sae.parameters()[name].shape
            if tuple(value.shape) != tuple(want):
                raise ValueError(f"{path}: tensor {name} has shape {value.shape}, expected {tuple(want)}")
            weights[name] = mx.array(value.astype(np.float32))
        sae.update(weights)
        return sae


def check_latent_indices(indices: mx.array, d_hidden: int) -> None:
    """A ValueError unless ``indices`` are integers in 0..d_hidden-1 (TypeError for other dtypes)."""
    if not mx.issubdtype(indices.dtype, mx.integer):
        raise TypeError(f"latent indices must be integers, got dtype {indices.dtype}")
    if indices.size == 0:
        return
    low, high = mx.min(indices).item(), mx.max(indices).item()
    if low < 0 or high >= d_hidden:
        raise ValueError(f"latent indices must be in 0..{d_hidden - 1} (d_hidden={d_hidden}), got values from "
                         f"{low} to {high}")


def load_sae(path: str | Path) -> TopKSAE:
    """Load an SAE file (no training config needed)."""
    return TopKSAE.load(path)


def init_params(d_model: int, d_hidden: int, tied_weights: bool, seed: int) -> dict[str, mx.array]:
    """Initial weights: unit-norm random decoder rows, encoder = decoder transpose, zero biases."""
    w = mx.random.normal((d_hidden, d_model), key=mx.random.key(seed))
    w = w / mx.linalg.norm(w, axis=1, keepdims=True)
    params = {"b_enc": mx.zeros((d_hidden,)), "W_dec": w, "b_dec": mx.zeros((d_model,))}
    if not tied_weights:
        params["W_enc"] = mx.array(w)
    return params


def _jsonable(value: Any) -> Any:
    """Metadata as plain JSON (numpy scalars/arrays, tuples, Paths, non-finite floats made safe)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


__all__ = ["FORMAT", "TopKSAE", "check_latent_indices", "init_params", "load_sae"]
