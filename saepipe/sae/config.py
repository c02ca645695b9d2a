"""SAE training configuration: every field of mlxterp's ``SAEConfig`` plus what a serious run needs.

Each field is also a ``params.yaml`` key under ``sae:`` (same name). The config is frozen: nothing
mutates it at run time; derived values are computed by functions that take it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from saepipe.runtime.params import Bool, Choice, Float, Int, ParamsSection, Str, StrList

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

    RULES: ClassVar = {
        "expansion_factor": Int(min=1), "k": Int(min=1), "learning_rate": Float(min=0, min_open=True),
        "num_epochs": Int(min=1), "batch_size": Int(min=1), "warmup_steps": Int(min=0),
        "validation_split": Float(min=0, max=1, max_open=True), "normalize_input": Bool(),
        "tied_weights": Bool(), "gradient_clip": Float(min=0), "use_wandb": Bool(),
        "wandb_project": Str(optional=True), "wandb_name": Str(optional=True), "wandb_tags": StrList(),
        "normalization": Choice(("scalar", "per_dim")), "lr_decay": Choice(("cosine", "linear", "constant")),
        "min_lr_ratio": Float(min=0, max=1), "k_aux": Int(min=1, optional=True), "aux_coef": Float(min=0),
        "dead_tokens_threshold": Int(min=1), "resample_every": Int(min=0),
        "resample_window": Int(min=1, optional=True), "resample_scale": Float(min=0, min_open=True),
        "l1_coefficient": Float(min=0), "seed": Int(min=0, max=MAX_SEED),
        "checkpoint_every": Int(min=0),
    }

    def check_together(self) -> None:
        """`sae.learning_rate` above 1 warns (Adam diverges there). Checked when the data is known
        (``fit_sae``): `sae.k` <= d_hidden (error); a run too short for its settings warns and fails
        evaluate's `schedule_ok` health check (`sae.batch_size` above the training rows,
        `sae.warmup_steps` >= the steps, fewer than 100 steps, `sae.dead_tokens_threshold` above the
        tokens trained on)."""
        if self.learning_rate > 1:
            log.warning("sae.learning_rate=%g is far above the usual 1e-4..1e-2 for Adam: expect divergence",
                        self.learning_rate)

    def replace(self, **changes: Any) -> SAEConfig:
        return dataclasses.replace(self, **changes)


__all__ = ["SAEConfig"]
