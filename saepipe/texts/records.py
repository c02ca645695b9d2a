"""The unit every text source yields: one passage and where it came from."""

from __future__ import annotations

from typing import NamedTuple


class TextRecord(NamedTuple):
    """One passage and the label of the source it came from."""

    text: str
    source: str


__all__ = ["TextRecord"]
