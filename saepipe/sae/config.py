"""SAE training configuration: every field of mlxterp's ``SAEConfig`` plus what a serious run needs,
and the ``sweep:`` section (which sites, which variants of it).

Each field is also a ``params.yaml`` key under ``sae:`` (same name). The config is frozen: nothing
mutates it at run time; derived values are computed by functions that take it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from saepipe.lm.sites import Site, parse_site_ids
from saepipe.runtime.params import ParamsSection, check_known_keys


@dataclass(frozen=True)
class SAEConfig(ParamsSection):
    SECTION: ClassVar[str] = "sae"  # its params.yaml section

    expansion_factor: int = 16
    """d_hidden = expansion_factor * d_model."""
    k: int = 100
    """Latents kept active per token by TopK (exactly k; ties never keep more)."""
    learning_rate: float = 3e-4
    """Peak Adam learning rate, reached after ``warmup_steps``."""
    num_epochs: int = 5
    """Passes over the training activations."""
    batch_size: int = 64
    """Tokens (activation rows) per optimisation step."""
    warmup_steps: int = 500
    """Linear learning-rate warmup from 0 to ``learning_rate``."""
    validation_split: float = 0.05
    """Fraction of the activation rows held out and evaluated at the end of each epoch."""
    normalize_input: bool = True
    """Normalize inputs with the mean/std from ``normalize`` (or fit on the data); see ``normalization``."""
    tied_weights: bool = False
    """Decoder weight is the encoder weight transposed (half the parameters)."""
    gradient_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    use_wandb: bool = False
    """Log to Weights & Biases (needs the ``wandb`` extra)."""
    wandb_project: str | None = None
    """W&B project name."""
    wandb_name: str | None = None
    """W&B run name."""
    wandb_tags: tuple[str, ...] = ()
    """W&B run tags."""
    # --- beyond the seed ---
    normalization: str = "scalar"
    """With normalize_input: "scalar" centres and divides every dimension by one std (the root mean
    per-dimension variance), keeping the geometry so training minimises the original-space error;
    "per_dim" standardises each dimension (equal weight per dimension in the loss)."""
    lr_decay: str = "cosine"
    """Schedule after warmup: "cosine" (to ``min_lr_ratio`` x peak), "linear" or "constant"."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak, for the cosine and linear schedules."""
    k_aux: int | None = None
    """Latents used by the AuxK loss to reconstruct the residual; None means d_model // 2."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss (the scaled residual-reconstruction loss of dead latents)."""
    dead_tokens_threshold: int = 1_000_000
    """A latent is dead when it has not fired on this many consecutive training tokens."""
    l1_coefficient: float = 0.0
    """Optional L1 penalty on the latent activations (not usually needed with TopK)."""
    seed: int = 0
    """Seed for initialisation, the validation split and the batch order."""
    checkpoint_every: int = 500
    """Save a resumable checkpoint every this many steps (0: only at epoch ends)."""

    def __post_init__(self) -> None:
        if isinstance(self.wandb_tags, list):
            object.__setattr__(self, "wandb_tags", tuple(self.wandb_tags))
        _check(self.expansion_factor >= 1, "expansion_factor must be >= 1")
        _check(self.k >= 1, "k must be >= 1")
        _check(self.learning_rate > 0, "learning_rate must be > 0")
        _check(self.num_epochs >= 1, "num_epochs must be >= 1")
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        _check(0.0 <= self.validation_split < 1.0, "validation_split must be in [0, 1)")
        _check(self.gradient_clip >= 0, "gradient_clip must be >= 0 (0 disables it)")
        _check(self.lr_decay in ("cosine", "linear", "constant"),
               f"lr_decay must be cosine, linear or constant, not {self.lr_decay!r}")
        _check(self.dead_tokens_threshold >= 1, "dead_tokens_threshold must be >= 1")
        _check(self.normalization in ("scalar", "per_dim"),
               f"normalization must be scalar or per_dim, not {self.normalization!r}")

    def to_dict(self) -> dict[str, Any]:
        """The config as plain values; ``wandb_tags`` as a list, as YAML and JSON write it."""
        d = dataclasses.asdict(self)
        d["wandb_tags"] = list(self.wandb_tags)
        return d

    def replace(self, **changes: Any) -> SAEConfig:
        return dataclasses.replace(self, **changes)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"SAEConfig: {message}")


VARIANT_NAME = re.compile(r"^[A-Za-z0-9_]+$")
"""Variant names: letters, digits and ``_`` (they name folders, and DVC joins site and variant with
``-`` in stage names such as ``train@6.mlp-k64``)."""


def variant_config(sae: Mapping[str, Any], variants: Mapping[str, Any], name: str) -> SAEConfig:
    """The SAEConfig of sweep variant ``name``: the ``sae:`` section with the variant's overrides
    (``sweep.variants.<name>``, a mapping of SAEConfig fields; ``{}`` = ``sae:`` as is) on top."""
    if not isinstance(variants, Mapping) or name not in variants:
        have = ", ".join(variants) if isinstance(variants, Mapping) else "none"
        raise KeyError(f"no variant {name!r} in sweep.variants (have: {have})")
    overrides = check_variant(name, variants[name])
    return SAEConfig.from_dict({**sae, **overrides})


def check_variant(name: Any, overrides: Any) -> dict[str, Any]:
    """A variant's overrides as a dict; a bad name, a non-mapping or an unknown key is a ValueError."""
    if not isinstance(name, str) or not VARIANT_NAME.match(name):
        raise ValueError(f"sweep.variants: bad name {name!r} (letters, digits and _ only)")
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, Mapping):
        raise ValueError(f"sweep.variants.{name} must be a mapping of sae: keys (or {{}}), got {overrides!r}")
    check_known_keys(overrides, [f.name for f in dataclasses.fields(SAEConfig)], f"sweep.variants.{name} (sae)")
    return dict(overrides)


@dataclass(frozen=True)
class SweepConfig(ParamsSection):
    """The ``sweep:`` section of params.yaml: which sites are extracted (all in one forward pass)
    and which SAEs are trained on each. ``dvc.yaml`` expands it with ``matrix`` stages: one
    ``normalize@<site>`` per site, one ``train@<site>-<variant>`` (evaluate, analyze, dashboard
    alike) per pair; ``summary`` compares every run."""

    SECTION: ClassVar[str] = "sweep"  # its params.yaml section

    sites: tuple[str, ...] = ("6.mlp",)
    """Sites as layer.component ids (mlp | attn | output), e.g. [6.mlp, 3.attn, 11.output]; all extracted in one forward pass."""
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: {"default": {}})
    """SAEs trained per site, by name: each one's overrides of the sae: section (e.g. k64: {k: 64}; {} = sae: as is)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", tuple(s.id for s in parse_site_ids(self.sites)))
        if not isinstance(self.variants, Mapping) or not self.variants:
            raise ValueError(f"sweep.variants must be a non-empty mapping of name -> sae: overrides, "
                             f"got {self.variants!r}")
        object.__setattr__(self, "variants", {n: check_variant(n, o) for n, o in self.variants.items()})

    def site_list(self) -> list[Site]:
        """The sites, parsed."""
        return parse_site_ids(list(self.sites))

    def runs(self) -> list[tuple[str, str]]:
        """Every (site id, variant name), site by site: the pairs DVC's matrix expands."""
        return [(site, name) for site in self.sites for name in self.variants]

    def sae_config(self, sae: Mapping[str, Any], variant: str) -> SAEConfig:
        """The SAEConfig of ``variant`` over the ``sae:`` section."""
        return variant_config(sae, self.variants, variant)

    def to_dict(self) -> dict[str, Any]:
        """The section as params.yaml holds it."""
        return {"sites": list(self.sites), "variants": {n: dict(o) for n, o in self.variants.items()}}


__all__ = ["VARIANT_NAME", "SAEConfig", "SweepConfig", "check_variant", "variant_config"]
