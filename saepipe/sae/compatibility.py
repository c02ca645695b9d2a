"""Whether an SAE reads a given model's activations at a given site, and if not, why.

The answer is a list of ``Reason`` strings; each also says what it is about (``key``) and whether it
is a proven mismatch or only something the SAE did not record (``unverified``), so callers decide
what to refuse (a mismatch) and what to warn about (an SAE without a recorded site) without reading
the messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


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


__all__ = ["Reason", "site_reasons"]
