"""Shared fixtures: the tiny random model (fast) and the real default model (loaded once)."""

from __future__ import annotations

import pytest

import saepipe  # noqa: F401  (fast BLAS before mlx)
from saepipe.lm.model import LoadedModel, load_model, tiny_random_model


@pytest.fixture(scope="session")
def tiny_model() -> LoadedModel:
    return tiny_random_model()


@pytest.fixture(scope="session")
def default_model() -> LoadedModel:
    return load_model("default")
