"""The ``evaluate:`` section of params.yaml (the texts and tokens come from ``extract:``).

Kept apart from the code that runs it, so reading or printing params loads no heavy dependency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from saepipe.runtime.params import Int, ParamsSection


@dataclass(frozen=True)
class EvaluateConfig(ParamsSection):
    """The ``evaluate:`` section of params.yaml (which texts and tokens come from ``extract:``)."""

    SECTION: ClassVar[str] = "evaluate"  # its params.yaml section

    max_tokens: int = 10000
    """Eval-split token positions scored (reconstruction and spliced-model loss)."""
    batch_size: int = 8
    """Texts per forward pass."""

    RULES: ClassVar = {"max_tokens": Int(min=1), "batch_size": Int(min=1)}


__all__ = ["EvaluateConfig"]
