"""The ``prepare:`` section of params.yaml: where texts come from and how they are cleaned and split.

Kept apart from the code that runs it, so reading or printing params (``saepipe params``) loads no
heavy dependency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from saepipe.runtime.params import ParamsSection


@dataclass(frozen=True)
class PrepareConfig(ParamsSection):
    """The ``prepare:`` section of params.yaml."""

    SECTION: ClassVar[str] = "prepare"  # its params.yaml section

    source: str = "builtin"
    """"builtin" (offline corpus) | HF hub dataset name | local file or folder (see saepipe.texts.sources)."""
    dataset_config: str | None = None
    """HF dataset config name (hub datasets only)."""
    dataset_split: str = "train"
    """HF split to read (hub datasets and saved DatasetDicts)."""
    text_column: str = "text"
    """Column holding the text (HF datasets, jsonl/json objects, parquet, csv)."""
    min_chars: int = 50
    """Drop texts shorter than this many characters, after stripping whitespace."""
    max_chars: int = 512
    """Truncate texts longer than this many characters."""
    max_texts: int | None = 4000
    """Keep at most this many texts (seeded random sample); null = keep all."""
    eval_fraction: float = 0.1
    """Share of the kept texts held out as the eval split, in [0, 1)."""
    seed: int = 0
    """Seed of the max_texts sample and of the train/eval split."""

    def __post_init__(self) -> None:
        check_prepare_args(
            self.min_chars, self.max_chars, self.max_texts, self.eval_fraction, self.seed
        )

    def prepare_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``prepare_texts``."""
        keys = ("min_chars", "max_chars", "max_texts", "eval_fraction", "seed")
        return {k: getattr(self, k) for k in keys}


def check_prepare_args(
    min_chars: int, max_chars: int, max_texts: int | None, eval_fraction: float, seed: int
) -> None:
    """Raise a ValueError naming the first bad prepare setting."""
    for name, value in (("min_chars", min_chars), ("max_chars", max_chars), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"prepare {name} must be an integer, got {value!r}")
    if min_chars < 0:
        raise ValueError(f"prepare min_chars must be >= 0, got {min_chars}")
    if max_chars < max(min_chars, 1):
        raise ValueError(f"prepare max_chars={max_chars} must be >= max(min_chars={min_chars}, 1)")
    if max_texts is not None and (
        not isinstance(max_texts, int) or isinstance(max_texts, bool) or max_texts < 1
    ):
        raise ValueError(f"prepare max_texts must be a positive integer or null, got {max_texts!r}")
    if not isinstance(eval_fraction, int | float) or not 0 <= eval_fraction < 1:
        raise ValueError(f"prepare eval_fraction must be in [0, 1), got {eval_fraction!r}")
    if seed < 0:
        raise ValueError(f"prepare seed must be >= 0, got {seed}")


__all__ = ["PrepareConfig", "check_prepare_args"]
