"""The ``extract:`` and ``normalize:`` sections of params.yaml.

Kept apart from the code that runs them, so reading or printing params (``saepipe params``) loads
neither MLX nor the model code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from saepipe.runtime.params import ParamsSection


@dataclass(frozen=True)
class ExtractConfig(ParamsSection):
    """The ``extract:`` section of params.yaml: how texts become activation rows. Which sites are
    stored is ``sweep.sites`` (``saepipe.lm.sites.parse_site_ids``), all captured in one pass."""

    SECTION: ClassVar[str] = "extract"  # its params.yaml section

    @classmethod
    def from_dict(cls, values):
        """Build from the section; the pre-sweep keys ``layer``/``component`` say where sites went."""
        moved = sorted({"layer", "component"} & set(values))
        if moved:
            raise ValueError(f"extract.{'/'.join(moved)} moved to sweep.sites: write `sweep: {{sites: "
                             f"[{values.get('layer', 6)}.{values.get('component', 'mlp')}]}}` instead (README, "
                             f"'Sweeps')")
        return super().from_dict(values)

    context_length: int = 128
    """Texts are truncated to this many tokens (BOS included)."""
    batch_size: int = 8
    """Texts per forward pass."""
    dtype: str = "float16"
    """Storage dtype of the shards: float16 | float32."""
    max_tokens: int = 200000
    """Rows written for the train split."""
    eval_max_tokens: int = 20000
    """Rows written for the eval split."""
    skip_special_tokens: bool = True
    """Exclude BOS and other special-token positions (pads are always excluded)."""
    shard_rows: int = 65536
    """Rows per shard file."""

    def __post_init__(self) -> None:
        for name in ("context_length", "batch_size", "max_tokens", "eval_max_tokens", "shard_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"extract.{name} must be a positive integer, got {value!r}")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"extract.dtype must be float16 or float32, got {self.dtype!r}")

    def max_rows(self, split: str) -> int:
        """Row budget of a split."""
        return self.max_tokens if split == "train" else self.eval_max_tokens


@dataclass(frozen=True)
class NormalizeConfig(ParamsSection):
    """The ``normalize:`` section of params.yaml."""

    SECTION: ClassVar[str] = "normalize"  # its params.yaml section

    chunk_rows: int = 65536
    """Rows read from the shards at a time (bounds memory; the statistics do not depend on it)."""

    def __post_init__(self) -> None:
        check_chunk_rows(self.chunk_rows)


def check_chunk_rows(chunk_rows: int) -> None:
    """A ValueError unless ``chunk_rows`` is a positive integer."""
    if not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows <= 0:
        raise ValueError(f"normalize.chunk_rows must be positive, got {chunk_rows}")


__all__ = ["ExtractConfig", "NormalizeConfig", "check_chunk_rows"]
