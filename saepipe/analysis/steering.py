"""Steering: add a multiple of an SAE latent's decoder direction to the model's activations.

A latent's decoder row ``W_dec[i]`` lives in the SAE's normalized units (``x_n = (x - mean) / std``,
see ``saepipe.sae.normalization``); one unit of latent ``i`` changes the model's activation by
``W_dec[i] * std``. ``Steer(sae, i, s)`` adds ``s * W_dec[i] * std`` to the output of the SAE's
(layer, component) site, on every position or on the listed ``positions`` only, as an ``Add`` edit of
``saepipe.lm.forward``. Several steers compose: their vectors add up (same site) or apply at their
own sites, in one forward.

- ``steer_trace(trace, steer, model)``: register a steer on a pending ``saepipe.lm.trace`` trace
  (what ``sae.steer(model=..., ...)`` does inside ``with model.trace(...)``).
- ``generate(model, prompt, steers, ...)``: ``saepipe.lm.generate`` under steering, each steer
  applied to the prompt and to every generated token (or at its ``positions``).

Each steer is checked against the model before anything runs (``check_compatible``: d_model, the
weights the SAE was trained on, its recorded layer and component).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np

from saepipe.lm.forward import Add, Edit
from saepipe.lm.generate import Generation
from saepipe.lm.generate import generate as generate_text
from saepipe.lm.sites import Site
from saepipe.lm.trace import Trace
from saepipe.sae.compatibility import IncompatibleSAEError, check_compatible
from saepipe.sae.normalization import InputNormalizer


class Steer(NamedTuple):
    """One steering intervention: add ``strength`` x latent ``feature_idx``'s direction at the SAE's site."""

    sae: Any
    """The SAE (a ``TopKSAE``) whose decoder direction is added."""
    feature_idx: int
    strength: float
    """Units of the latent (its activation scale: a latent firing at 3.0 adds 3 x its direction)."""
    positions: Sequence[int] | None = None
    """Token positions to steer (None: all). Negative ones count from the end of each text (a trace)
    or of the prompt (generation); in generation, positions past the prompt are generated tokens."""
    layer: int | None = None
    """Site layer; None: the SAE's recorded layer."""
    component: str | None = None
    """Site component (mlp, attn, output); None: the SAE's recorded component."""


def steering_vector(sae: Any, feature_idx: int) -> mx.array:
    """(d_model,) float32: latent ``feature_idx``'s decoder direction in the model's activation space
    (``W_dec[i] * std``; the row itself when the SAE has no input normalization)."""
    i = check_feature(sae, feature_idx)
    row = mx.array(sae.W_dec[i]).astype(mx.float32)
    if sae.stats is None:
        return row
    return row * InputNormalizer(sae.stats, sae.normalization).std


def check_feature(sae: Any, feature_idx: Any) -> int:
    """``feature_idx`` as an int in range for ``sae``; a TypeError/ValueError saying what is valid."""
    if isinstance(feature_idx, bool) or not isinstance(feature_idx, (int, np.integer)):
        raise TypeError(f"feature_idx must be an int, not {type(feature_idx).__name__}")
    if not 0 <= int(feature_idx) < sae.d_hidden:
        raise ValueError(f"feature_idx {feature_idx} is out of range: this SAE has features 0..{sae.d_hidden - 1}")
    return int(feature_idx)


def steer_site(steer: Steer, model: Any) -> Site:
    """The site ``steer`` acts on, after checking its SAE reads ``model`` there
    (``IncompatibleSAEError`` listing why not)."""
    if not isinstance(steer.strength, (int, float, np.number)) or not np.isfinite(float(steer.strength)):
        raise ValueError(f"strength must be a finite number, got {steer.strength!r}")
    site = check_compatible(steer.sae, getattr(model, "info", model), steer.layer, steer.component)
    if site is None:
        raise IncompatibleSAEError("the SAE records no layer/component, so the site to steer is unknown: pass "
                                   "layer= and component= (and record them: sae.update_metadata(layer=..., "
                                   "component=...))")
    return site


class _Resolved(NamedTuple):
    site: Site
    vector: mx.array
    """(d_model,) strength x direction."""
    positions: tuple[int, ...] | None


def resolve(steers: Sequence[Steer], model: Any) -> list[_Resolved]:
    """Check every steer against ``model`` and compute its vector (before anything runs)."""
    out = []
    for steer in steers:
        if not isinstance(steer, Steer):
            raise TypeError(f"steer entries must be Steer(sae, feature_idx, strength, ...), not {type(steer).__name__}")
        site = steer_site(steer, model)
        vector = steering_vector(steer.sae, steer.feature_idx) * float(steer.strength)
        positions = None if steer.positions is None else tuple(_positions(steer.positions))
        out.append(_Resolved(site, vector, positions))
    return out


def _positions(positions: Any) -> list[int]:
    if isinstance(positions, (int, np.integer)):
        positions = [positions]
    values = list(positions)
    for p in values:
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)):
            raise TypeError(f"positions must be integers, got {p!r}")
    return [int(p) for p in values]


def position_mask(positions: Sequence[int], lengths: Sequence[int], width: int) -> np.ndarray:
    """(len(lengths), width) bool: the steered positions of each row; a negative position counts from
    the row's length (its last real token is -1). A position outside every row is an error."""
    mask = np.zeros((len(lengths), width), dtype=bool)
    for row, n in enumerate(lengths):
        for p in positions:
            q = p + int(n) if p < 0 else p
            if not 0 <= q < width:
                raise IndexError(f"position {p} is outside the {int(n)} tokens of text {row}")
            mask[row, q] = True
    return mask


def steer_trace(trace: Trace, steer: Steer, model: Any) -> Site:
    """Register ``steer`` on ``trace`` (pending or inside its ``with`` block); returns its site."""
    (resolved,) = resolve([steer], model)
    if resolved.positions is None:
        edit = Add(resolved.vector)
    else:
        mask = position_mask(resolved.positions, trace.lengths, trace.tokens.shape[1])
        edit = Add(mx.array(mask)[:, :, None].astype(mx.float32) * resolved.vector)
    trace.add_edit(resolved.site, edit)
    return resolved.site


class SteeringPlan:
    """Several steers over one token sequence (a prompt and what is generated after it):
    ``edits(start, length)`` gives the edits for absolute positions ``start .. start + length - 1``."""

    def __init__(self, steers: Sequence[Steer], model: Any, prompt_length: int) -> None:
        self.steers = resolve(steers, model)
        self.prompt_length = int(prompt_length)
        everywhere: dict[Site, mx.array] = {}
        self._at: dict[Site, dict[int, mx.array]] = {}
        for r in self.steers:
            if r.positions is None:
                everywhere[r.site] = everywhere[r.site] + r.vector if r.site in everywhere else r.vector
                continue
            at = self._at.setdefault(r.site, {})
            for p in r.positions:
                q = p + self.prompt_length if p < 0 else p
                if q < 0:
                    raise IndexError(f"position {p} is before the prompt's first token ({self.prompt_length} tokens)")
                at[q] = at[q] + r.vector if q in at else r.vector
        self._everywhere = everywhere

    @property
    def sites(self) -> list[Site]:
        return sorted({r.site for r in self.steers})

    def edits(self, start: int, length: int) -> dict[Site, Edit]:
        out: dict[Site, Edit] = {}
        for site in self.sites:
            base = self._everywhere.get(site)
            at = {q - start: v for q, v in self._at.get(site, {}).items() if start <= q < start + length}
            if not at:
                if base is not None:
                    out[site] = Add(base)
                continue
            d = (base if base is not None else next(iter(at.values()))).shape[0]
            rows = [at.get(j, mx.zeros((d,))) for j in range(length)]
            delta = mx.stack(rows)[None]
            out[site] = Add(delta + base if base is not None else delta)
        return out


def generate(model: Any, prompt: str, steers: Sequence[Steer] = (), *, max_tokens: int = 40,
             temperature: float = 0.0, seed: int = 0, cache: bool | None = None,
             stop_at_eos: bool = True) -> Generation:
    """Continue ``prompt`` with ``model`` (a LoadedModel) under ``steers`` (none: the clean model);
    see ``saepipe.lm.generate.generate``. Every steer is checked before the first token."""
    prompt_length = len(model.tokenizer.encode(prompt)) if isinstance(prompt, str) else 0
    plan = SteeringPlan(list(steers), model, prompt_length) if steers else None
    return generate_text(model, prompt, max_tokens, edits_at=None if plan is None else plan.edits,
                         temperature=temperature, seed=seed, cache=cache, stop_at_eos=stop_at_eos)


__all__ = ["Steer", "SteeringPlan", "check_feature", "generate", "position_mask", "resolve",
           "steer_site", "steer_trace", "steering_vector"]
