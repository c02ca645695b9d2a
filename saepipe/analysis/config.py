"""``AnalysisConfig``: the ``analyze:`` section of params.yaml (what the analysis keeps per latent)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from saepipe.runtime.params import Int, ParamsSection, StrList


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

    RULES: ClassVar = {
        "top_n": Int(min=1), "window_before": Int(min=0), "window_after": Int(min=0), "quantiles": Int(min=1),
        "per_quantile": Int(min=0), "histogram_bins": Int(min=1), "logit_top": Int(min=0), "neighbors": Int(min=0),
        "token_top": Int(min=0), "chunk_rows": Int(min=1),
        "splits": StrList(options=("train", "eval"), min_items=1, unique=True),
    }

    def to_dict(self) -> dict:
        """The section as params.yaml holds it (``splits`` as a list)."""
        return {**super().to_dict(), "splits": list(self.splits)}

    @property
    def window(self) -> int:
        """Tokens in a full context window (before + the activating token + after)."""
        return self.window_before + 1 + self.window_after


__all__ = ["AnalysisConfig"]
