"""The interface every sparse dictionary (SAE architecture) implements.

Evaluation, the API and later analysis only need to turn activations into codes and back, so they
depend on this interface, not on one architecture: a new architecture (gated, JumpReLU, a
transcoder) is one new module in ``saepipe/sae/`` with a class implementing ``Dictionary``.
"""

from __future__ import annotations

import abc
from typing import Any


class Dictionary(abc.ABC):
    """Maps (..., d_model) activations to (..., d_hidden) codes and back, in the original space."""

    d_model: int
    """Width of the activations read and reconstructed."""

    @property
    @abc.abstractmethod
    def d_hidden(self) -> int:
        """Number of latents (dictionary atoms)."""

    @abc.abstractmethod
    def encode(self, x: Any) -> Any:
        """Dense codes (..., d_hidden) of activations (..., d_model)."""

    @abc.abstractmethod
    def decode(self, codes: Any) -> Any:
        """Reconstructions (..., d_model) of dense codes (..., d_hidden)."""


__all__ = ["Dictionary"]
