"""``AnalysisConfig``: the ``analyze:`` section of params.yaml (what the analysis keeps per latent)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from saepipe.runtime.params import ParamsSection


@dataclass(frozen=True)
class AnalysisConfig(ParamsSection):
    """How many contexts, samples, bins, tokens and neighbours the analysis keeps per latent."""

    SECTION: ClassVar[str] = "analyze"  # its params.yaml section

    top_n: int = 20
    """Top activating contexts per latent, at most one per document (text), strongest first."""
    window_before: int = 24
    """Tokens shown before the activating token in each context (fewer at the start of a text)."""
    window_after: int = 7
    """Tokens shown after it (fewer at the end of a text); a window holds up to before + 1 + after."""
    quantiles: int = 5
    """Activation quantiles sampled per latent: its firing values split into this many bins by rank."""
    per_quantile: int = 4
    """Examples per quantile bin, at evenly spaced ranks inside the bin (top contexts are not repeated)."""
    histogram_bins: int = 32
    """Bins of each latent's activation histogram, from 0 to its maximum."""
    logit_top: int = 10
    """Promoted and suppressed tokens per latent (its decoder direction through the unembedding)."""
    neighbors: int = 10
    """Nearest latents by decoder cosine, per latent (itself excluded)."""
    token_top: int = 20
    """Latents listed per vocabulary token: the ones with the largest activation on that token."""
    chunk_rows: int = 8192
    """Activation rows encoded at a time (memory: ~4 bytes x chunk_rows x d_hidden for the matmul)."""
    splits: tuple[str, ...] = ("train", "eval")
    """Extract splits read, in this order (rows of all of them are analyzed together)."""

    def __post_init__(self) -> None:
        for name in ("top_n", "quantiles", "histogram_bins", "chunk_rows"):
            _check_int(self, name, minimum=1)
        for name in ("window_before", "window_after", "per_quantile", "logit_top", "neighbors", "token_top"):
            _check_int(self, name, minimum=0)
        splits = self.splits
        if isinstance(splits, str) or not all(isinstance(s, str) and s for s in splits) or not splits:
            raise ValueError(f"analyze.splits must be a non-empty list of split names, got {splits!r}")
        if len(set(splits)) != len(splits):
            raise ValueError(f"analyze.splits repeats a split: {list(splits)}")
        object.__setattr__(self, "splits", tuple(splits))  # a YAML list becomes a (hashable) tuple

    def to_dict(self) -> dict:
        """The section as params.yaml holds it (``splits`` as a list)."""
        return {**super().to_dict(), "splits": list(self.splits)}

    @property
    def window(self) -> int:
        """Tokens in a full context window (before + the activating token + after)."""
        return self.window_before + 1 + self.window_after


def _check_int(cfg: AnalysisConfig, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"analyze.{name} must be an integer >= {minimum}, got {value!r}")


__all__ = ["AnalysisConfig"]
