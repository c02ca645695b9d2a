"""The seed's Phase-2 API: look at what an SAE's features mean, from a notebook.

    sae = model.load_sae("my_sae.mlx")     # or model.train_sae(...): an ExplorableSAE bound to model
    top_features = sae.analyze_text(model, prompt="Artificial intelligence is transforming society", top_k=10)
    activating_texts = sae.get_top_activating_texts(feature_idx=1234, dataset=texts, top_k=20)
    sae.visualize_feature(feature_idx=1234, model=model, dataset=texts)   # renders in a notebook
    dashboard = sae.launch_dashboard(model=model, dataset=texts)          # dashboard.url, dashboard.stop()
    with model.trace("Generate text about...") as trace:                 # steering (saepipe.analysis.steering)
        sae.steer(model=model, layer=10, feature_idx=1234, strength=2.0)
        output = model.output.save()

Each method runs the model on the texts (``rows_from_texts``: the same rows extract would store) and
the analyze stage's own code on them (``saepipe.analysis.run.analyze_rows``), so a feature shows the
same statistics, contexts and logit effects here as on the dashboard of a pipeline run. The rows of
the last dataset are kept, so calling several methods on one dataset runs the model once.
``sae.steer`` registers a steering edit on the model's open trace, and ``sae.steering`` makes a
``Steer`` for ``model.generate(..., steer=[...])``.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from saepipe.analysis.codes import Encoder
from saepipe.analysis.config import AnalysisConfig
from saepipe.analysis.rows import ArrayRows, rows_from_texts
from saepipe.analysis.run import analyze, analyze_rows
from saepipe.analysis.steering import Steer, steer_trace
from saepipe.analysis.tokens import TokenStrings
from saepipe.analysis.writer import AnalysisTables
from saepipe.dashboard.data import Analysis, load_feature_record
from saepipe.dashboard.render import FeatureView
from saepipe.dashboard.serve import DashboardServer
from saepipe.dashboard.site import build_site
from saepipe.lm.sites import Site
from saepipe.lm.tokens import excluded_token_ids
from saepipe.lm.trace import current_trace
from saepipe.sae.topk import TopKSAE
from saepipe.texts.datasets import dataset_texts


class FeatureScore(NamedTuple):
    feature: int
    activation: float

    def __repr__(self) -> str:
        return f"#{self.feature} ({self.activation:.3g})"


class TokenScores(NamedTuple):
    """The strongest features on one token of a text."""

    position: int
    """Index of the token in the tokenized text (BOS included)."""
    token: str
    features: list[FeatureScore]


class TextAnalysis:
    """``analyze_text``'s result: the text's top features (iterating gives them, strongest first)
    and, per token, that token's top features."""

    def __init__(self, text: str, top: list[FeatureScore], per_token: list[TokenScores]) -> None:
        self.text = text
        self.top = top
        """The features with the largest activation on any token of the text, strongest first."""
        self.per_token = per_token
        """Per token (special tokens such as BOS left out), its features, strongest first."""

    @property
    def features(self) -> list[int]:
        return [f.feature for f in self.top]

    @property
    def tokens(self) -> list[str]:
        return [t.token for t in self.per_token]

    def __iter__(self):
        return iter(self.top)

    def __len__(self) -> int:
        return len(self.top)

    def __getitem__(self, i: int) -> FeatureScore:
        return self.top[i]

    def __repr__(self) -> str:
        width = min(16, max((len(repr(t.token)) for t in self.per_token), default=0))
        lines = [f"TextAnalysis({self.text!r})", "  top: " + ", ".join(map(repr, self.top)), "  per token:"]
        for t in self.per_token:
            lines.append(f"    {t.token!r:<{width}}  " + ", ".join(map(repr, t.features)))
        return "\n".join(lines)


class Context(NamedTuple):
    """A window of a text around a token where a feature fires."""

    text_index: int
    """Index of the text in the dataset."""
    activation: float
    """The feature's activation on the window's center token."""
    tokens: list[str]
    acts: list[float]
    """The feature's activation on every token of the window (0 where it does not fire)."""
    center: int
    """Index of the center token in ``tokens``."""
    text: str
    """The whole text."""

    def __str__(self) -> str:
        return "".join(f"\u27e6{t}\u27e7" if i == self.center else t for i, t in enumerate(self.tokens))


class TopTexts(list):
    """``get_top_activating_texts``'s result: a list of ``Context``, strongest first (one per text)."""

    def __init__(self, feature: int, contexts: list[Context]) -> None:
        super().__init__(contexts)
        self.feature = feature

    def __repr__(self) -> str:
        lines = [f"TopTexts(feature={self.feature}, {len(self)} texts)"]
        for c in self:
            lines.append(f"  {c.activation:8.3f}  text {c.text_index}: {str(c)!r}")
        return "\n".join(lines)


class _Binding:
    """The model an SAE is used with, and the rows of the last dataset (held outside the MLX module's
    parameter tree)."""

    def __init__(self, model: Any = None) -> None:
        self.model = model
        self.rows_key: tuple | None = None
        self.rows: ArrayRows | None = None


class ExplorableSAE(TopKSAE):
    """A ``TopKSAE`` with the Phase-2 methods. ``InterpretableModel.load_sae``/``train_sae`` return
    one bound to the model, so ``model=`` may be left out; ``ExplorableSAE.from_sae(sae, model)``
    converts any ``TopKSAE``."""

    @classmethod
    def from_sae(cls, sae: TopKSAE, model: Any = None) -> ExplorableSAE:
        if isinstance(sae, ExplorableSAE):
            return sae.bind(model) if model is not None else sae
        out = cls(sae.d_model, sae.expansion_factor, sae.k, tied_weights=sae.tied_weights, stats=sae.stats,
                  metadata=sae.metadata, normalization=sae.normalization)
        out.update(sae.parameters())
        return out.bind(model)

    def bind(self, model: Any) -> ExplorableSAE:
        """Use ``model`` (an ``InterpretableModel`` or ``LoadedModel``) when a method is given none."""
        self._binding_state().model = model
        return self

    # --- the Phase-2 methods -----------------------------------------------------------------------
    def analyze_text(self, model: Any = None, prompt: str = "", top_k: int = 10) -> TextAnalysis:
        """The features of ``prompt``: the ``top_k`` with the largest activation on any of its tokens,
        and each token's ``top_k`` (at most the SAE's k fire per token)."""
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be a non-empty string")
        top_k = _positive(top_k, "top_k")
        model, site = self._model_site(model)
        loaded = _loaded(model)
        rows = rows_from_texts(loaded, site, [prompt], context_length=None)
        values, indices = Encoder(self).encode(rows.acts)
        strings = TokenStrings(loaded.tokenizer).strings(rows.token_id)
        positions = _positions(loaded, prompt)
        per_token, best = [], {}
        for i in range(len(values)):
            order = np.lexsort((indices[i], -values[i]))
            scores = [FeatureScore(int(indices[i, o]), float(values[i, o])) for o in order if values[i, o] > 0]
            for s in scores:
                if s.activation > best.get(s.feature, 0.0):
                    best[s.feature] = s.activation
            per_token.append(TokenScores(positions[i], strings[i], scores[:top_k]))
        top = sorted(best.items(), key=lambda fv: (-fv[1], fv[0]))[:top_k]
        return TextAnalysis(prompt, [FeatureScore(f, v) for f, v in top], per_token)

    def get_top_activating_texts(self, feature_idx: int, dataset: Any, top_k: int = 20, *, model: Any = None,
                                 text_column: str = "text", context_length: int = 128,
                                 config: AnalysisConfig | None = None) -> TopTexts:
        """The ``top_k`` texts of ``dataset`` where feature ``feature_idx`` fires most (one context per
        text, around its strongest token), with the feature's activation on every token shown."""
        feature = self._check_feature(feature_idx)
        cfg = replace(config or AnalysisConfig(), top_n=_positive(top_k, "top_k"), per_quantile=0)
        texts = dataset_texts(dataset, text_column)
        tables = self._analyze(model, texts, cfg, context_length, features=[feature])
        ex = tables.examples.to_pydict()
        contexts = [Context(d, a, t, v, c, texts[d]) for k, d, a, t, v, c in zip(
            ex["kind"], ex["doc_id"], ex["max_act"], ex["tokens"], ex["acts"], ex["center"], strict=True)
            if k == "top"]
        return TopTexts(feature, contexts)

    def visualize_feature(self, feature_idx: int, model: Any = None, dataset: Any = None, *,
                          text_column: str = "text", context_length: int = 128,
                          config: AnalysisConfig | None = None) -> FeatureView:
        """One feature's view over ``dataset`` (top contexts, quantile samples, histogram, logit
        effects, nearest features): shows itself in a notebook, ``.save(path)`` writes an HTML file."""
        feature = self._check_feature(feature_idx)
        texts = dataset_texts(_required(dataset, "dataset"), text_column)
        tables = self._analyze(model, texts, config or AnalysisConfig(), context_length, features=[feature])
        analysis = Analysis(Path("."), tables.summary, tables.features, tables.examples, tables.token_features)
        return FeatureView(load_feature_record(analysis, feature))

    def launch_dashboard(self, model: Any = None, dataset: Any = None, *, port: int = 0, text_column: str = "text",
                         context_length: int = 128, config: AnalysisConfig | None = None) -> DashboardServer:
        """Analyze every feature over ``dataset``, build the dashboard site in a temporary folder and
        serve it on 127.0.0.1 (``port`` 0: a free one). Returns the server: ``.url``, ``.stop()``
        (which also removes the folder)."""
        texts = dataset_texts(_required(dataset, "dataset"), text_column)
        cfg = config or AnalysisConfig()
        model, site = self._model_site(model)
        rows = self._rows(model, site, texts, context_length)
        folder = Path(tempfile.mkdtemp(prefix="saepipe-dashboard-"))
        try:
            analyze([rows], self, _loaded(model), cfg, folder / "analysis", scratch_dir=folder)
            build_site(folder / "analysis", folder / "site")
            return TemporaryDashboard(folder / "site", port, folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    # --- steering ----------------------------------------------------------------------------------
    def steer(self, model: Any = None, layer: int | None = None, feature_idx: int | None = None,
              strength: float = 1.0, *, component: str | None = None,
              positions: Sequence[int] | None = None) -> Steer:
        """Inside ``with model.trace(prompt):``, add ``strength`` x feature ``feature_idx``'s decoder
        direction (in the model's own activation space: normalization undone) to the output of this
        SAE's site, on every token or on ``positions`` only; it applies when the block exits. Several
        steers compose. ``layer``/``component`` default to the SAE's recorded site and must match it
        (``IncompatibleSAEError`` otherwise, as for another model). Returns the ``Steer``."""
        if feature_idx is None:
            raise TypeError("steer needs feature_idx=")
        spec = self.steering(feature_idx, strength, positions=positions, layer=layer, component=component)
        model = model if model is not None else self._binding_state().model
        if model is None:
            raise ValueError("no model: pass model=..., or get the SAE from model.load_sae / model.train_sae")
        loaded = _loaded(model)
        current = current_trace(loaded)
        if current is None:
            raise RuntimeError("sae.steer(...) registers an intervention on the open `with model.trace(...)` "
                               "block of this model; call it inside one (for generation pass "
                               "model.generate(..., steer=[sae.steering(feature_idx, strength)]))")
        steer_trace(current, spec, loaded)
        return spec

    def steering(self, feature_idx: int, strength: float, *, positions: Sequence[int] | None = None,
                 layer: int | None = None, component: str | None = None) -> Steer:
        """A ``Steer`` of this SAE's feature (for ``model.generate(..., steer=[...])``); checked there."""
        return Steer(self, self._check_feature(feature_idx), strength, positions, layer, component)

    # --- internals ---------------------------------------------------------------------------------
    def _binding_state(self) -> _Binding:
        state = self.__dict__.get("_binding")
        if state is None:
            state = _Binding()
            object.__setattr__(self, "_binding", state)
        return state

    def _model_site(self, model: Any) -> tuple[Any, Site]:
        model = model if model is not None else self._binding_state().model
        if model is None:
            raise ValueError("no model: pass model=..., or get the SAE from model.load_sae / model.train_sae")
        check = getattr(model, "check_sae", None)
        if callable(check):  # an InterpretableModel: refuses an SAE trained elsewhere
            site = check(self)
        else:
            meta = self.metadata
            site = None
            if meta.get("layer") is not None and meta.get("component") is not None:
                site = Site(int(meta["layer"]), str(meta["component"]))
                fatal = [r for r in self.compatibility(model, site.layer, site.component)[1] if not r.unverified]
                if fatal:
                    raise ValueError("the SAE does not fit this model: " + "; ".join(fatal))
        if site is None:
            raise ValueError("the SAE records no layer/component, so the site to read is unknown")
        return model, site

    def _rows(self, model: Any, site: Site, texts: list[str], context_length: int) -> ArrayRows:
        loaded = _loaded(model)
        h = hashlib.sha256()
        for t in texts:
            h.update(t.encode("utf-8", "surrogatepass") + b"\0")
        key = (id(loaded), loaded.info.model_hash, site, context_length, h.hexdigest())
        state = self._binding_state()
        if state.rows_key != key:
            state.rows = rows_from_texts(loaded, site, texts, context_length=context_length)
            state.rows_key = key
        if state.rows is None or state.rows.n_rows == 0:
            raise ValueError("the dataset's texts give no tokens (only special tokens)")
        return state.rows

    def _analyze(self, model: Any, texts: list[str], cfg: AnalysisConfig, context_length: int,
                 features: list[int]) -> AnalysisTables:
        model, site = self._model_site(model)
        rows = self._rows(model, site, texts, context_length)
        return analyze_rows([rows], self, _loaded(model), cfg, features=features)

    def _check_feature(self, feature_idx: Any) -> int:
        if isinstance(feature_idx, bool) or not isinstance(feature_idx, (int, np.integer)):
            raise TypeError(f"feature_idx must be an int, not {type(feature_idx).__name__}")
        if not 0 <= int(feature_idx) < self.d_hidden:
            raise ValueError(f"feature_idx {feature_idx} is out of range: this SAE has features 0..{self.d_hidden - 1}")
        return int(feature_idx)


class TemporaryDashboard(DashboardServer):
    """A server of a site in a temporary folder; ``stop()`` also removes the folder."""

    def __init__(self, site_dir: str | Path, port: int, folder: str | Path) -> None:
        super().__init__(site_dir, port)
        self.folder = Path(folder)
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.folder), True)

    def stop(self) -> None:
        super().stop()
        self._cleanup()


def _loaded(model: Any) -> Any:
    """The ``LoadedModel`` of an ``InterpretableModel`` (or the LoadedModel itself)."""
    return getattr(model, "loaded", model)


def _positions(loaded: Any, text: str) -> list[int]:
    """Positions of the kept (non-special) tokens of ``text`` in its tokenization."""
    ids = np.asarray(loaded.tokenizer.encode(text))
    return np.flatnonzero(~np.isin(ids, excluded_token_ids(loaded.tokenizer, True))).tolist()


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _required(value: Any, name: str) -> Any:
    if value is None:
        raise ValueError(f"{name} is required: a list of texts (or a datasets.Dataset)")
    return value


__all__ = ["Context", "ExplorableSAE", "FeatureScore", "TemporaryDashboard", "TextAnalysis", "TokenScores",
           "TopTexts"]
