"""Layer 3, sparse autoencoders: the ``Dictionary`` interface, the TopK SAE, its config and file."""
