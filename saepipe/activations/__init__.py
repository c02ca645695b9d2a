"""Layer 2, activations: extraction into shard folders, reading them, normalization statistics."""
