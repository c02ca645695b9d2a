"""Layer 5, evaluation: scoring an SAE on held-out texts, the metric definitions, plots and report."""
