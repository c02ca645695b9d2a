"""SAE training configuration: every field of mlxterp's ``SAEConfig`` plus what a serious run needs,
and the ``sweep:`` section (which sites, which variants of it).

Each field is also a ``params.yaml`` key under ``sae:`` (same name). The config is frozen: nothing
mutates it at run time; derived values are computed by functions that take it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from saepipe.lm.sites import DEFAULT_SITES, Site, SiteIds, parse_site_ids
from saepipe.runtime.params import (
    Bool,
    Choice,
    Float,
    Int,
    ParamsError,
    ParamsSection,
    Rule,
    Str,
    StrList,
    check_known_keys,
)

log = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1
"""Largest seed (MLX's and numpy's generators both take it)."""


@dataclass(frozen=True)
class SAEConfig(ParamsSection):
    SECTION: ClassVar[str] = "sae"  # its params.yaml section

    expansion_factor: int = 16
    """d_hidden = expansion_factor * d_model."""
    k: int = 100
    """Latents kept active per token by TopK (exactly k; ties never keep more)."""
    learning_rate: float | None = None
    """Peak Adam learning rate, reached after ``warmup_steps``. None: scaled with the width,
    ``default_learning_rate(d_hidden)`` = 3e-3 * sqrt(9216 / d_hidden) (3e-3 at 9,216 latents); the
    run records the value it used in the SAE's config."""
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
    encoder_init_scale: float | None = None
    """Initial encoder rows = this x the (unit) decoder rows. None: fitted on the init sample, 0.85 x
    the least-squares scale of its first top-k reconstruction (~0.5-0.65 for usual shapes). 1.0, encoder =
    decoder transpose (the usual init), overshoots and trains slower: FVU +0.03 after one epoch of the
    default run. Ignored with ``tied_weights``."""
    resample_every: int = 0
    """Dead-latent resampling (Anthropic's April 2023 recipe), beside AuxK: every this many steps, the
    latents that have not fired for ``resample_window`` tokens are re-initialised toward inputs the SAE
    reconstructs badly, and their Adam state is reset. 0 turns it off."""
    resample_window: int | None = None
    """Tokens without firing that make a latent eligible for resampling; None: ``dead_tokens_threshold``."""
    resample_scale: float = 0.2
    """A resampled latent's encoder row norm, as a fraction of the mean encoder row norm of the alive
    latents (Anthropic's 0.2); its decoder row is the unit residual direction and its encoder bias 0."""
    l1_coefficient: float = 0.0
    """Optional L1 penalty on the latent activations (not usually needed with TopK)."""
    seed: int = 0
    """Seed for initialisation, the validation split and the batch order."""
    checkpoint_every: int = 500
    """Save a resumable checkpoint every this many steps (0: only at epoch ends)."""

    RULES: ClassVar = {
        "expansion_factor": Int(min=1), "k": Int(min=1),
        "learning_rate": Float(min=0, min_open=True, optional=True),
        "num_epochs": Int(min=1), "batch_size": Int(min=1), "warmup_steps": Int(min=0),
        "validation_split": Float(min=0, max=1, max_open=True), "normalize_input": Bool(),
        "tied_weights": Bool(), "gradient_clip": Float(min=0), "use_wandb": Bool(),
        "wandb_project": Str(optional=True), "wandb_name": Str(optional=True), "wandb_tags": StrList(),
        "normalization": Choice(("scalar", "per_dim")), "lr_decay": Choice(("cosine", "linear", "constant")),
        "min_lr_ratio": Float(min=0, max=1), "k_aux": Int(min=1, optional=True), "aux_coef": Float(min=0),
        "dead_tokens_threshold": Int(min=1), "resample_every": Int(min=0),
        "resample_window": Int(min=1, optional=True), "resample_scale": Float(min=0, min_open=True),
        "encoder_init_scale": Float(min=0, min_open=True, optional=True),
        "l1_coefficient": Float(min=0), "seed": Int(min=0, max=MAX_SEED),
        "checkpoint_every": Int(min=0),
    }

    def check_together(self) -> None:
        """`sae.learning_rate` above 1 warns (Adam diverges there). Checked when the data is known
        (``fit_sae``): `sae.k` <= d_hidden (error); a run too short for its settings warns and fails
        evaluate's `schedule_ok` health check (`sae.batch_size` above the training rows,
        `sae.warmup_steps` >= the steps, fewer than 100 steps, `sae.dead_tokens_threshold` above the
        tokens trained on)."""
        if self.learning_rate is not None and self.learning_rate > 1:
            log.warning("sae.learning_rate=%g is far above the usual 1e-4..1e-2 for Adam: expect divergence",
                        self.learning_rate)

    def replace(self, **changes: Any) -> SAEConfig:
        return dataclasses.replace(self, **changes)


def default_learning_rate(d_hidden: int) -> float:
    """The peak learning rate used when ``SAEConfig.learning_rate`` is None: 3e-3 * sqrt(9216 / d_hidden).

    Adam's best peak lr falls as 1/sqrt(width), as in EleutherAI sparsify (2e-4 / sqrt(n / 2^14)); the
    constant is ours, measured on SmolLM2-135M layer-6 MLP activations at batch 4096, k 32, one epoch
    of 383k tokens: the best lr was ~6e-3 at 9,216 latents and ~1.2e-2 at 2,304 (twice, for a quarter
    of the width), and over 4 epochs 3e-3 kept dead latents at 0.25 % where 6e-3 left 11 %.
    sparsify's own constant is for runs of 1e8+ tokens: 2.7e-4 at 9,216 latents gave FVU 0.56 vs
    0.39 at 3e-3 after one epoch (docs/performance.md)."""
    if d_hidden < 1:
        raise ValueError(f"d_hidden must be >= 1, got {d_hidden}")
    return 3e-3 * math.sqrt(9216 / d_hidden)


VARIANT_NAME = re.compile(r"^[A-Za-z0-9_]+$")
"""Variant names: letters, digits and ``_`` (they name folders, and DVC joins site and variant with
``-`` in stage names such as ``train@6.mlp-k64``)."""


def variant_config(sae: Mapping[str, Any], variants: Mapping[str, Any], name: str) -> SAEConfig:
    """The SAEConfig of sweep variant ``name``: the ``sae:`` section with the variant's overrides
    (``sweep.variants.<name>``, a mapping of SAEConfig fields; ``{}`` = ``sae:`` as is) on top."""
    if not isinstance(variants, Mapping) or name not in variants:
        have = ", ".join(variants) if isinstance(variants, Mapping) else "none"
        raise ParamsError(f"sweep.variants.{name}", name, f"one of the variants ({have})",
                          message=f"no variant {name!r} in sweep.variants (have: {have})")
    overrides = check_variant(name, variants[name])
    return SAEConfig.from_dict({**sae, **overrides})


def check_variant(name: Any, overrides: Any) -> dict[str, Any]:
    """A variant's overrides as a dict; a bad name, a non-mapping or an unknown key is a ParamsError."""
    if not isinstance(name, str) or not VARIANT_NAME.match(name):
        raise ParamsError("sweep.variants", name, "variant names of letters, digits and _ only")
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, Mapping):
        raise ParamsError(f"sweep.variants.{name}", overrides, "a mapping of sae: keys (or {})")
    check_known_keys(overrides, [f.name for f in dataclasses.fields(SAEConfig)], f"sweep.variants.{name}")
    return dict(overrides)


@dataclass(frozen=True)
class Variants(Rule):
    """A non-empty mapping of variant name -> overrides of the ``sae:`` section."""

    def describe(self) -> str:
        return "a non-empty mapping of variant name -> sae: overrides (e.g. {default: {}, k64: {k: 64}})"

    def check_value(self, key: str, value: Any) -> dict[str, dict[str, Any]]:
        if not isinstance(value, Mapping) or not value:
            raise ParamsError(key, value, self.describe())
        return {n: check_variant(n, o) for n, o in value.items()}


@dataclass(frozen=True)
class SweepConfig(ParamsSection):
    """The ``sweep:`` section of params.yaml: which sites are extracted (all in one forward pass)
    and which SAEs are trained on each. ``dvc.yaml`` expands it with ``matrix`` stages: one
    ``normalize@<site>`` per site, one ``train@<site>-<variant>`` (evaluate, analyze, dashboard
    alike) per pair; ``summary`` compares every run."""

    SECTION: ClassVar[str] = "sweep"  # its params.yaml section

    sites: tuple[str, ...] = DEFAULT_SITES
    """Sites as layer.component ids (mlp | attn | output), e.g. [6.mlp, 3.attn, 11.output]; all extracted in one forward pass."""
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: {"default": {}})
    """SAEs trained per site, by name: each one's overrides of the sae: section (e.g. k64: {k: 64}; {} = sae: as is)."""

    RULES: ClassVar = {"sites": SiteIds(), "variants": Variants()}

    def check_together(self) -> None:
        """Each variant's overrides make a valid `sae:` section (a bad value names
        `sweep.variants.<name>.<key>`)."""
        for name, overrides in self.variants.items():
            try:
                SAEConfig.from_dict(overrides)  # the rule has checked the name and the keys
            except ParamsError as err:
                key = err.key.removeprefix(f"{SAEConfig.SECTION}.")
                if key not in overrides:
                    raise
                raise ParamsError(f"sweep.variants.{name}.{key}", err.value, err.expected) from None

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


__all__ = ["MAX_SEED", "VARIANT_NAME", "SAEConfig", "SweepConfig", "Variants", "check_variant",
           "default_learning_rate", "variant_config"]
