"""The ``extract:`` and ``normalize:`` sections of params.yaml.

Kept apart from the code that runs them, so reading or printing params (``saepipe params``) loads
neither MLX nor the model code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from saepipe.runtime.params import Bool, Choice, Int, ParamsError, ParamsSection

COMPONENTS: tuple[str, ...] = ("mlp", "attn", "output")
"""``saepipe.lm.sites.COMPONENTS``, repeated so normalize and train (which read this section) do not depend
on the model code; tests/test_params.py keeps the two equal."""


@dataclass(frozen=True)
class ExtractConfig(ParamsSection):
    """The ``extract:`` section of params.yaml: how texts become activation rows. Which sites are
    stored is ``sweep.sites`` (``saepipe.lm.sites.parse_site_ids``), all captured in one pass."""

    SECTION: ClassVar[str] = "extract"  # its params.yaml section

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> ExtractConfig:
        """Build from the section; the pre-sweep keys ``layer``/``component`` say where sites went."""
        given = values if isinstance(values, Mapping) else {}
        moved = sorted({"layer", "component"} & set(given))
        if moved:
            key = f"extract.{moved[0]}"
            site = f"{given.get('layer', 6)}.{given.get('component', 'mlp')}"
            raise ParamsError(key, given[moved[0]], "", message=(
                f"{key} moved to sweep.sites: write `sweep: {{sites: [{site}]}}` instead (README, 'Sweeps')"))
        return super().from_dict(values)

    context_length: int = 128
    """Texts are truncated to this many tokens (a BOS included, when the tokenizer adds one)."""
    batch_size: int = 8
    """Texts per forward pass."""
    dtype: str = "float16"
    """Storage dtype of the shards: float16 | float32."""
    max_tokens: int = 200000
    """Rows written for the train split."""
    eval_max_tokens: int = 20000
    """Rows written for the eval split."""
    skip_special_tokens: bool = True
    """Exclude special-token positions, BOS among them when the tokenizer adds one (pads are always excluded)."""
    shard_rows: int = 65536
    """Rows per shard file."""

    RULES: ClassVar = {
        # >= 2: evaluate scores next-token loss, which needs a next token
        "context_length": Int(min=2), "batch_size": Int(min=1),
        "dtype": Choice(("float16", "float32")), "max_tokens": Int(min=1), "eval_max_tokens": Int(min=1),
        "skip_special_tokens": Bool(), "shard_rows": Int(min=1),
    }

    def max_rows(self, split: str) -> int:
        """Row budget of a split."""
        return self.max_tokens if split == "train" else self.eval_max_tokens


@dataclass(frozen=True)
class NormalizeConfig(ParamsSection):
    """The ``normalize:`` section of params.yaml."""

    SECTION: ClassVar[str] = "normalize"  # its params.yaml section

    chunk_rows: int = 65536
    """Rows read from the shards at a time (bounds memory; the statistics do not depend on it)."""

    RULES: ClassVar = {"chunk_rows": Int(min=1)}


def check_chunk_rows(chunk_rows: int) -> int:
    """``chunk_rows`` as an int, or a ParamsError unless it is a positive integer."""
    return NormalizeConfig.RULES["chunk_rows"].check("normalize.chunk_rows", chunk_rows)


__all__ = ["COMPONENTS", "ExtractConfig", "NormalizeConfig", "check_chunk_rows"]
