"""The ``evaluate:`` section of params.yaml (the texts and tokens come from ``extract:``).

Kept apart from the code that runs it, so reading or printing params loads no heavy dependency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from saepipe.runtime.params import ParamsSection


@dataclass(frozen=True)
class EvaluateConfig(ParamsSection):
    """The ``evaluate:`` section of params.yaml (which texts and tokens come from ``extract:``)."""

    SECTION: ClassVar[str] = "evaluate"  # its params.yaml section

    max_tokens: int = 10000
    """Eval-split token positions scored (reconstruction and spliced-model loss)."""
    batch_size: int = 8
    """Texts per forward pass."""

    def __post_init__(self) -> None:
        for name in ("max_tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"evaluate.{name} must be a positive integer, got {value!r}")


__all__ = ["EvaluateConfig"]
