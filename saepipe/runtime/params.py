"""Reading ``params.yaml``: the one place stages get their settings from.

Each section of the file (``prepare:``, ``extract:``, ``sae:``, ...) maps onto a frozen dataclass
of the layer that uses it; ``ParamsSection`` gives those dataclasses one way to be built from a
section (``from_dict``, unknown keys are an error naming them: they are usually typos) and written
back (``to_dict``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

import yaml

DEFAULT_PARAMS_FILE = "params.yaml"

DEFAULT_MODEL = "default"
"""The model when params.yaml names none: SmolLM2-135M-Instruct, shipped on PyPI."""


def read_params(path: str | Path = DEFAULT_PARAMS_FILE) -> dict[str, Any]:
    """The whole params file as a mapping of sections."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"params file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """One section of params (e.g. ``prepare``); a missing section is an error naming the file key."""
    if name not in params or not isinstance(params[name], dict):
        raise KeyError(f"params.yaml has no `{name}:` section")
    return dict(params[name])


def model_spec(params: dict[str, Any]) -> str:
    """The ``model:`` of params (a name, hub id, folder or .gguf file; see ``saepipe.lm.model``)."""
    return str(params.get("model", DEFAULT_MODEL))


def check_known_keys(values: Mapping[str, Any], known: Iterable[str], section_name: str) -> None:
    """Raise a ValueError naming every key of ``values`` that is not in ``known``."""
    known = sorted(known)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) in {section_name} params: {unknown}; valid: {known}")


class ParamsSection:
    """Mixin for a frozen dataclass that is one section of ``params.yaml`` (field = key).

    Subclasses set ``SECTION`` to the section's name (used in error messages).
    """

    SECTION: ClassVar[str]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Self:
        """Build from a params section; unknown keys are an error naming them."""
        check_known_keys(values, (f.name for f in dataclasses.fields(cls)), cls.SECTION)  # type: ignore[arg-type]
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The section as plain values (what ``params.yaml`` would hold)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]


__all__ = ["DEFAULT_MODEL", "DEFAULT_PARAMS_FILE", "ParamsSection", "check_known_keys", "model_spec", "read_params",
           "section"]
