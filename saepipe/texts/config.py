"""The ``prepare:`` section of params.yaml: where texts come from and how they are cleaned and split.

Kept apart from the code that runs it, so reading or printing params (``saepipe params``) loads no
heavy dependency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from saepipe.runtime.params import Encoding, Float, Int, ParamsError, ParamsSection, Str


@dataclass(frozen=True)
class PrepareConfig(ParamsSection):
    """The ``prepare:`` section of params.yaml."""

    SECTION: ClassVar[str] = "prepare"  # its params.yaml section

    source: str = "builtin"
    """"builtin" (offline corpus) | HF hub dataset name | a local file or folder under data/sources/ (see
    saepipe.texts.sources; the prepare stage depends on that folder, so DVC sees its files change)."""
    dataset_config: str | None = None
    """HF dataset config name (hub datasets only)."""
    dataset_revision: str | None = None
    """HF hub dataset revision (commit sha, tag or branch); null = the current commit, resolved when prepare
    runs and recorded in counts.json. Pin it to make prepare reproducible."""
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
    encoding: str = "utf-8"
    """Text encoding of local .txt/.jsonl/.json/.csv files (e.g. latin-1, cp1252); a UTF-8 BOM is skipped."""

    RULES: ClassVar = {
        "source": Str(), "dataset_config": Str(optional=True), "dataset_revision": Str(optional=True),
        "dataset_split": Str(), "text_column": Str(), "min_chars": Int(min=0), "max_chars": Int(min=1),
        "max_texts": Int(min=1, optional=True), "eval_fraction": Float(min=0, max=1, max_open=True),
        "seed": Int(min=0), "encoding": Encoding(),
    }

    def check_together(self) -> None:
        """`prepare.max_chars` must be >= `prepare.min_chars`."""
        if self.max_chars < self.min_chars:
            raise ParamsError("prepare.max_chars", self.max_chars, f">= prepare.min_chars ({self.min_chars})")

    def prepare_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``prepare_texts``."""
        keys = ("min_chars", "max_chars", "max_texts", "eval_fraction", "seed")
        return {k: getattr(self, k) for k in keys}


def check_prepare_args(
    min_chars: int, max_chars: int, max_texts: int | None, eval_fraction: float, seed: int
) -> None:
    """Raise a ParamsError naming the first bad prepare setting (the rules of ``PrepareConfig``)."""
    PrepareConfig(min_chars=min_chars, max_chars=max_chars, max_texts=max_texts, eval_fraction=eval_fraction,
                  seed=seed)


__all__ = ["PrepareConfig", "check_prepare_args"]
