"""Where activations come from: a (layer, component) site and its exact names.

Names follow mlxterp: ``model.model.layers.{i}.{mlp|self_attn|...}``. We accept, exactly (never by
substring), for layer i:

- ``model.model.layers.{i}.mlp`` / ``model.layers.{i}.mlp``            -> component "mlp"
- ``model.model.layers.{i}.self_attn`` / ``...attn`` (both prefixes)    -> component "attn"
- ``model.model.layers.{i}`` / ``model.layers.{i}`` / ``...{i}.output`` -> component "output"

The pipeline names a site by a short id, ``{layer}.{component}`` (``6.mlp``, ``3.attn``, ``11.output``):
``params.yaml``'s ``sweep.sites``, the folders of ``data/`` and DVC's stage names (``train@6.mlp-default``)
use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from saepipe.runtime.params import ParamsError, Rule

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

    @property
    def id(self) -> str:
        """Short id used by params.yaml, folder and stage names, e.g. ``6.mlp``."""
        return f"{self.layer}.{self.component}"


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


def parse_site_id(text: str) -> Site:
    """``"6.mlp"`` -> ``Site(6, "mlp")``: the syntax only (the layer range is checked against a model
    with ``check_site``); an error says what is valid."""
    layer, sep, component = str(text).partition(".")
    if not sep or not layer.isdigit() or (len(layer) > 1 and layer[0] == "0") or component not in COMPONENTS:
        raise ValueError(f"bad site {text!r}: write layer.component, e.g. 6.mlp, 3.attn or 11.output "
                         f"(components: {', '.join(COMPONENTS)})")
    return Site(int(layer), component)


def parse_site_ids(texts: object) -> list[Site]:
    """A non-empty list of distinct site ids (``sweep.sites``), parsed in order."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts:
        raise ValueError(f"sites must be a non-empty list of layer.component ids (e.g. [6.mlp]), got {texts!r}")
    sites = [parse_site_id(t) for t in texts]
    if len(set(sites)) != len(sites):
        raise ValueError(f"sites repeat a site: {list(texts)}")
    return sites


DEFAULT_SITES: tuple[str, ...] = ("6.mlp",)
"""``sweep.sites`` when params.yaml names none."""


@dataclasses.dataclass(frozen=True)
class SiteIds(Rule):
    """The params rule of ``sweep.sites``: a non-empty list of distinct ``layer.component`` ids, kept
    as a tuple of canonical ids."""

    def describe(self) -> str:
        return "a non-empty list of distinct layer.component ids (component mlp, attn or output), e.g. [6.mlp]"

    def check_value(self, key: str, value: Any) -> tuple[str, ...]:
        try:
            return tuple(site.id for site in parse_site_ids(list(value) if isinstance(value, tuple) else value))
        except (ValueError, TypeError):
            raise ParamsError(key, value, self.describe()) from None


def sweep_sites(sweep_section: dict[str, Any]) -> list[Site]:
    """The sites of a params.yaml ``sweep:`` section (``DEFAULT_SITES`` when it names none), checked."""
    return parse_site_ids(list(SiteIds().check("sweep.sites", sweep_section.get("sites", DEFAULT_SITES))))


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
