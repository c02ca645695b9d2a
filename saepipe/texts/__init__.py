"""Layer 1, texts: the built-in corpus, text sources (files, HF datasets) and the prepare step."""
