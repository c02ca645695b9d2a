"""Whether an SAE reads a given model's activations at a given site, and if not, why.

The answer is a list of ``Reason`` strings; each also says what it is about (``key``) and whether it
is a proven mismatch or only something the SAE did not record (``unverified``), so callers decide
what to refuse (a mismatch) and what to warn about (an SAE without a recorded site) without reading
the messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from saepipe.lm.sites import COMPONENTS, Site, check_site


class IncompatibleSAEError(ValueError):
    """An SAE was used with a model or site it was not trained on; the message lists the reasons."""


class Reason(str):
    """One reason an SAE may not fit a model site (the message is the string itself)."""

    key: str
    """What it is about: "d_model", "model", "layer" or "component"."""
    unverified: bool
    """True when the SAE recorded nothing to compare with (it may still fit); False for a mismatch."""

    def __new__(cls, message: str, key: str, *, unverified: bool = False) -> Reason:
        reason = super().__new__(cls, message)
        reason.key = key
        reason.unverified = unverified
        return reason


def site_reasons(metadata: Mapping[str, Any], d_model: int, model: Any, layer: Any,
                 component: Any) -> list[Reason]:
    """Why an SAE (its ``metadata`` and ``d_model``) does not read ``model`` at (layer, component).

    ``model`` is a ``LoadedModel`` or anything with ``.info`` (a ``ModelInfo``), or a ModelInfo.
    The model is identified by its weights' hash (``model_hash``), falling back to ``model_id``
    when the SAE recorded no hash. An SAE that recorded no site cannot be proven compatible.
    """
    info = getattr(model, "info", model)
    reasons: list[Reason] = []
    if getattr(info, "d_model", None) != d_model:
        reasons.append(Reason(f"d_model differs: model has {getattr(info, 'd_model', None)}, SAE has {d_model}",
                              "d_model"))
    reasons.extend(_model_reasons(metadata, info))
    for key, want in (("layer", layer), ("component", component)):
        if key not in metadata or metadata[key] is None:
            reasons.append(Reason(f"the SAE records no {key}", key, unverified=True))
        elif metadata[key] != want:
            reasons.append(Reason(f"{key} differs: asked for {want!r}, SAE trained on {metadata[key]!r}", key))
    return reasons


def check_compatible(sae: Any, model: Any, layer: int | None = None, component: str | None = None) -> Site | None:
    """Raise ``IncompatibleSAEError`` (listing why) unless ``sae`` reads ``model`` at the site.

    ``sae``: anything with ``metadata``, ``d_model`` and ``compatibility`` (a ``TopKSAE``); ``model``:
    a ``LoadedModel``, anything with ``.info``, or a ``ModelInfo``. Without ``layer``/``component`` the
    SAE's recorded site is used (only the model is checked). Returns the site checked, or None when
    neither was given nor recorded.
    """
    info = getattr(model, "info", model)
    meta = sae.metadata
    want_layer = meta.get("layer") if layer is None else layer
    want_component = meta.get("component") if component is None else component
    if component is not None and component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; valid components: {', '.join(COMPONENTS)}")
    if layer is not None:
        check_site(layer, "output", int(info.num_layers))
    reasons = sae.compatibility(model, want_layer, want_component)[1]
    if layer is None and component is None:  # nothing asked about the site: check the model only
        reasons = [r for r in reasons if not (r.unverified and r.key in ("layer", "component"))]
    if reasons:
        name = f"SAE ({meta['site']})" if meta.get("site") else "SAE"
        raise IncompatibleSAEError(f"{name} is incompatible with model {getattr(info, 'model_id', None)!r}: "
                                   + "; ".join(reasons))
    if want_layer is None or want_component is None:
        return None
    return Site(int(want_layer), str(want_component))


def _model_reasons(metadata: Mapping[str, Any], info: Any) -> list[Reason]:
    if metadata.get("model_hash"):
        if metadata["model_hash"] != getattr(info, "model_hash", None):
            return [Reason(f"model hash differs: model {getattr(info, 'model_hash', None)!r}, "
                           f"SAE trained on {metadata['model_hash']!r} ({metadata.get('model_name')})", "model")]
    elif metadata.get("model_name"):
        if metadata["model_name"] != getattr(info, "model_id", None):
            return [Reason(f"model differs: model {getattr(info, 'model_id', None)!r}, "
                           f"SAE trained on {metadata['model_name']!r}", "model")]
    else:
        return [Reason("the SAE records no model identity (model_hash / model_name)", "model", unverified=True)]
    return []


__all__ = ["IncompatibleSAEError", "Reason", "check_compatible", "site_reasons"]
