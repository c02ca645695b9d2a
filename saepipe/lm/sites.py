"""Where activations come from: a (layer, component) site and its exact names.

Names follow mlxterp: ``model.model.layers.{i}.{mlp|self_attn|...}``. We accept, exactly (never by
substring), for layer i:

- ``model.model.layers.{i}.mlp`` / ``model.layers.{i}.mlp``            -> component "mlp"
- ``model.model.layers.{i}.self_attn`` / ``...attn`` (both prefixes)    -> component "attn"
- ``model.model.layers.{i}`` / ``model.layers.{i}`` / ``...{i}.output`` -> component "output"
"""

from __future__ import annotations

from typing import NamedTuple

COMPONENTS: tuple[str, ...] = ("mlp", "attn", "output")
"""mlp: the MLP's output; attn: the attention block's output; output: the residual after the block."""

_SUFFIXES = {"mlp": ("mlp",), "attn": ("self_attn", "attn"), "output": ("", "output")}
_PREFIXES = ("model.model.layers", "model.layers")


class Site(NamedTuple):
    layer: int
    component: str

    @property
    def name(self) -> str:
        """Canonical mlxterp-style name, e.g. ``model.model.layers.10.mlp``."""
        return site_names(self.layer, self.component)[0]


def check_site(layer: int, component: str, num_layers: int) -> Site:
    """Validate a site against a model with ``num_layers`` blocks; errors say what is valid."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; valid components: {', '.join(COMPONENTS)}")
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise TypeError(f"layer must be an integer (0..{num_layers - 1} for this model), got {layer!r} "
                        f"({type(layer).__name__})")
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer!r} is out of range; this model has layers 0..{num_layers - 1}")
    return Site(layer, component)


def site_names(layer: int, component: str) -> list[str]:
    """Every accepted name of a site, canonical first."""
    names = []
    for prefix in _PREFIXES:
        for suffix in _SUFFIXES[component]:
            names.append(f"{prefix}.{layer}.{suffix}" if suffix else f"{prefix}.{layer}")
    return names


def parse_site_name(name: str, num_layers: int) -> Site:
    """Exact lookup of an activation name; an unknown name lists the valid ones."""
    for layer in range(num_layers):
        for component in COMPONENTS:
            if name in site_names(layer, component):
                return Site(layer, component)
    examples = ", ".join(site_names(0, c)[0] for c in COMPONENTS)
    raise KeyError(
        f"unknown activation name {name!r}; valid names are model.model.layers.{{i}}.{{mlp|self_attn|output}} "
        f"(or model.layers.{{i}}...) for i in 0..{num_layers - 1}, e.g. {examples}"
    )
