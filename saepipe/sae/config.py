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
        _check(_is_int(self.resample_every) and self.resample_every >= 0,
               f"resample_every must be an integer >= 0 (0 turns resampling off), not {self.resample_every!r}")
        _check(self.resample_window is None or (_is_int(self.resample_window) and self.resample_window >= 1),
               f"resample_window must be None or an integer >= 1 (tokens), not {self.resample_window!r}")
        _check(isinstance(self.resample_scale, (int, float)) and not isinstance(self.resample_scale, bool)
               and math.isfinite(self.resample_scale) and self.resample_scale > 0,
               f"resample_scale must be a finite number > 0, not {self.resample_scale!r}")
        _check(self.normalization in ("scalar", "per_dim"),
               f"normalization must be scalar or per_dim, not {self.normalization!r}")

    def to_dict(self) -> dict[str, Any]:
        """The config as plain values; ``wandb_tags`` as a list, as YAML and JSON write it."""
        d = dataclasses.asdict(self)
        d["wandb_tags"] = list(self.wandb_tags)
        return d

    def replace(self, **changes: Any) -> SAEConfig:
        return dataclasses.replace(self, **changes)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"SAEConfig: {message}")


__all__ = ["SAEConfig"]
