"""mlxterp-style Python API: ``InterpretableModel`` wraps a model for tracing and SAE training.

    from saepipe import InterpretableModel, SAEConfig
    model = InterpretableModel("default")
    sae = model.train_sae(layer=10, dataset=texts, save_path="my_sae.mlx", config=SAEConfig(k=32))
    with model.trace("Test input") as trace:
        pass
    features = sae.encode(trace.activations["model.model.layers.10.mlp"])
    with model.trace("Generate text about...") as trace:          # steering (runs at the block's exit)
        sae.steer(model=model, layer=10, feature_idx=1234, strength=2.0)
        output = model.output.save()                               # output.value: the steered logits
    model.generate("Once upon a time", max_tokens=40, steer=[Steer(sae, 1234, 8.0)])

``train_sae`` runs the library code of the DVC stages: the texts are written as a prepared
``texts.parquet`` (all in the train split; the SAE holds out ``validation_split`` of the rows),
``activations.extract.extract_split`` stores the site's activations as shards in a cache folder,
``activations.normalize.fit_stats`` fits the normalization statistics and ``training.fit.fit_sae``
trains.
The prepared texts and their token-row count are cached per dataset (by content), so training
several layers or configs on one dataset prepares it once; the shards of the last site trained are
kept, so retraining that site with another config skips the forward passes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import tempfile
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow.parquet as pq

from saepipe.activations.config import ExtractConfig
from saepipe.activations.extract import extract_split
from saepipe.activations.normalize import fit_stats
from saepipe.analysis.steering import Steer
from saepipe.analysis.steering import generate as generate_steered
from saepipe.explore import ExplorableSAE
from saepipe.lm.generate import Generation
from saepipe.lm.model import LoadedModel, ModelInfo, load_model
from saepipe.lm.sites import COMPONENTS, Site, check_site
from saepipe.lm.tokens import excluded_token_ids
from saepipe.lm.trace import Trace, TraceOutput, current_trace, trace
from saepipe.runtime.files import atomic_write
from saepipe.sae.compatibility import IncompatibleSAEError, check_compatible
from saepipe.sae.config import SAEConfig
from saepipe.texts.datasets import dataset_texts
from saepipe.texts.prepare import prepared_table, read_split
from saepipe.training.fit import fit_sae

log = logging.getLogger(__name__)


class FitRecord(NamedTuple):
    """What the last ``train_sae`` produced besides the SAE."""

    site: Site
    history: list[dict[str, float]]
    """Per-epoch training means and validation metrics (see ``saepipe.training.fit.FitResult``)."""
    summary: dict[str, Any]
    """Final figures: steps, tokens, seconds, last train/* and val/* metrics."""
    activations: Path
    """Shard folder the SAE was trained on (inside the model's cache folder)."""
    save_path: Path | None


class _Prepared(NamedTuple):
    texts_path: Path
    digest: str
    n_texts: int


def texts_digest(texts: list[str]) -> str:
    """Content hash of a list of texts (order matters): the dataset's identity in the caches."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def count_rows(tokenizer: Any, texts: list[str], context_length: int, skip_special_tokens: bool) -> int:
    """Activation rows extraction stores for ``texts``: kept token positions (same rules as extract)."""
    excluded = excluded_token_ids(tokenizer, skip_special_tokens)
    total = 0
    for start in range(0, len(texts), 4096):  # batched tokenization (same ids as tokenizer.encode)
        for ids in tokenizer(texts[start : start + 4096])["input_ids"]:
            total += int((~np.isin(ids[:context_length], excluded)).sum())
    return total


class InterpretableModel:
    """A language model with mlxterp's interpretability API: ``trace``, ``train_sae``, ``load_sae``.

    ``model``: ``"default"`` (SmolLM2-135M-Instruct), a Hugging Face hub id, a local mlx-lm folder,
    a ``.gguf`` file, or an already loaded ``LoadedModel`` (e.g. ``tiny_random_model()``).
    ``cache_dir``: where prepared texts and activation shards go; None uses a temporary folder
    removed with this object (a given folder is kept, and its shards are reused across sessions).
    """

    def __init__(self, model: str | LoadedModel = "default", *, cache_dir: str | Path | None = None,
                 keep_quantized: bool | None = None) -> None:
        if isinstance(model, LoadedModel):
            self.loaded = model
        elif isinstance(model, (str, Path)):
            self.loaded = load_model(str(model), keep_quantized=keep_quantized)
        else:
            raise TypeError(f"model must be a model name/path or a LoadedModel, not {type(model).__name__}")
        if cache_dir is None:
            self._cache = Path(tempfile.mkdtemp(prefix="saepipe-"))
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._cache), True)
            self._keep_activations = False
        else:
            self._cache = Path(cache_dir)
            self._cache.mkdir(parents=True, exist_ok=True)
            self._keep_activations = True
        self._prepared: dict[str, _Prepared] = {}
        self._rows: dict[tuple[str, int, bool], int] = {}
        self._shard_dirs: list[Path] = []
        self.last_fit: FitRecord | None = None
        """Details of the last ``train_sae`` (history, summary, activation folder)."""

    # --- description ------------------------------------------------------------------------------
    @property
    def info(self) -> ModelInfo:
        """Model identity and shape: model_id, model_hash, num_layers, d_model, vocab_size."""
        return self.loaded.info

    @property
    def model(self) -> Any:
        """The mlx-lm ``nn.Module`` (blocks at ``model.model.layers``)."""
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def num_layers(self) -> int:
        return self.info.num_layers

    @property
    def d_model(self) -> int:
        return self.info.d_model

    @property
    def cache_dir(self) -> Path:
        return self._cache

    def __repr__(self) -> str:
        return f"InterpretableModel({self.info.model_id!r}, layers={self.num_layers}, d_model={self.d_model})"

    # --- tracing ----------------------------------------------------------------------------------
    def trace(self, texts: str | list[str], *, capture: Iterable[str] | None = None) -> Trace:
        """Run ``texts`` through the model once; ``.activations[name]`` is (batch, seq, d_model).

        Names like ``model.model.layers.10.mlp`` (see ``saepipe.lm.sites``); every site is captured
        unless ``capture`` lists some. Use as ``with model.trace(...) as trace: ...``.
        """
        return trace(self.loaded, texts, capture=capture)

    @property
    def output(self) -> TraceOutput:
        """Inside ``with model.trace(...)``: the logits the trace will compute; ``model.output.save()``
        returns a ``Saved`` whose ``.value`` (batch, seq, vocab) is filled when the block exits."""
        current = current_trace(self.loaded)
        if current is None:
            raise RuntimeError("model.output is only available inside `with model.trace(...)`: "
                               "`output = model.output.save()` there, then read `output.value` after the block")
        return current.output

    def generate(self, prompt: str, max_tokens: int = 40, *, steer: Steer | Iterable[Steer] = (),
                 temperature: float = 0.0, seed: int = 0, cache: bool | None = None,
                 stop_at_eos: bool = True) -> Generation:
        """Continue ``prompt`` with up to ``max_tokens`` tokens, under the steering interventions ``steer``
        (``Steer(sae, feature_idx, strength, positions=None)``, or ``sae.steering(...)``; each is checked
        against this model first). ``temperature`` 0 is greedy (deterministic); above 0 samples with
        ``seed``. ``cache``: None uses a KV cache when the model supports one. Returns a ``Generation``
        (``.text``, ``.tokens``, ``str()`` is the text)."""
        steers = [steer] if isinstance(steer, Steer) else list(steer)
        return generate_steered(self.loaded, prompt, steers, max_tokens=max_tokens, temperature=temperature,
                                seed=seed, cache=cache, stop_at_eos=stop_at_eos)

    # --- SAEs -------------------------------------------------------------------------------------
    def train_sae(
        self,
        layer: int,
        dataset: Any,
        save_path: str | Path | None = None,
        config: SAEConfig | None = None,
        component: str = "mlp",
        *,
        text_column: str = "text",
        context_length: int = 128,
        max_tokens: int | None = None,
        extract_batch_size: int = 8,
        progress: bool = True,
        checkpoint_dir: str | Path | None = None,
        live_dir: str | Path | None = None,
    ) -> ExplorableSAE:
        """Train a TopK SAE on the ``component`` output of block ``layer`` over ``dataset``'s texts.

        ``dataset``: list of strings or a ``datasets.Dataset`` (column ``text_column``).
        ``config``: ``SAEConfig`` (defaults when None). ``save_path``: write the SAE there.
        ``context_length``: tokens per text (BOS included); ``max_tokens``: cap on activation rows
        (None: every non-special token of every text). ``extract_batch_size``: texts per forward.
        ``checkpoint_dir``/``live_dir``: resumable checkpoints / dvclive metrics, as in the train stage.
        Returns the trained SAE (an ``ExplorableSAE``: a ``TopKSAE`` bound to this model, with the
        feature-analysis methods); ``self.last_fit`` holds its history and summary.
        """
        site = self._site(layer, component)
        config = SAEConfig() if config is None else config
        if not isinstance(config, SAEConfig):
            raise TypeError(f"config must be an SAEConfig, not {type(config).__name__}")
        d_hidden = self.d_model * config.expansion_factor
        if config.k > d_hidden:
            raise ValueError(f"SAEConfig.k={config.k} exceeds d_hidden={d_hidden} "
                             f"(d_model {self.d_model} x expansion_factor {config.expansion_factor})")
        prepared = self._prepare(dataset_texts(dataset, text_column))
        ecfg = ExtractConfig(context_length=context_length, batch_size=extract_batch_size)
        rows = self._row_count(prepared, ecfg)
        if rows == 0:
            raise ValueError(f"the {prepared.n_texts} texts give no token rows (only special tokens)")
        if max_tokens is not None:
            if max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
            rows = min(rows, max_tokens)
        ecfg = dataclasses.replace(ecfg, max_tokens=rows)
        shard_dir = self._shard_dir(prepared, ecfg, site)
        log.info("train_sae %s: %d texts -> %d activation rows in %s", site.name, prepared.n_texts, rows, shard_dir)
        manifest = extract_split(self.loaded, prepared.texts_path, shard_dir, ecfg, "train", site=site,
                                 progress=progress)
        stats = fit_stats(shard_dir) if config.normalize_input else None
        metadata = {
            "layer": site.layer, "component": site.component, "site": site.name,
            "model_name": self.info.model_id, "model_hash": self.info.model_hash,
            "activations_digest": manifest["digest"], "activations_rows": manifest["n_tokens"],
            "texts_digest": prepared.digest, "n_texts": prepared.n_texts, "context_length": context_length,
        }
        result = fit_sae(shard_dir, config, stats=stats, metadata=metadata, checkpoint_dir=checkpoint_dir,
                         live_dir=live_dir, progress=progress)
        path = result.sae.save(save_path) if save_path is not None else None
        if path is not None:
            log.info("saved SAE to %s", path)
        self.last_fit = FitRecord(site, result.history, result.summary, shard_dir, path)
        return ExplorableSAE.from_sae(result.sae, self)

    def load_sae(self, path: str | Path, *, layer: int | None = None, component: str | None = None,
                 check: bool = True) -> ExplorableSAE:
        """Load an SAE file; with ``check`` raise ``IncompatibleSAEError`` if it was trained on another
        model (d_model, weights hash) or, when given, another ``layer``/``component``."""
        sae = ExplorableSAE.load(path).bind(self)
        if check:
            self.check_sae(sae, layer, component)
        return sae

    def check_sae(self, sae: Any, layer: int | None = None, component: str | None = None) -> Site | None:
        """Raise ``IncompatibleSAEError`` (listing why) unless ``sae`` reads this model at the site.

        Without ``layer``/``component`` the SAE's recorded site is used (only the model is checked).
        Returns the site checked, or None when neither was given nor recorded.
        """
        return check_compatible(sae, self, layer, component)

    def encode(self, sae: Any, texts: str | list[str], layer: int | None = None,
               component: str | None = None) -> Any:
        """Trace ``texts`` at the SAE's site (checked for compatibility) and return its dense codes
        (batch, seq, d_hidden); ``layer``/``component`` default to the SAE's recorded site."""
        site = self.check_sae(sae, layer, component)
        if site is None:
            raise IncompatibleSAEError("the SAE records no layer/component: pass layer= and component=")
        with self.trace(texts, capture=[site.name]) as t:
            pass
        return sae.encode(t.activations[site.name])

    # --- internals --------------------------------------------------------------------------------
    def _site(self, layer: Any, component: Any) -> Site:
        if component not in COMPONENTS:
            raise ValueError(f"unknown component {component!r}; valid components: {', '.join(COMPONENTS)}")
        return check_site(layer, component, self.num_layers)

    def _prepare(self, texts: list[str]) -> _Prepared:
        """Write the texts as a prepared ``texts.parquet`` (all train), once per dataset content."""
        digest = texts_digest(texts)
        if digest in self._prepared and self._prepared[digest].texts_path.exists():
            return self._prepared[digest]
        folder = self._cache / "texts" / digest
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "texts.parquet"
        if not path.exists():
            table = prepared_table(texts, ["api"] * len(texts), ["train"] * len(texts))
            atomic_write(path, lambda tmp: pq.write_table(table, tmp))
        self._prepared[digest] = _Prepared(path, digest, len(texts))
        return self._prepared[digest]

    def _row_count(self, prepared: _Prepared, ecfg: ExtractConfig) -> int:
        key = (prepared.digest, ecfg.context_length, ecfg.skip_special_tokens)
        if key not in self._rows:
            texts = read_split(prepared.texts_path, "train")[1]
            self._rows[key] = count_rows(self.tokenizer, texts, ecfg.context_length, ecfg.skip_special_tokens)
        return self._rows[key]

    def _shard_dir(self, prepared: _Prepared, ecfg: ExtractConfig, site: Site) -> Path:
        """The shard folder of (dataset, site, settings); older temporary ones are removed."""
        tag = hashlib.sha256(repr((self.info.model_hash, dataclasses.astuple(ecfg))).encode()).hexdigest()[:8]
        folder = self._cache / "activations" / f"{prepared.digest}-L{site.layer}-{site.component}-{tag}"
        if not self._keep_activations:
            for old in self._shard_dirs:
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)
            self._shard_dirs = [folder]
        return folder


def load_sae(path: str | Path) -> ExplorableSAE:
    """Load an SAE file written by ``TopKSAE.save`` / ``train_sae(save_path=...)`` (an ``ExplorableSAE``:
    a ``TopKSAE`` with the feature-analysis methods; pass ``model=`` to them)."""
    return ExplorableSAE.load(path)


__all__ = ["FitRecord", "Generation", "IncompatibleSAEError", "InterpretableModel", "Steer", "count_rows",
           "dataset_texts", "load_sae", "texts_digest"]
