"""Layer 1, language models: loading (mlx-lm, GGUF), the block-wise forward pass, sites, tokens."""
