"""Layer 4, training: ``fit_sae``, its training steps (reference, MLX, CPU), checkpoints, logging."""
