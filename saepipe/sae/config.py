"""SAE training configuration: every field of mlxterp's ``SAEConfig`` plus what a serious run needs.

Each field is also a ``params.yaml`` key under ``sae:`` (same name). The config is frozen: nothing
mutates it at run time; derived values are computed by functions that take it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from saepipe.runtime.params import ParamsSection


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
    """Initial encoder rows = this x the (unit) decoder rows. None: fitted on the init sample, the
    least-squares scale of its first top-k reconstruction (~0.6-0.75 for usual shapes). 1.0, encoder =
    decoder transpose (the usual init), overshoots and trains slower: FVU +0.03 after one epoch of the
    default run. Ignored with ``tied_weights``."""
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
        _check(self.learning_rate is None or _positive(self.learning_rate),
               "learning_rate must be a finite number > 0 (or null: scaled with the width)")
        _check(self.num_epochs >= 1, "num_epochs must be >= 1")
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        _check(0.0 <= self.validation_split < 1.0, "validation_split must be in [0, 1)")
        _check(self.gradient_clip >= 0, "gradient_clip must be >= 0 (0 disables it)")
        _check(self.lr_decay in ("cosine", "linear", "constant"),
               f"lr_decay must be cosine, linear or constant, not {self.lr_decay!r}")
        _check(self.encoder_init_scale is None or _positive(self.encoder_init_scale),
               "encoder_init_scale must be a finite number > 0 (or null: fitted on the data)")
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


def _positive(value: Any) -> bool:
    """A real number > 0 and finite (bools are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"SAEConfig: {message}")


__all__ = ["SAEConfig", "default_learning_rate"]
